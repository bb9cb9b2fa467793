"""``project-tracking``: project updates off the *current* safety subspace.

Like ``project-static``, but the basis is re-estimated at the current θ_k every ``refresh_every``
steps, by the same method as at θ* (``samples=0``: Lanczos on the alignment-KL GGN
J_θᵀ(diag p_θ − p_θ p_θᵀ)J_θ over the safety reference; ``samples=S``: the sampled Fisher's factors).
The update is then projected off span(V_static ∪ V_current): the subspace at θ* and where it has
rotated to (App B: ‖P(θ) − P(θ*)‖ ≤ 2 L_F ‖θ − θ*‖ / Λ). The measured rotation, the sine of the
largest principal angle between the initial and the current basis, is recorded.

Memory at a refresh: dense, the initial and current bases, their concatenation and its QR
(6·d·n_B·8 bytes); factored, the initial and current factors and their concatenation (4·Fac at
the peak, 3·Fac held after) and the union's Gram. See :meth:`ProjectTracking.memory_terms`.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.project_static import ProjectStatic


class ProjectTracking(ProjectStatic):
    name = "project-tracking"

    def __init__(self, ctx, d: int = 16, refresh_every: int = 10, **options):
        super().__init__(ctx, d=d, refresh_every=refresh_every, **options)
        self.refresh_every = refresh_every

    def setup(self, model) -> None:
        super().setup(model)
        self.basis0 = self.basis
        self.rotation: list[dict] = []
        self.counters["refreshes"] = 0

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """``project-static``'s terms (held H, setup S), with the refresh: held, the initial basis and the
        union's (3·H); transient at a refresh, a new setup (S) beside the initial basis, then the current
        basis, and the concatenation and QR (dense, 3·H more) or the concatenated factors (factored,
        with the union's Gram, 3·(2NS)²·8)."""
        t = super().memory_terms(model, shape, seq_len)
        H = t["held"]
        extra = (
            0 if t["inputs"].get("storage", "dense") == "dense" else 3 * (2 * t["inputs"]["N"] * self.samples) ** 2 * 8
        )
        t["transient"] = max(t["transient"], t["setup"] - H, 3 * H + extra)
        t["held"] = 3 * H
        return t

    @property
    def B0(self) -> torch.Tensor:
        """The dense initial basis (n_B × d, float64): only for ``samples=0``."""
        return self.basis0.V

    def on_update(self, model, step, before) -> None:
        super().on_update(model, step, before)
        if step % self.refresh_every == 0:
            with self.timed("refresh"):
                self.basis = None  # the previous union is released before the new basis is found
                _, current = self.subspace(model)
                s = torch.linalg.svdvals(self.basis0.overlap(current)).clamp(max=1.0)
                self.rotation.append({"step": step, "sin_max_angle_to_initial": float(torch.sqrt(1 - s.min() ** 2))})
                self.basis = self.basis0.union(current)
                self.counters["refreshes"] += 1
                self.counters["basis_bytes"] = self.basis.nbytes() + self.basis0.nbytes()

    def info(self) -> dict:
        out = super().info()
        out["rotation"] = self.rotation
        return out
