"""``curvature``: project off M and also off the look-ahead alignment gradient (second-order aware).

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
import torch.nn.functional as F

from aligncollapse.data.encoding import IGNORE_INDEX
from aligncollapse.defenses.base import assign, flat
from aligncollapse.defenses.project_static import ProjectStatic
from aligncollapse.losses import upcast


class CurvatureAware(ProjectStatic):
    name = "curvature"

    def __init__(self, ctx, d: int = 16, every: int = 2, safety_batch: int = 16, memory: int = 4, **options):
        super().__init__(ctx, d=d, every=every, safety_batch=safety_batch, memory=memory, **options)
        self.every, self.safety_batch, self.memory = every, safety_batch, memory

    def setup(self, model) -> None:
        super().setup(model)
        with self.timed("setup"):
            data = self.ref.data
            n = len(data)
            self.chunks = [range(s, min(s + self.safety_batch, n)) for s in range(0, n, self.safety_batch)]
            self.ref_lp = []
            was = model.training
            model.eval()
            with torch.no_grad():
                for idx in self.chunks:
                    b = data.batch(idx)
                    self.ref_lp.append(self._logprobs(model, b))
            model.train(was)
        self.dirs: list[torch.Tensor] = []
        self.calls = 0
        self.counters["lookahead_gradients"] = 0

    @staticmethod
    def _logprobs(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.log_softmax(upcast(logits[:, :-1]), -1)

    def _alignment_gradient(self, model) -> torch.Tensor:
        c = self.calls % len(self.chunks)
        self.calls += 1
        b = self.ref.data.batch(self.chunks[c])
        mask = (b["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1)
        was = model.training
        model.eval()
        lq = self._logprobs(model, b)
        lp = self.ref_lp[c]
        kl = ((lp.exp() * (lp - lq)) * mask).sum() / b["input_ids"].shape[0]
        grads = torch.autograd.grad(kl, list(self.params.values()), allow_unused=True)
        model.train(was)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params.values())]
        )

    def on_update(self, model, step, before) -> None:
        with self.timed("project"):
            old = flat(before.values())
            delta = self._project_out(flat(self.params.values()) - old).to(torch.float64)
        if (step - 1) % self.every == 0:
            with self.timed("lookahead"):
                assign(self.params, old + delta)
                a = self._alignment_gradient(model).to(torch.float64)
                a = a - self.B @ (self.B.T @ a)
                if float(a.norm()) > 0:
                    self.dirs = (self.dirs + [a / a.norm()])[-self.memory :]
                self.counters["lookahead_gradients"] += 1
        with self.timed("project"):
            if self.dirs:
                Q, _ = torch.linalg.qr(torch.stack(self.dirs, dim=1))
                delta = delta - Q @ (Q.T @ delta)
            assign(self.params, old + delta)
