"""The safety subspace a projection defense removes, over a block of the trainable parameters.

A projection defense needs an orthonormal basis V (n_B × d; n_B the parameters of the selected
blocks) and two products with it: coordinates Vᵀx and combinations V c. Both are taken one parameter
block at a time, so no flat n-vector of the whole model is formed. Two storages sit behind one
interface (:class:`Basis`):

* :class:`DenseBasis` holds V itself: the top-d eigenvectors of the exact alignment-KL GGN over the
  blocks, found by Lanczos. Memory d·n_B·8 bytes (float64, on the parameters' device); each product
  costs d·n_B multiply-adds. Finding it holds ARPACK's (ncv + d)·n_B·8 bytes on the host.
* :class:`FactoredBasis` holds V = U C (``storage=factored``; ``storage=dense`` forms V from it
  and keeps the dense matrix, ``auto`` the smaller of the two). U holds the N·S score vectors of the Monte-Carlo Fisher
  F̂ = U Uᵀ/NS (S label draws per safety prompt, as in ``scan --scan-method sample``), kept as factors
  (:mod:`aligncollapse.geometry.ghost`: 4·R·Σ_sites(d_in + d_out) bytes for R = S·Σ safety tokens). C
  (NS × d, float64) satisfies CᵀUᵀUC = I. Then Vᵀx = Cᵀ(Uᵀx) and V c = U(C c). Each product costs
  about R·Σ_sites d_in·d_out multiply-adds, and no d × n matrix exists.

  Over the 973M linear weights of a Llama-3.2-1B shape, with N = 60 prompts (R = 1,140 tokens),
  the factors are 2.93 GB (measured by ``benchmarks/overlap_benchmark.py``). V with d = 16 would be
  16 · 0.973e9 · 8 = 125 GB. The factored basis estimates the Fisher from N·S draws; it is not the
  exact GGN.

Sizes: n_B selected parameters, d basis columns, N prompts, S draws, R score tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch

from aligncollapse.errors import UserError
from aligncollapse.geometry.per_sample import unflatten

split = unflatten  # a flat vector over the parameters as per-parameter views (what the defenses call it)


class Basis:
    """An orthonormal basis V of a subspace of the parameters ``names`` (per-parameter products)."""

    names: list[str]
    d: int

    def coords(self, v: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Vᵀv ([d], float64). Parameters that ``v`` lacks count as zero."""
        raise NotImplementedError

    def combine(self, c: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """V c per parameter (float64 for a float64 model, else float32)."""
        raise NotImplementedError

    def overlap(self, other: Basis) -> torch.Tensor:
        """Vᵀ W ([d, d'], float64) for another basis of the same kind and parameters."""
        raise NotImplementedError

    def union(self, other: Basis) -> Basis:
        """An orthonormal basis of span(V ∪ W)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class DenseBasis(Basis):
    """V as a dense n_B × d float64 matrix, with views per parameter."""

    def __init__(self, shapes: Mapping[str, torch.Size], V: torch.Tensor):
        self.names = list(shapes)
        self.V = V
        self.d = V.shape[1]
        self.blocks: OrderedDict[str, torch.Tensor] = OrderedDict()
        off = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            self.blocks[name] = V[off : off + numel]
            off += numel
        self._shapes = OrderedDict(shapes)

    def coords(self, v):
        out = torch.zeros(self.d, dtype=torch.float64, device=self.V.device)
        for name, blk in self.blocks.items():
            if name in v:
                out += blk.T @ v[name].reshape(-1).to(blk)
        return out.cpu()

    def combine(self, c):
        """V c, each block formed when it is read (one block's n_max·8 bytes at a time)."""
        return _LazyBlocks(self.blocks, self._shapes, c.to(self.V))

    def overlap(self, other):
        return (self.V.T @ other.V).cpu()

    def union(self, other):
        Q, _ = torch.linalg.qr(torch.cat([self.V, other.V], dim=1))
        return DenseBasis(self._shapes, Q)

    def nbytes(self):
        return self.V.numel() * self.V.element_size()


class _LazyBlocks(Mapping):
    """{name: V_name c}, computed on access."""

    def __init__(self, blocks, shapes, c):
        self.blocks, self.shapes, self.c = blocks, shapes, c

    def __getitem__(self, name):
        return (self.blocks[name] @ self.c).view(self.shapes[name])

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)


class FactoredBasis(Basis):
    """V = U C with U the score vectors' factors (``factors``, collected by ``ghost``) and C [count, d]."""

    def __init__(self, ghost, factors, C: torch.Tensor, K: torch.Tensor, eigenvalues: torch.Tensor | None = None):
        self.ghost, self.factors, self.C, self.K = ghost, factors, C, K  # K = UᵀU
        self.names = list(ghost.params)
        self.d = C.shape[1]
        self.eigenvalues = eigenvalues
        first = next(iter(ghost.params.values()))
        self._dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self._cross: tuple[object, torch.Tensor] | None = None

    def coords(self, v):
        return self.C.T @ self.ghost.dot(self.factors, v)

    def combine(self, c):
        return self.ghost.weighted_sum(self.factors, self.C @ c.to(self.C), dtype=self._dtype)

    def _gram_with(self, other) -> torch.Tensor:
        """UᵀU' (R·R'·Σ(d_in + d_out) multiply-adds), kept for the last ``other`` (overlap, then union)."""
        if self._cross is None or self._cross[0] is not other:
            self._cross = (other, self.ghost.gram(self.factors, other.factors))
        return self._cross[1]

    def overlap(self, other):
        return self.C.T @ self._gram_with(other) @ other.C

    def union(self, other):
        cross = self._gram_with(other)
        self._cross = None
        K = torch.cat([torch.cat([self.K, cross], 1), torch.cat([cross.T, other.K], 1)], 0)
        C = _orthonormal(torch.block_diag(self.C, other.C), K, rtol=_rtol(self._dtype))
        return FactoredBasis(self.ghost, self.ghost.concat(self.factors, other.factors), C, K)

    def nbytes(self):
        return self.factors.nbytes() + 8 * (self.C.numel() + self.K.numel())


def _rtol(dtype) -> float:
    """The relative eigenvalue below which a Gram direction is rounding: the Grams of float32 factors
    are accurate to about 1e-7 of their entries, and 1/√s amplifies that error (1e-4 keeps it ≤ 3e-3,
    measured); float64 ones to about 1e-16."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def _orthonormal(C: torch.Tensor, K: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """C' with span(U C') = span(U C) and C'ᵀ K C' = I (K = UᵀU): directions of U C with squared
    norm below ``rtol`` times the largest are dropped (no new direction, or rounding: a refreshed
    basis close to the initial one adds directions with eigenvalue 1 − cos θ ≈ θ²/2)."""
    G = C.T @ K @ C
    s, E = torch.linalg.eigh((G + G.T) / 2)
    keep = s > rtol * max(float(s.max()), 1e-300)
    E, s = E[:, keep].flip(1), s[keep].flip(0)
    return C @ (E / s.sqrt())


def select_blocks(params: Mapping[str, torch.nn.Parameter], model, first_layer, last_layer, modules: str):
    """The trainable parameters the basis spans: all of them, or those of layers
    [first_layer, last_layer] and of the module types in ``modules`` (``q+v+down``)."""
    if first_layer is None and last_layer is None and not modules:
        return OrderedDict(params)
    from aligncollapse.geometry.projection import BlockSelection

    layers = None
    if first_layer is not None or last_layer is not None:
        layers = (0 if first_layer is None else int(first_layer), 10**9 if last_layer is None else int(last_layer))
        if layers[0] > layers[1]:
            raise UserError(f"defense option first_layer ({layers[0]}) is after last_layer ({layers[1]})")
    sel = BlockSelection(layers=layers, module_types=[m for m in (modules or "").split("+") if m], trainable_only=True)
    try:
        chosen = sel.select(model)
    except UserError:
        raise UserError(f"the defense's block options (first_layer, last_layer, modules={modules or ''}) match "
                        "no trainable parameter") from None  # fmt: skip
    return OrderedDict((n, p) for n, p in params.items() if n in chosen)


def lanczos_basis(model, params, data, d: int, seed: int, batch_size: int) -> tuple[torch.Tensor, DenseBasis]:
    """Top-d eigenpairs of the exact alignment-KL GGN over ``params`` at the model's θ (Lanczos)."""
    from aligncollapse.defenses.base import safety_subspace

    n_B = sum(p.numel() for p in params.values())
    if d >= n_B:
        raise UserError(f"defense option d ({d}) must be below the selected blocks' {n_B} parameters")
    lam, B = safety_subspace(model, params, data, d, seed, batch_size)
    dev = next(iter(params.values())).device
    return lam, DenseBasis(OrderedDict((n, p.shape) for n, p in params.items()), B.to(dev))


