"""``project-tracking``: project updates off the *current* safety subspace.

Like ``project-static``, but B is re-estimated at the current θ_k (Lanczos on the alignment-KL
GGN J_θᵀ(diag p_θ − p_θ p_θᵀ)J_θ over the safety reference) every ``refresh_every`` steps, and the
update is projected off span(B_static ∪ B_current) — the subspace at θ* and where it has rotated
to (App B: ‖P(θ) − P(θ*)‖ ≤ 2 L_F ‖θ − θ*‖ / Λ). The measured rotation (sine of the largest
principal angle between successive bases) is recorded.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.base import safety_subspace
from aligncollapse.defenses.project_static import ProjectStatic


class ProjectTracking(ProjectStatic):
    name = "project-tracking"

    def __init__(self, ctx, d: int = 16, refresh_every: int = 10, **options):
        super().__init__(ctx, d=d, refresh_every=refresh_every, **options)
        self.refresh_every = refresh_every

    def setup(self, model) -> None:
        super().setup(model)
        self.B0 = self.B
        self.rotation: list[dict] = []
        self.counters["refreshes"] = 0

    def on_update(self, model, step, before) -> None:
        super().on_update(model, step, before)
        if step % self.refresh_every == 0:
            with self.timed("refresh"):
                _, Bt = safety_subspace(model, self.params, self.ref.data, self.d, self.ctx.seed, self.ctx.batch_size)
                s = torch.linalg.svdvals(self.B0.T @ Bt).clamp(max=1.0)
                self.rotation.append({"step": step, "sin_max_angle_to_initial": float(torch.sqrt(1 - s.min() ** 2))})
                Q, _ = torch.linalg.qr(torch.cat([self.B0, Bt], dim=1))
                self.B = Q
                self.counters["refreshes"] += 1

    def info(self) -> dict:
        out = super().info()
        out["rotation"] = self.rotation
        return out
