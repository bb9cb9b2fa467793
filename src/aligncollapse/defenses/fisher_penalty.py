"""``fisher-penalty``: an EWC-style penalty on displacement into the safety subspace.

Adds  (λ_reg/2)·(θ − θ*)ᵀ F_M (θ − θ*),  F_M = B Λ Bᵀ the top-d part of the alignment-KL Fisher at
θ*, to the fine-tuning loss, i.e. λ_reg·B Λ Bᵀ(θ − θ*) to the gradient before each optimiser
step. ½(θ − θ*)ᵀF(θ − θ*) is the second-order prediction of the alignment KL Δu (nats per
sequence), so λ_reg prices one predicted nat of safety loss against the fine-tuning loss.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.base import Defense, SafetyReference, flat, safety_subspace, trainable


class FisherPenalty(Defense):
    name = "fisher-penalty"

    def __init__(self, ctx, d: int = 16, strength: float = 1.0, **options):
        super().__init__(ctx, d=d, strength=strength, **options)
        self.d, self.strength = d, strength

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.params = trainable(model)
            ref = SafetyReference.build(model, self.ctx)
            self.lam, B = safety_subspace(model, self.params, ref.data, self.d, self.ctx.seed, self.ctx.batch_size)
            self.theta0 = flat(self.params.values()).to(torch.float64)
            self.B, self.lam = B.to(self.theta0.device), self.lam.to(self.theta0.device)
        self.counters["last_penalty"] = 0.0

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """Setup as ``project-static:samples=0`` over all trainable parameters (Lanczos); held, the
        dense basis and θ* (d·n·8 + n·8); per step the flat θ, its coordinates' correction and the
        gradient term (3·n·8)."""
        from aligncollapse.geometry.memory import activation_bytes

        z = self.safety_sizes()
        N, T, V, n, b = z["N"], z["T"], shape.vocab, shape.n, shape.dtype_bytes
        a = max(b, 4)
        Bs = max(1, min(self.ctx.batch_size, N))
        ncv = min(n, max(2 * self.d + 1, 20))
        host = (ncv + self.d + 4) * n * 8  # ARPACK's arrays live on the host (scipy)
        setup = host + 3 * n * a
        setup += 3 * activation_bytes(shape, Bs, T) + 3 * Bs * T * V * 4
        return {"setup": setup, "setup_host": host, "held": (self.d + 1) * n * 8, "transient": 3 * n * 8,
                "inputs": {"N": N, "T": T, "d": self.d}}  # fmt: skip

    def on_gradients(self, model, step) -> None:
        with self.timed("penalty"):
            c = self.B.T @ (flat(self.params.values()).to(torch.float64) - self.theta0)
            self.counters["last_penalty"] = 0.5 * self.strength * float((self.lam * c * c).sum())
            g = self.strength * (self.B @ (self.lam * c))
            off = 0
            for p in self.params.values():
                add = g[off : off + p.numel()].reshape(p.shape).to(p.dtype)
                p.grad = add.clone() if p.grad is None else p.grad + add
                off += p.numel()
