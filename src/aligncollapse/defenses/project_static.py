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
  bytes). S ≥ 1 takes it from the Monte-Carlo Fisher with S label draws per safety prompt and
  stores it as the scores' factors (4·R·Σ(d_in + d_out) bytes, R = S·Σ safety tokens), so no d × n
  matrix exists.
* ``first_layer``, ``last_layer``, ``modules`` (``q+v+down``): restrict M to those blocks of the
  trainable parameters. The update of every other parameter is left as the optimiser made it.
  Memory and cost scale with n_B instead of n.

The projection runs one parameter block at a time: Vᵀ(θ̃ − θ_k) from each block's difference, then
θ_{k+1} = θ̃ − V c block by block, so no flat copy of the parameters exists.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aligncollapse.defenses.base import Defense, SafetyReference, trainable
from aligncollapse.defenses.basis import lanczos_basis, sampled_basis, select_blocks, split


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
        **options,
    ):
        extra = {k: v for k, v in (("samples", samples), ("first_layer", first_layer), ("last_layer", last_layer),
                                   ("modules", modules)) if v}  # fmt: skip
        super().__init__(ctx, d=d, **extra, **options)
        self.d, self.samples = d, samples
        self.first_layer, self.last_layer, self.modules = first_layer, last_layer, modules

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.params = trainable(model)
            self.blocks = select_blocks(self.params, model, self.first_layer, self.last_layer, self.modules)
            self.ref = SafetyReference.build(model, self.ctx)
            self.lam, self.basis = self.subspace(model)
        self.counters["removed_norm"] = 0.0
        self.counters["basis"] = "sampled" if self.samples else "lanczos"
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
            return sampled_basis(model, self.blocks, self.ref.data, self.d, self.samples, c.seed, c.batch_size,
                                 self._ghost)  # fmt: skip
        return lanczos_basis(model, self.blocks, self.ref.data, self.d, c.seed, c.batch_size)

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

    def remove(self, before, coefficients) -> None:
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
