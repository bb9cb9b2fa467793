"""``ogd-lookahead``: project off M and also off the look-ahead alignment gradient.

(Named ``curvature`` up to v0.2; it never forms H or H·g, so it is orthogonal gradient descent on
the look-ahead alignment gradient, and the name now belongs to :mod:`.curvature`.)

Static projection keeps θ − θ* ⊥ M, but the alignment KL still rises: its gradient at θ,
∇Δu(θ) = F(θ − θ*) + O(‖θ − θ*‖²), is the curvature-coupled drift (for the unprojected trajectory
θ − θ* ≈ −t g + ½t² H g, so ∇Δu ≈ F(−t g + ½t² Hg) — the P·H·g acceleration and its echo outside
the top-d directions), and M itself rotates. This defense removes, from every update, both its M
component and its component along the *look-ahead* alignment gradient

    a_k = ∇Δu(θ_k + Δ⊥) = ∇Δu(θ_k) + F Δ⊥ + O(‖Δ‖²),

evaluated exactly by one backward pass of the alignment KL at the proposed point (cheaper than an
HVP and exact to all orders), on a rotating batch of ``safety_batch`` safety prompts, every
``every`` steps (the curvature budget). The last ``memory`` look-ahead directions (projected off M,
orthonormalised) are kept and the update is projected off their span, as in orthogonal gradient
descent:  Δ ← (I − QQᵀ)(I − BBᵀ)Δ.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.base import assign, flat
from aligncollapse.defenses.ogd import AlignmentGradient, project_off
from aligncollapse.defenses.project_static import ProjectStatic


class OGDLookahead(ProjectStatic):
    name = "ogd-lookahead"

    def __init__(self, ctx, d: int = 16, every: int = 2, safety_batch: int = 16, memory: int = 4, **options):
        super().__init__(ctx, d=d, every=every, safety_batch=safety_batch, memory=memory, **options)
        self.every, self.safety_batch, self.memory = every, safety_batch, memory

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """``project-static``'s terms plus :class:`~aligncollapse.defenses.ogd.AlignmentGradient`'s and the
        m look-ahead directions' (as ``ogd``)."""
        from aligncollapse.defenses.ogd import alignment_gradient_terms

        t = super().memory_terms(model, shape, seq_len)
        g = alignment_gradient_terms(self, shape, self.memory, self.safety_batch)
        return {"setup": t["setup"] + g["setup"], "held": t["held"] + g["held"],
                "transient": max(t["transient"], g["transient"]), "inputs": t["inputs"]}  # fmt: skip

    def setup(self, model) -> None:
        super().setup(model)
        with self.timed("setup"):
            self.align = AlignmentGradient(model, self.ref, self.params, self.safety_batch)
        self.dirs: list[torch.Tensor] = []
        self.counters["lookahead_gradients"] = 0

    def on_update(self, model, step, before) -> None:
        with self.timed("project"):
            old = flat(before.values())
            delta = self._project_out(flat(self.params.values()) - old).to(torch.float64)
        if (step - 1) % self.every == 0:
            with self.timed("lookahead"):
                assign(self.params, old + delta)
                a = self.align(model)[0].to(torch.float64)
                a = self._project_out(a, count=False)
                if float(a.norm()) > 0:
                    self.dirs = (self.dirs + [a / a.norm()])[-self.memory :]
                self.counters["lookahead_gradients"] += 1
        with self.timed("project"):
            assign(self.params, old + project_off(delta, self.dirs))
