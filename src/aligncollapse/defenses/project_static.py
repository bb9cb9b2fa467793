"""``project-static``: the first-order baseline defense.

M = span of the top-d eigenvectors B (orthonormal, n×d) of the alignment-KL Fisher at θ*,
computed once. Every optimiser update is projected off M after the step:

    θ_{k+1} = θ_k + (I − B Bᵀ)(θ̃_{k+1} − θ_k)

where θ̃_{k+1} is what the optimiser (SGD or AdamW) proposed — projecting the update rather than
the gradient keeps the displacement exactly orthogonal to M under Adam's rescaling too. The theory
(paper §3.3) predicts this delays but does not prevent collapse: M rotates along the trajectory and
the alignment loss is also sensitive outside the top-d directions.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.base import Defense, SafetyReference, assign, flat, safety_subspace, trainable


class ProjectStatic(Defense):
    name = "project-static"
    wants_update = True

    def __init__(self, ctx, d: int = 16, **options):
        super().__init__(ctx, d=d, **options)
        self.d = d

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.params = trainable(model)
            self.ref = SafetyReference.build(model, self.ctx)
            self.lam, self.B = safety_subspace(
                model, self.params, self.ref.data, self.d, self.ctx.seed, self.ctx.batch_size
            )
        self.counters["removed_norm"] = 0.0

    def _project_out(self, delta: torch.Tensor) -> torch.Tensor:
        d64 = delta.to(torch.float64)
        coeff = self.B.T @ d64
        self.counters["removed_norm"] += float(coeff.norm())
        return (d64 - self.B @ coeff).to(delta.dtype)

    def on_update(self, model, step, before) -> None:
        with self.timed("project"):
            old = flat(before.values())
            new = flat(self.params.values())
            assign(self.params, old + self._project_out(new - old))
