"""``curvature``: remove the predicted second-order drift into the safety subspace, P·H·g.

The scan's forecast: along θ(t) − θ* ≈ −t g + (t²/2) H g the displacement inside M is
P(θ(t) − θ*) ≈ −t P g + (t²/2) P H g, and when P g ≈ 0 (property 2) the alignment KL grows through
the second term alone, Δu ≈ (t⁴/8)(Hg)ᵀ P F P (Hg) (γ²/8, Thm 6.1). This defense removes exactly
that term, refreshed as the trajectory moves: every ``every`` steps, at the current θ_k and before
the optimiser step, it takes the mini-batch fine-tuning gradient g_k (the one the optimiser is about
to use), one Hessian-vector product h_k = H_k g_k of the fine-tuning loss on a rotating batch of
``ft_batch`` training examples, and the drift's coordinates in M, c_k = Bᵀ h_k (B the top-d
eigenvectors of the alignment-KL Fisher at θ*, as in the scan). The last ``memory`` directions
c_k/‖c_k‖ are orthonormalised (Q, d×m) and every update is projected off span(B Q):

    Δ ← Δ − B Q Qᵀ Bᵀ Δ.

B is ``project-static``'s basis, with its options: ``samples=S`` takes it from the sampled Fisher and
keeps it factored, and ``first_layer``/``last_layer``/``modules`` restrict it to those blocks.

With ``weighted=1`` the direction is the drift's effect on the alignment gradient over the whole
space instead, F(θ_k) h_k (one Gauss-Newton product of the alignment KL at θ_k on a rotating batch of
``safety_batch`` safety prompts): the second-order term moves the alignment gradient along F·H·g,
including the Fisher's tail outside M that ``project-static`` leaves open. The last m of these
(n-vectors, m·n float64) are orthonormalised and the update is projected off their span.

It removes m ≤ d directions of M, chosen by the fine-tuning loss's curvature, where
``project-static:d=m`` removes the m sharpest directions of M whatever the data does and ``ogd``
removes m alignment-gradient directions; those are its controls (same number of directions).

Under AdamW the optimiser's own drift is D·H·D·g (D Adam's preconditioner, as in the scan); this
defense uses the plain H·g of the mini-batch gradient — the gradient-flow form of the drift — since
the defense does not see the optimiser's moments (stated approximation).

Cost per refresh: one HVP over ``ft_batch`` examples (≈ 2 backward passes) plus d dot products.
Memory: the basis B (as ``project-static``: d·n_B float64 dense, or the factors), the drift coordinates
(m·d numbers), and the HVP's g and h (2·n float64) with one HVP's activations.
"""

from __future__ import annotations

import random

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.defenses.base import assign, flat
from aligncollapse.defenses.basis import split
from aligncollapse.defenses.ogd import project_off
from aligncollapse.defenses.project_static import ProjectStatic
from aligncollapse.errors import UserError
from aligncollapse.geometry.curvature import GGNOperator, HessianOperator


