"""``safe-lora``: post-hoc projection onto the alignment direction (Hsu et al. 2024, Safe-LoRA).

Per linear module, V = W_aligned − W_unaligned and C = V Vᵀ / ‖V‖_F. With the fine-tuning update
ΔW (LoRA merged: (α/r)·B A), the similarity sim = ⟨ΔW, CΔW⟩_F / (‖ΔW‖_F ‖CΔW‖_F) is computed and
modules with sim < ``threshold`` get ΔW ← CΔW (for LoRA: B ← C B). Needs the unaligned base model
(the organism ships one). ``threshold`` is fixed a priori (0.5), not tuned on the reported data.
"""

from __future__ import annotations

import torch

from aligncollapse.defenses.base import Defense
from aligncollapse.errors import UserError
from aligncollapse.models import is_peft


class SafeLoRA(Defense):
    name = "safe-lora"
    post_hoc = True

    def __init__(self, ctx, threshold: float = 0.5, **options):
        super().__init__(ctx, threshold=threshold, **options)
        self.threshold = threshold
        if ctx.unaligned_state is None:
            raise UserError("safe-lora needs the unaligned base model (--base-model; the organism has one)")

    def setup(self, model) -> None:
        with self.timed("setup"):
            self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """θ* of every 2-D parameter (Σ numel·b), held from setup; at the end, per module, V, C = VVᵀ/‖V‖
        and the update and its projection in float64 (4·d_out·max(d_out, d_in)·8 at most)."""
        mats = [p for p in model.parameters() if p.dim() == 2]
        held = sum(p.numel() * p.element_size() for p in mats)
        work = max((4 * p.shape[0] * max(p.shape) * 8 for p in mats), default=0)
        return {"setup": held, "held": held, "transient": work, "inputs": {"matrices": len(mats)}}

    def _C(self, base_name: str):
        aligned = self.theta0.get(base_name)
        unaligned = self.ctx.unaligned_state.get(_plain(base_name))
        if aligned is None or unaligned is None:
            return None
        V = (aligned - unaligned).to(torch.float64)
        vn = V.norm()
        return None if vn == 0 else (V @ V.T) / vn

    @torch.no_grad()
    def finalize(self, model):
        with self.timed("finalize"):
            sims, projected = {}, 0
            if is_peft(model):
                for name, mod in model.named_modules():
                    if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer")):
                        continue
                    for key in mod.lora_A:
                        C = self._C(f"{name}.base_layer.weight")
                        if C is None:
                            continue
                        A, B = mod.lora_A[key].weight, mod.lora_B[key].weight
                        dW = (B @ A).to(torch.float64) * mod.scaling[key]
                        sim = _similarity(dW, C @ dW)
                        sims[name] = sim
                        if sim < self.threshold:
                            B.copy_((C @ B.to(torch.float64)).to(B.dtype))
                            projected += 1
            else:
                for name, p in model.named_parameters():
                    C = self._C(name) if name in self.theta0 else None
                    if C is None or "embed" in name or "lm_head" in name:
                        continue
                    dW = (p - self.theta0[name]).to(torch.float64)
                    sim = _similarity(dW, C @ dW)
                    sims[name] = sim
                    if sim < self.threshold:
                        p.copy_((self.theta0[name].to(torch.float64) + C @ dW).to(p.dtype))
                        projected += 1
            self.counters["modules_projected"] = projected
            self.counters["modules_seen"] = len(sims)
            self.counters["mean_similarity"] = sum(sims.values()) / len(sims) if sims else None
        return model


def _similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 1.0


def _plain(name: str) -> str:
    """peft's ``base_model.model.X.base_layer.weight`` -> ``X.weight`` (the plain model's name)."""
    name = name.replace(".base_layer.", ".")
    return name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
