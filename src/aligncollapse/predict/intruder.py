"""Intruder dimensions of a fine-tuned weight (Shuttleworth et al. 2025, "LoRA vs full fine-tuning:
an illusion of equivalence").

For a pre-trained weight W0 = U0 S0 V0ᵀ and the fine-tuned W1 = W0 + ΔW = U1 S1 V1ᵀ, the j-th of the
top-k left singular vectors of W1 is an *intruder* when its largest cosine similarity to every
left singular vector of W0 is below ε:  max_i |⟨u1_j, u0_i⟩| < ε. Full fine-tuning rarely creates
them; LoRA does, and the paper (§7.2) blames them for the failure of its Overlap Score on LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def intruders(W0: torch.Tensor, W1: torch.Tensor, top_k: int = 10, threshold: float = 0.5) -> dict:
    """Count intruder dimensions among the top-``top_k`` singular vectors of ``W1``."""
    U0 = torch.linalg.svd(W0.to(torch.float64), full_matrices=False)[0]
    U1, S1, _ = torch.linalg.svd(W1.to(torch.float64), full_matrices=False)
    k = min(top_k, U1.shape[1])
    max_cos = (U1[:, :k].T @ U0).abs().max(dim=1).values
    flags = max_cos < threshold
    return {
        "n_intruders": int(flags.sum()),
        "max_cos": [round(float(x), 4) for x in max_cos],
        "intruder_ranks": [int(i) for i in torch.nonzero(flags).flatten()],
        "intruder_singular_values": [float(S1[i]) for i in torch.nonzero(flags).flatten()],
    }


def intruder_report(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], top_k: int = 10, threshold: float = 0.5
) -> dict:
    """Intruder dimensions per module (``delta`` holds ΔW under the base weights' names)."""
    per_module = {n: intruders(base[n], base[n] + delta[n], top_k, threshold) for n in delta}
    return {
        "top_k": top_k,
        "threshold": threshold,
        "total": sum(v["n_intruders"] for v in per_module.values()),
        "modules_with_intruders": sum(v["n_intruders"] > 0 for v in per_module.values()),
        "per_module": per_module,
    }
