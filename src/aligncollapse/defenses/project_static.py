"""``project-static``: the first-order baseline defense.

M = span of the top-d eigenvectors V (orthonormal, n_B × d) of the alignment-KL Fisher at θ*,
computed once. Every optimiser update is projected off M after the step:

    θ_{k+1} = θ_k + (I − V Vᵀ)(θ̃_{k+1} − θ_k)

where θ̃_{k+1} is what the optimiser (SGD or AdamW) proposed. Projecting the update rather than
the gradient keeps the displacement exactly orthogonal to M under Adam's rescaling too. The theory
(paper §3.3) predicts this delays but does not prevent collapse: M rotates along the trajectory and
the alignment loss is also sensitive outside the top-d directions.

Options for scale (:mod:`aligncollapse.defenses.basis`):

* ``samples=S`` (default 0): 0 takes V from the exact GGN by Lanczos and stores it dense (d·n_B·8
  bytes). S ≥ 1 takes it from the Monte-Carlo Fisher with S label draws per safety prompt (one
  backward pass each instead of Lanczos's dozens of GGN products) and, with ``storage=auto``, keeps
  the smaller of its forms: the scores' factors (4·R·Σ(d_in + d_out) bytes, R = S·Σ safety tokens;
  no d × n matrix exists; full fine-tuning of large matrices) or the dense V (LoRA's thin ones).
  ``storage=factored|dense`` forces one.
* ``first_layer``, ``last_layer``, ``modules`` (``q+v+down``): restrict M to those blocks of the
  trainable parameters. The update of every other parameter is left as the optimiser made it.
  Memory and cost scale with n_B instead of n.

The projection runs one parameter block at a time: Vᵀ(θ̃ − θ_k) from each block's difference, then
θ_{k+1} = θ̃ − V c block by block, so no flat copy of the parameters exists (a factored basis forms
V c for all blocks at once, n_B numbers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aligncollapse.defenses.base import Defense, SafetyReference, trainable
from aligncollapse.defenses.basis import lanczos_basis, sampled_basis, sampled_storage, select_blocks, split
from aligncollapse.errors import UserError


class _Difference(Mapping):
    """θ̃ − θ_k per parameter, formed on access (one block at a time)."""

    def __init__(self, params, before, names, dtype):
        self.params, self.before, self.names, self.dtype = params, before, names, dtype

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.params[name].detach().to(self.dtype) - self.before[name].to(self.dtype)

    def __contains__(self, name):
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


class ProjectStatic(Defense):
    name = "project-static"
    wants_update = True

    def __init__(
        self,
        ctx,
        d: int = 16,
        samples: int = 0,
        first_layer: int | None = None,
        last_layer: int | None = None,
        modules: str = "",
        storage: str = "auto",
        **options,
    ):
        if storage != "auto" and not samples:
            raise UserError(
                f"defense option {self.name}:storage={storage} needs samples >= 1 (the Lanczos basis is dense)"
            )
        given = (("samples", samples, 0), ("first_layer", first_layer, None), ("last_layer", last_layer, None),
                 ("modules", modules, ""), ("storage", storage, "auto"))  # fmt: skip
        extra = {k: v for k, v, default in given if v != default}
        super().__init__(ctx, d=d, **extra, **options)
        self.d, self.samples = d, samples
        self.first_layer, self.last_layer, self.modules = first_layer, last_layer, modules
        self.storage = storage

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.params = trainable(model)
            self.blocks = select_blocks(self.params, model, self.first_layer, self.last_layer, self.modules)
            self.ref = SafetyReference.build(model, self.ctx)
            self.lam, self.basis = self.subspace(model)
        self.counters["removed_norm"] = 0.0
        self.counters["basis"] = "sampled" if self.samples else "lanczos"
        self.counters["basis_storage"] = "factored" if hasattr(self.basis, "factors") else "dense"
        self.counters["basis_columns"] = self.basis.d
        self.counters["basis_parameters"] = sum(p.numel() for p in self.blocks.values())
        self.counters["basis_bytes"] = self.basis.nbytes()

    def subspace(self, model):
        """(eigenvalues, basis) of the alignment-KL Fisher over the blocks at the model's current θ."""
        c = self.ctx
        if self.samples:
            if getattr(self, "_ghost", None) is None:
                from aligncollapse.geometry.ghost import GhostGradients

                self._ghost = GhostGradients(model, self.blocks)  # one for every basis (refreshes join them)
            storage = sampled_storage(self.storage, self.d, sum(p.numel() for p in self.blocks.values()),
                                      self._factor_bytes(self._ghost))  # fmt: skip
            return sampled_basis(model, self.blocks, self.ref.data, self.d, self.samples, c.seed, c.batch_size,
                                 self._ghost, storage)  # fmt: skip
        return lanczos_basis(model, self.blocks, self.ref.data, self.d, c.seed, c.batch_size)

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """With n_B the blocks' parameters, a = max(b, 4), B_s = min(batch, N), T the safety
        sequence length and act(·) the activations (:func:`~aligncollapse.geometry.memory.activation_bytes`):

        * ``samples=0`` (Lanczos, dense): setup (ncv + d + 4)·n_B·8 + 3·n_B·a + 3·act(B_s) +
          3·B_s·T·V·4 (ARPACK's basis, the Ritz vectors and the GGN product, as the scan's Lanczos
          stage; ncv = min(n_B, max(2d + 1, 20))); held d·n_B·8 (V); transient 2·n_max·8 (one
          block's difference and correction; n_max the largest block).
        * ``samples=S`` (factored): setup Fac + 2·act(B_s) + 2·B_s·T·V·8 + 3·(NS)²·8 (the
          scores' factors, :func:`~aligncollapse.geometry.memory.factor_bytes`; the graph and the
          backward's gradients, returned at every site's output at once; the draws' probabilities;
          K, its eigenvectors and C); held Fac + (NS)²·8 + NS·d·8; transient (n_B + n_max)·a (the
          correction V c, formed for all blocks at once, and one block's difference). With ``storage=dense``
          (``auto`` picks it when d·n_B·8 ≤ Fac) V is formed at setup (Fac + d·n_B·8 + 3·n_B·8)
          and the steps hold and use it as with ``samples=0``.
        """
        from aligncollapse.geometry.memory import activation_bytes

        blocks = select_blocks(trainable(model), model, self.first_layer, self.last_layer, self.modules)
        nB = sum(p.numel() for p in blocks.values())
        n_max = max(p.numel() for p in blocks.values())
        z = self.safety_sizes()
        N, T, V, b = z["N"], z["T"], shape.vocab, shape.dtype_bytes
        a = max(b, 4)
        Bs = max(1, min(self.ctx.batch_size, N))
        act = activation_bytes(shape, Bs, T)
        inputs = {"n_B": nB, "d": self.d, "samples": self.samples, "N": N, "T": T}
        if not self.samples:
            ncv = min(nB, max(2 * self.d + 1, 20))
            host = (ncv + self.d + 4) * nB * 8  # ARPACK's arrays live on the host (scipy)
            setup = host + 3 * nB * a + 3 * act + 3 * Bs * T * V * 4
            return {
                "setup": setup,
                "setup_host": host,
                "held": self.d * nB * 8,
                "transient": 2 * n_max * 8,
                "inputs": inputs,
            }
        from aligncollapse.geometry.ghost import GhostGradients

        NS = N * self.samples
        fac = self._factor_bytes(GhostGradients(model, blocks), z)
        storage = sampled_storage(self.storage, self.d, nB, fac)
        inputs.update(factor_bytes=fac, storage=storage)
        setup = fac + 2 * act + 2 * Bs * T * V * 8 + 3 * NS * NS * 8
        if storage == "dense":  # V formed from the factors (a column and its pieces at a time), then kept
            setup = max(setup, fac + self.d * nB * 8 + 3 * nB * 8)
            return {"setup": setup, "held": self.d * nB * 8, "transient": 2 * n_max * 8, "inputs": inputs}
        held = fac + NS * NS * 8 + NS * self.d * 8
        return {"setup": setup, "held": held, "transient": (nB + n_max) * a, "inputs": inputs}

    def _factor_bytes(self, ghost, sizes: dict | None = None) -> int:
        """The planned bytes of the scores' factors (:func:`~aligncollapse.geometry.memory.factor_bytes`)."""
        from aligncollapse.geometry.memory import factor_bytes

        z = sizes or self.safety_sizes()
        return factor_bytes(ghost.floats_per_token(), ghost.head_floats_per_token(), ghost.explicit_numel(),
                            z["tokens"], z["loss_tokens"], z["N"], self.samples)  # fmt: skip

    @property
    def B(self) -> torch.Tensor:
        """The dense basis matrix (n_B × d, float64): only for ``samples=0``."""
        return self.basis.V

    def _dtype(self):
        """The differences' dtype: float64 for the dense basis (exact) and float64 models, else float32."""
        first = next(iter(self.blocks.values()))
        return torch.float64 if self.samples == 0 or first.dtype == torch.float64 else torch.float32

    def _project_out(self, delta: torch.Tensor, count: bool = True) -> torch.Tensor:
        """(I − VVᵀ)Δ for a flat Δ over all trainable parameters (V over the blocks); ``count``: add
        ‖VᵀΔ‖ to the ``removed_norm`` counter."""
        parts = split(self.params, delta.to(torch.float64))
        c = self.basis.coords(parts)
        if count:
            self.counters["removed_norm"] += float(c.norm())
        fix = self.basis.combine(c)
        return torch.cat([(t - fix[n].to(t) if n in fix else t).reshape(-1) for n, t in parts.items()]).to(delta.dtype)

    def remove(self, before, coefficients) -> torch.Tensor:
        """θ ← θ − V·coefficients(Vᵀ(θ − before)), one parameter block at a time."""
        diff = _Difference(self.params, before, self.basis.names, self._dtype())
        c = coefficients(self.basis.coords(diff))
        fix = self.basis.combine(c)
        with torch.no_grad():
            for name, t in fix.items():
                p = self.params[name]
                p.copy_((p.to(t.dtype) - t).to(p.dtype))
        return c

    def on_update(self, model, step, before) -> None:
        with self.timed("project"):
            c = self.remove(before, lambda c: c)
            self.counters["removed_norm"] += float(c.norm())
