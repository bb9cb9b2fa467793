"""Overlap scores: how much of a weight update lands in the safety skill's curved directions.

The paper's Overlap Score (§7.2), per linear module m with update ΔW_m:

    OS_m = vec(ΔW_m)ᵀ F̂_m vec(ΔW_m),     F̂_m = (1/N) Σ_n g_{n,m} g_{n,m}ᵀ

the block-wise empirical Fisher of the safety NLL (safe responses to harmful prompts) at θ*,
cross-module blocks ignored. Two variants of F̂_m share one interface (``overlap_score(delta)``):

* :class:`BlockFisher` (exact): the per-sample gradients g_{n,m}, held factored, so
  OS_m = (1/N) Σ_n (g_{n,m} · vec ΔW_m)²;
* :class:`aligncollapse.geometry.projection.ProjectedFisher` (the paper's): the same after a Rademacher
  projection R_m to k dimensions, OS_m = (1/N) Σ_n (R g_{n,m} · R vec ΔW_m)².

Normalised (Rayleigh-quotient) form: OS_m / ‖vec ΔW_m‖² (projected: / ‖R vec ΔW_m‖²), which
separates direction from magnitude (our suggestion; the paper reports raw OS). A layer's score is
the mean over its modules (the paper's Fig 3); the total is the sum over modules.

For LoRA the update is the merged ΔW = (α/r)·B A under the base model's weight names.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.geometry.projection import linear_weights
from aligncollapse.models import BlockSelection, merged_state

_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


class BlockFisher:
    """Exact block-wise empirical Fisher of the safety NLL over linear-module weights, held factored.

    Example n's gradient at module m is g_{n,m} = Σ_t δ_t a_tᵀ (output gradients δ, inputs a), so
    g_{n,m} · vec ΔW_m = Σ_t δ_tᵀ ΔW_m a_t comes from the factors
    (:class:`aligncollapse.geometry.ghost.GhostGradients`) without forming g_{n,m}. Memory:
    4·R·Σ_m (d_in + d_out) bytes for R safety tokens (float32 factors; 8 for a float64 model), not the
    N·Σ_m d_in·d_out of the gradient rows: 6.8 GB instead of 234 GB for N = 60 prompts of 40 tokens on
    a Llama-3.2-1B shape. One OS costs R·Σ_m d_in·d_out multiply-adds.
    """

    kind = "exact"

    def __init__(self, ghost, factors):
        self.ghost, self.factors = ghost, factors

    @classmethod
    def compute(
        cls,
        model,
        tokenizer,
        safety: Sequence[Example],
        selection: BlockSelection | None = None,
        template: str = "raw",
        use_chat_template: bool | None = None,
        max_length: int = 512,
        chunk_size: int = 16,
    ) -> BlockFisher:
        from aligncollapse.geometry.ghost import GhostGradients
        from aligncollapse.losses import nll_from_logits

        weights = linear_weights(model, selection)
        data = EncodedSet(tokenizer, safety, template, use_chat_template=use_chat_template, max_length=max_length)
        ghost = GhostGradients(model, weights)
        dev = next(model.parameters()).device

        def batches():
            for start in range(0, len(data), chunk_size):
                b = data.batch(range(start, min(start + chunk_size, len(data))))
                yield {k: v.to(dev) for k, v in b.items()}, lambda logits, b: nll_from_logits(logits, b["labels"])

        return cls(ghost, ghost.collect(batches(), count=len(data)))

    def nbytes(self) -> int:
        """The bytes the factors hold."""
        return self.factors.nbytes()

    @property
    def names(self) -> list[str]:
        return list(self.ghost.params)

    def overlap_score(self, delta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """OS_m = (1/N) Σ_n (g_{n,m} · vec ΔW_m)² for every module in ``delta``."""
        out = {}
        for n in self.names:
            if n in delta:
                out[n] = float(self.ghost.dot(self.factors, {n: delta[n]}).pow(2).mean())
        return out

    def squared_norms(self, delta: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {n: float(delta[n].pow(2).sum()) for n in self.names if n in delta}


def projected_squared_norms(pf, delta: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖R_m vec ΔW_m‖² per module for a :class:`~aligncollapse.geometry.projection.ProjectedFisher`."""
    return {n: float(b.project(delta[n]).pow(2).sum()) for n, b in pf.blocks.items() if n in delta}


def summarize(os_per_module: Mapping[str, float], sq_norms: Mapping[str, float]) -> dict:
    """Per-module raw and normalised OS, per-layer means, and totals."""
    modules = {
        n: {"os": v, "os_normalised": v / sq_norms[n] if sq_norms.get(n, 0.0) > 0 else 0.0, "layer": layer_of(n)}
        for n, v in os_per_module.items()
    }
    layers: dict[int, list[str]] = {}
    for n, m in modules.items():
        if m["layer"] is not None:
            layers.setdefault(m["layer"], []).append(n)
    per_layer = {
        str(k): {
            "os": sum(modules[n]["os"] for n in v) / len(v),
            "os_normalised": sum(modules[n]["os_normalised"] for n in v) / len(v),
        }
        for k, v in sorted(layers.items())
    }
    total = sum(os_per_module.values())
    norm2 = sum(sq_norms.get(n, 0.0) for n in os_per_module)
    return {
        "total": total,
        "total_normalised": total / norm2 if norm2 > 0 else 0.0,
        "per_layer": per_layer,
        "per_module": modules,
    }


def overlap_scores(delta: Mapping[str, torch.Tensor], exact: BlockFisher | None = None, projected=None) -> dict:
    """Exact and/or projected OS of one update, summarised (see :func:`summarize`)."""
    out = {}
    if exact is not None:
        out["exact"] = summarize(exact.overlap_score(delta), exact.squared_norms(delta))
    if projected is not None:
        out["projected"] = summarize(projected.overlap_score(delta), projected_squared_norms(projected, delta))
    return out


def weight_delta(model, base_state: Mapping[str, torch.Tensor], names: Sequence[str]) -> OrderedDict:
    """ΔW = W_now − W_base for ``names`` (LoRA adapters merged first: ΔW = (α/r)·B A)."""
    now = merged_state(model)
    return OrderedDict((n, (now[n].to(torch.float32) - base_state[n].to(torch.float32))) for n in names)


def state_of(model, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A copy of the (merged) weights ``names`` (the base for :func:`weight_delta`)."""
    st = merged_state(model)
    return {n: st[n].clone() for n in names}


def displaced_delta(model, params: Mapping[str, torch.nn.Parameter], step: torch.Tensor, base_state, names):
    """The merged ΔW the trainable parameters would give if moved by the flat vector ``step``.

    For full fine-tuning this is ``step`` itself, reshaped; for LoRA it is the merged update of the
    moved adapter, (α/r)(B+ΔB)(A+ΔA) − (α/r)BA, including the ΔB·ΔA product.
    """
    off = 0
    saved = {}
    with torch.no_grad():
        for n, p in params.items():
            saved[n] = p.detach().clone()
            p.add_(step[off : off + p.numel()].reshape(p.shape).to(p.dtype))
            off += p.numel()
    try:
        return weight_delta(model, base_state, names)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
