"""``ogd``: orthogonal gradient descent on the alignment gradient at the current point (a control).

Every ``every`` steps, before the optimiser step, the gradient of the alignment KL
a_k = ∇Δu(θ_k), Δu(θ) = (1/|b|) Σ_{x∈b} Σ_t KL(π_θ*(·|x, y*<t) ‖ π_θ(·|x, y*<t)), is computed on a rotating
batch b of ``safety_batch`` safety prompts (θ*'s greedy responses y*, as in the scan); the last
``memory`` such directions are orthonormalised (Q, n×m) and every update is projected off their span,
Δ ← (I − QQᵀ)Δ. Nothing else: no projection off the Fisher subspace M, no look-ahead, no H. It is the
control that isolates what :mod:`.ogd_lookahead` (look-ahead) and :mod:`.curvature` (P·H·g) add, with
the same number of removed directions. At θ* the alignment KL and its gradient vanish, so a
direction is kept only once the batch's KL exceeds ``1e-6`` nats per sequence.

Memory: the m directions, m·n float64 on the parameters' device, plus θ*'s log-probabilities
of the safety prompts (N·T·V float32 on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligncollapse.data.encoding import IGNORE_INDEX
from aligncollapse.defenses.base import Defense, SafetyReference, assign, flat, trainable
from aligncollapse.losses import upcast

MIN_KL = 1e-6  # nats per sequence: below it the alignment gradient is rounding noise at θ*


class AlignmentGradient:
    """∇ of the alignment KL on rotating safety batches, against θ*'s log-probabilities (taken at setup)."""

    def __init__(self, model, ref: SafetyReference, params, batch: int):
        self.ref, self.params = ref, params
        n = len(ref.data)
        self.chunks = [range(s, min(s + batch, n)) for s in range(0, n, batch)]
        was = model.training
        model.eval()
        with torch.no_grad():
            self.ref_lp = [self.logprobs(model, ref.data.batch(idx)) for idx in self.chunks]
        model.train(was)
        self.calls = 0

    @staticmethod
    def logprobs(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.log_softmax(upcast(logits[:, :-1]), -1)

    def __call__(self, model) -> tuple[torch.Tensor, float]:
        """(the flat gradient over ``params``, the batch's KL in nats per sequence)."""
        c = self.calls % len(self.chunks)
        self.calls += 1
        b = self.ref.data.batch(self.chunks[c])
        mask = (b["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1)
        was = model.training
        model.eval()
        lq = self.logprobs(model, b)
        lp = self.ref_lp[c]
        kl = ((lp.exp() * (lp - lq)) * mask).sum() / b["input_ids"].shape[0]
        grads = torch.autograd.grad(kl, list(self.params.values()), allow_unused=True)
        model.train(was)
        flat_g = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params.values())]
        )
        return flat_g, float(kl.detach())


def alignment_gradient_terms(defense, shape, memory: int, safety_batch: int) -> dict:
    """The memory of :class:`AlignmentGradient` and of projecting off m flat directions (see
    :meth:`OGD.memory_terms`)."""
    from aligncollapse.geometry.memory import activation_bytes

    z = defense.safety_sizes()
    N, T, V, n, b = z["N"], z["T"], shape.vocab, shape.n, shape.dtype_bytes
    lp = N * T * V * 4
    sb = max(1, min(safety_batch, N))
    transient = 4 * n * 8 + 3 * n * b + 2 * activation_bytes(shape, sb, T) + 2 * sb * T * V * 4
    return {"setup": lp + sb * T * V * 8, "held": lp + memory * n * 8, "transient": transient,
            "inputs": {"N": N, "T": T, "memory": memory}}  # fmt: skip


def project_off(delta: torch.Tensor, dirs: list[torch.Tensor]) -> torch.Tensor:
    """(I − QQᵀ) Δ with Q an orthonormal basis of ``dirs`` (float64)."""
    if not dirs:
        return delta
    Q, _ = torch.linalg.qr(torch.stack(dirs, dim=1))
    return delta - Q @ (Q.T @ delta)


class OGD(Defense):
    name = "ogd"
    wants_update = True

    def __init__(self, ctx, memory: int = 4, every: int = 1, safety_batch: int = 16, **options):
        super().__init__(ctx, memory=memory, every=every, safety_batch=safety_batch, **options)
        self.memory, self.every, self.safety_batch = memory, every, safety_batch

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.params = trainable(model)
            self.ref = SafetyReference.build(model, self.ctx)
            self.align = AlignmentGradient(model, self.ref, self.params, self.safety_batch)
        self.dirs: list[torch.Tensor] = []
        self.counters["alignment_gradients"] = 0
        self.counters["directions_kept"] = 0

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """θ*'s log-probabilities of every safety prompt (N·T·V·4, kept by :class:`AlignmentGradient`)
        at setup and held, with the m directions (m·n·8); per step the flat update, its copies and
        projection (4·n·8 + 2·n·b), the KL's gradient (n·b) and its backward
        (2·act(min(safety_batch, N)): the graph and the backward's buffers; 2·B·T·V·4 for the
        log-softmaxes)."""
        return alignment_gradient_terms(self, shape, self.memory, self.safety_batch)

    def on_gradients(self, model, step: int) -> None:
        if step % self.every:
            return
        with self.timed("alignment_gradient"):
            a, kl = self.align(model)
            a = a.to(torch.float64)
            self.counters["alignment_gradients"] += 1
            if kl > MIN_KL and float(a.norm()) > 0:
                self.dirs = (self.dirs + [a / a.norm()])[-self.memory :]
                self.counters["directions_kept"] += 1

    def on_update(self, model, step, before) -> None:
        with self.timed("project"):
            old = flat(before.values()).to(torch.float64)
            delta = flat(self.params.values()).to(torch.float64) - old
            assign(self.params, old + project_off(delta, self.dirs))