STORAGES = ("auto", "factored", "dense")


def sampled_storage(storage: str, d: int, n_B: int, factor_bytes: int) -> str:
    """``factored`` or ``dense`` for a sampled basis: ``auto`` keeps the smaller of the factors and the
    dense d·n_B·8 matrix (dense wins for LoRA, whose matrices are thin; factored for full
    fine-tuning of large matrices)."""
    if storage != "auto":
        return storage
    return "dense" if d * n_B * 8 <= factor_bytes else "factored"


def sampled_basis(
    model, params, data, d: int, samples: int, seed: int, batch_size: int, ghost=None, storage: str = "factored"
) -> tuple[torch.Tensor, Basis]:
    """Top-d eigenpairs of the Monte-Carlo Fisher F̂ = UUᵀ/NS over ``params`` (S draws per prompt
    of ``data``), by the Gram trick: UᵀU/NS = W μ Wᵀ and V = U W μ^{-1/2}/√NS. Directions with no
    Fisher mass (μ ≤ 1e-12·μ_max; 1e-6 for float32 scores, whose Gram rounding would dominate them)
    are dropped, so the basis may have fewer than d columns. Pass the
    same ``ghost`` for every basis that will be compared or joined (:meth:`Basis.union`)."""
    from aligncollapse.geometry.ghost import GhostGradients
    from aligncollapse.scan.sample_space import SampledFisher

    was = model.training
    model.eval()
    try:
        sf = SampledFisher(ghost or GhostGradients(model, params), data, samples, batch_size, seed)
    finally:
        model.train(was)
    mu = sf.mu[:d]
    first = next(iter(params.values()))
    cut = 1e-12 if first.dtype == torch.float64 else 1e-6  # a column's error is about u·μ_max/μ_j
    mu = mu[mu > cut * max(float(sf.mu[0]) if len(sf.mu) else 0.0, 1e-300)]
    if len(mu) == 0:
        raise UserError("the sampled safety Fisher is zero on the selected parameters: no subspace to project off")
    C = sf.W[:, : len(mu)] / (mu.sqrt() * math.sqrt(sf.count))
    basis = FactoredBasis(sf.ghost, sf.factors, C, sf.K_raw, mu)
    if storage == "dense":  # V formed column by column (d passes over the factors), then the factors go
        shapes = OrderedDict((n, p.shape) for n, p in params.items())
        V = torch.empty(sum(p.numel() for p in params.values()), len(mu), dtype=torch.float64, device=first.device)
        for j, e in enumerate(torch.eye(len(mu), dtype=torch.float64)):
            off = 0
            for t in basis.combine(e).values():
                V[off : off + t.numel(), j] = t.reshape(-1)
                off += t.numel()
        return mu, DenseBasis(shapes, V)
    return mu, basis