class CurvatureDrift(ProjectStatic):
    name = "curvature"

    def __init__(
        self,
        ctx,
        d: int = 16,
        memory: int = 4,
        every: int = 1,
        ft_batch: int = 16,
        weighted: int = 0,
        safety_batch: int = 16,
        **options,
    ):
        if memory > d and not weighted:
            raise UserError(f"defense option curvature:memory ({memory}) must be at most curvature:d ({d})")
        if weighted not in (0, 1):
            raise UserError(f"defense option curvature:weighted must be 0 (P·H·g) or 1 (F·H·g), got {weighted}")
        super().__init__(ctx, d=d, memory=memory, every=every, ft_batch=ft_batch, weighted=weighted,
                         safety_batch=safety_batch, **options)  # fmt: skip
        self.memory, self.every, self.ft_batch = memory, every, ft_batch
        self.weighted, self.safety_batch = bool(weighted), safety_batch
        self.train: list = []

    def prepare_data(self, train):
        self.train = list(train)
        return self.train

    def setup(self, model) -> None:
        super().setup(model)
        with self.timed("setup"):
            if not self.train:
                raise UserError("the curvature defense needs the fine-tuning data (it forms H·g on it)")
            order = list(range(len(self.train)))
            random.Random(self.ctx.seed).shuffle(order)
            c = self.ctx
            self.chunks = [
                EncodedSet(c.tokenizer, [self.train[i] for i in order[s : s + self.ft_batch]], c.template,
                           use_chat_template=c.use_chat_template, max_length=c.max_length)
                for s in range(0, len(order), self.ft_batch)
            ]  # fmt: skip
            n = len(self.ref.data)
            self.safety_chunks = [self.ref.data.subset(range(s, min(s + self.safety_batch, n)))
                                  for s in range(0, n, self.safety_batch)]  # fmt: skip
        self.coords: list[torch.Tensor] = []  # P·H·g: coordinates in M (d numbers each)
        self.dirs: list[torch.Tensor] = []  # F·H·g: n-vectors
        self.calls = 0
        self.counters["hessian_vector_products"] = 0
        self.drift_in_M: list[float] = []  # ‖P h_k‖/‖h_k‖ at each refresh

    def on_gradients(self, model, step: int) -> None:
        if step % self.every:
            return
        with self.timed("drift"):
            g = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params.values()]
            ).detach()
            data = self.chunks[self.calls % len(self.chunks)]
            self.calls += 1
            h = HessianOperator(model, self.params, data, self.ctx.batch_size).matvec(g).to(torch.float64)
            c = self.basis.coords(split(self.params, h))
            self.counters["hessian_vector_products"] += 1
            if float(h.norm()) > 0:
                self.drift_in_M.append(float(c.norm()) / float(h.norm()))
            if self.weighted:
                chunk = self.safety_chunks[(self.calls - 1) % len(self.safety_chunks)]
                v = GGNOperator(model, self.params, chunk, self.ctx.batch_size, per="sequence").matvec(h.to(g.dtype))
                v = v.to(torch.float64)
                if float(v.norm()) > 0:
                    self.dirs = (self.dirs + [v / v.norm()])[-self.memory :]
            elif float(c.norm()) > 0:
                self.coords = (self.coords + [c / c.norm()])[-self.memory :]

    def on_update(self, model, step, before) -> None:
        if not (self.coords or self.dirs):
            return
        with self.timed("project"):
            if self.weighted:
                old = flat(before.values()).to(torch.float64)
                delta = flat(self.params.values()).to(torch.float64) - old
                assign(self.params, old + project_off(delta, self.dirs))
            else:
                Q, _ = torch.linalg.qr(torch.stack(self.coords, dim=1))  # d×m
                self.counters["removed_norm"] += float(self.remove(before, lambda c: Q @ (Q.T @ c)).norm())

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """``project-static``'s terms, and per drift step the HVP over ``ft_batch`` examples: g (n·b),
        h (n·8), the product's vectors (4·n·a) and its double backward (3·act(min(ft_batch, batch)) at
        the fine-tuning length); with ``weighted=1`` also the m directions (m·n·8), the GGN product
        (3·n·a + 3·act(min(safety_batch, batch))) and the flat update and its projection (2·n·8)."""
        from aligncollapse.geometry.memory import activation_bytes

        t = super().memory_terms(model, shape, seq_len)
        n, b = shape.n, shape.dtype_bytes
        a = max(b, 4)
        fb = max(1, min(self.ft_batch, self.ctx.batch_size))
        hvp = n * b + n * 8 + 4 * n * a + 3 * activation_bytes(shape, fb, seq_len)
        if self.weighted:
            sb = max(1, min(self.safety_batch, self.ctx.batch_size))
            t["held"] += self.memory * n * 8
            hvp += 3 * n * a + 3 * activation_bytes(shape, sb, t["inputs"]["T"]) + 2 * n * 8
        t["transient"] = max(t["transient"], hvp)
        return t

    def info(self) -> dict:
        out = super().info()
        d = self.drift_in_M
        out["drift_in_M_fraction"] = {"first": d[0], "last": d[-1], "mean": sum(d) / len(d)} if d else None
        return out
