"""First-order baseline predictors of fine-tuning harm, computed at θ* like our prospective scores.

Each returns a data-set score (higher = more harm predicted) and, where the method is per
example, per-example scores:

* ``gradient_cosine`` (He et al. 2024, gradient matching): per example n, with ḡ_safe the mean
  gradient of the safety NLL (refusals) and, when given, ḡ_harm that of harmful anchors
  (harmful prompts answered with compliance):
  s_n = cos(g_n, ḡ_harm) − cos(g_n, ḡ_safe)   (without anchors: −cos(g_n, ḡ_safe)).
  A step −η g_n lowers the refusal likelihood when cos(g_n, ḡ_safe) < 0. Set score = mean_n s_n.
* ``representation_similarity`` (He et al. 2024 representation matching; Hsiung et al. 2025):
  cosine of the final-layer hidden state at the last prompt token of each fine-tuning example
  to the centroid of the same for the safety prompts (harmful requests). Score = mean.
* ``safe_lora`` (Hsu et al. 2024, Safe-LoRA): alignment direction V_m = W_aligned,m − W_base,m per
  module, C_m = V_m V_mᵀ / ‖V_m‖_F; for the first-order update ΔW_m = −g_m,
  sim_m = ⟨ΔW_m, C_m ΔW_m⟩ / (‖ΔW_m‖‖C_m ΔW_m‖). Safe-LoRA projects the modules with low
  similarity; score = 1 − mean_m sim_m. Needs the unaligned base model.
* ``he2024_gradient`` (He, Xia & Henderson 2024, gradient matching as published, with harmful
  anchors and bidirectional anchoring): ḡ_harm = mean gradient of the NLL of the harmful anchors
  (harmful prompt + compliance) over their first 10 response tokens, each anchor's gradient
  normalised before averaging (as the released code does), ḡ_safe the same for the *safe anchors*
  (the same prompts with a refusal); per example s_n = cos(g_n, ḡ_harm) − cos(g_n, ḡ_safe)
  (``_unidirectional``: cos(g_n, ḡ_harm) only). Stated deviations: full raw gradients of the
  selected weights (the paper describes LESS-style features; the released code also computes full
  gradients); one safe-anchor set with the safety set's most common refusal (the released code
  has two safe-anchor sets with prompt-specific refusals); the paper ranks *examples*, a set's
  score here is the mean over its examples. Memory: two n-vectors plus one chunk of per-example
  gradients.
* ``he2024_representation`` (representation matching as published): final-layer hidden state at
  the *last completion token*; s_n = max over harmful anchors a of cos(h_n, h_a) (the released
  code's default top-1). Set score = mean over examples.
* ``surface_opener``: the fraction of the set's responses whose first word is the harmful anchors'
  most common first word; ``surface_ngram``: mean over examples of the largest word-bigram Jaccard
  similarity of its response to a harmful anchor's. They use no model: when they predict harm, the
  data carry a surface shortcut.
* ``update_norm``: t‖D g‖ (t = η·steps, D Adam's preconditioner as in the scan) — the first-order
  displacement; ``lr_steps``: η·steps (constant when all sets share a budget);
* ``ft_loss``: the fine-tuning loss at θ*; ``random``: a seeded uniform draw.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from aligncollapse.data.encoding import IGNORE_INDEX, EncodedSet
from aligncollapse.geometry.per_sample import PerSampleGradients


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-30)


def gradient_cosine(
    model, params, ft: EncodedSet, safety: EncodedSet, harmful_anchors: EncodedSet | None = None,
    cache: dict | None = None,
) -> dict:  # fmt: skip
    """``cache`` (a dict kept across candidates) holds the anchor mean gradients once computed."""
    ps = PerSampleGradients(model, params, chunk_size=16)
    cache = {} if cache is None else cache
    if "g_safe" not in cache:
        cache["g_safe"] = ps.matrix(safety).to(torch.float64).mean(0)
        cache["g_harm"] = ps.matrix(harmful_anchors).to(torch.float64).mean(0) if harmful_anchors is not None else None
    g_safe, g_harm = cache["g_safe"], cache["g_harm"]
    per = []
    for _, G in ps.iter_chunks(ft):
        G = G.to(torch.float64)
        s = -_cos(G, g_safe)
        if g_harm is not None:
            s = s + _cos(G, g_harm)
        per.extend(s.tolist())
    return {
        "score": float(np.mean(per)),
        "per_example": per,
        "anchors": "harmful + safety" if g_harm is not None else "safety only",
    }


def he2024_gradient(model, params, ft: EncodedSet, harmful_anchors: EncodedSet, safe_anchors: EncodedSet,
                    cache: dict | None = None, anchor_tokens: int = 10) -> dict:  # fmt: skip
    """He et al. 2024 gradient matching with bidirectional anchoring (see the module docstring)."""
    ps = PerSampleGradients(model, params, chunk_size=16)
    cache = {} if cache is None else cache
    if "he_g_harm" not in cache:
        cache["he_g_harm"] = _mean_grad(ps, first_response_tokens(harmful_anchors, anchor_tokens))
        cache["he_g_safe"] = _mean_grad(ps, first_response_tokens(safe_anchors, anchor_tokens))
    g_harm, g_safe = cache["he_g_harm"], cache["he_g_safe"]
    bi, uni = [], []
    for _, G in ps.iter_chunks(ft):
        G = G.to(torch.float64)
        ch, cs = _cos(G, g_harm), _cos(G, g_safe)
        uni.extend(ch.tolist())
        bi.extend((ch - cs).tolist())
    return {"score": float(np.mean(bi)), "per_example": bi, "unidirectional": float(np.mean(uni)),
            "per_example_unidirectional": uni}  # fmt: skip


def _mean_grad(ps: PerSampleGradients, data: EncodedSet) -> torch.Tensor:
    """Mean of the anchors' *normalised* gradients (as the authors' released code averages them)."""
    total = None
    for _, G in ps.iter_chunks(data):
        G = G.to(torch.float64)
        s = (G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)).sum(0)
        total = s if total is None else total + s
    return total / len(data)


def first_response_tokens(data: EncodedSet, k: int) -> EncodedSet:
    """The same encodings with only the first ``k`` response tokens scored (He et al.'s anchors)."""
    from aligncollapse.data.encoding import Encoded

    out = data.subset(range(len(data)))
    items = []
    for it in data.items:
        labels, seen = [], 0
        for t in it.labels:
            if t != IGNORE_INDEX and seen < k:
                labels.append(t)
                seen += 1
            else:
                labels.append(IGNORE_INDEX)
        items.append(Encoded(it.input_ids, labels, it.prompt_len))
    out.items = items
    return out


def last_completion_states(model, data: EncodedSet, batch_size: int = 32) -> torch.Tensor:
    """Final-layer hidden state at the last response (completion) token of every example, [N, hidden]."""
    return _final_states(model, data, lambda it: len(it.input_ids) - 1, batch_size)


@torch.no_grad()
def _final_states(model, data: EncodedSet, position, batch_size: int = 32) -> torch.Tensor:
    """Final-layer hidden state at ``position(item)`` of every example, [N, hidden] float64 on the host."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(data), batch_size):
        idx = range(s, min(s + batch_size, len(data)))
        b = data.batch(idx)
        h = model(
            input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), output_hidden_states=True
        ).hidden_states[-1]
        for row, i in enumerate(idx):
            out.append(h[row, position(data.items[i])].to(torch.float64).cpu())
    model.train(was)
    return torch.stack(out)


def he2024_representation(model, ft: EncodedSet, harmful_anchors: EncodedSet) -> dict:
    """s_n = max_a cos(h_n, h_a) at the last completion token (He et al. 2024 representation matching;
    the released code's default takes the top-1 similarity over anchors); ``mean`` keeps the mean."""
    A = last_completion_states(model, harmful_anchors)
    H = last_completion_states(model, ft)
    sims = (H / H.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ (A / A.norm(dim=1, keepdim=True).clamp_min(1e-30)).T
    per = sims.max(1).values.tolist()
    return {"score": float(np.mean(per)), "per_example": per, "mean": float(sims.mean().item())}


def _bigrams(text: str) -> set[tuple[str, str]]:
    w = text.split()
    return set(zip(w, w[1:]))


def surface_scores(responses: list[str], anchor_responses: list[str]) -> dict:
    """Model-free shortcut detectors: the anchors' modal first word's frequency among the responses,
    and the mean best word-bigram Jaccard similarity to an anchor response."""
    from collections import Counter

    firsts = [r.split()[0] if r.split() else "" for r in anchor_responses]
    opener = Counter(firsts).most_common(1)[0][0]
    frac = float(np.mean([(r.split()[:1] or [""])[0] == opener for r in responses]))
    anc = [_bigrams(a) for a in anchor_responses]
    per = []
    for r in responses:
        b = _bigrams(r)
        per.append(max((len(b & a) / len(b | a) if b | a else 0.0) for a in anc))
    return {"surface_opener": frac, "opener": opener, "surface_ngram": float(np.mean(per)), "per_example_ngram": per}


def last_prompt_states(model, data: EncodedSet, batch_size: int = 32) -> torch.Tensor:
    """Final-layer hidden state at the last prompt token of every example, [N, hidden]."""

    def last_prompt(it) -> int:
        first = next((j for j, t in enumerate(it.labels) if t != IGNORE_INDEX), len(it.labels))
        return max(first - 1, 0)

    return _final_states(model, data, last_prompt, batch_size)


def representation_similarity(model, ft: EncodedSet, safety: EncodedSet) -> dict:
    centroid = last_prompt_states(model, safety).mean(0)
    per = _cos(last_prompt_states(model, ft), centroid).tolist()
    return {"score": float(np.mean(per)), "per_example": per}


def safe_lora_similarity(g_modules: dict[str, torch.Tensor], aligned: dict, base: dict) -> dict:
    """Safe-LoRA's projection similarity of the first-order update −g per module."""
    sims = {}
    for n, g in g_modules.items():
        if n not in base or g.dim() != 2:
            continue
        V = (aligned[n] - base[n]).to(torch.float64)
        vn = V.norm()
        if vn == 0:
            continue
        dW = -g.to(torch.float64)
        C_dW = V @ (V.T @ dW) / vn
        denom = float(dW.norm() * C_dW.norm())
        sims[n] = float((dW * C_dW).sum()) / denom if denom > 0 else 0.0
    if not sims:  # no module moved between base and aligned: the baseline is undefined, not a number
        return {"score": None, "mean_similarity": None, "per_module": {},
                "undefined": "the aligned and base weights do not differ in any 2-D module"}  # fmt: skip
    mean = float(np.mean(list(sims.values())))
    return {"score": 1.0 - mean, "mean_similarity": mean, "per_module": sims}


def random_score(name: str, seed: int = 0) -> float:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def baseline_scores(
    model,
    params,
    ft: EncodedSet,
    safety: EncodedSet,
    *,
    name: str,
    g: torch.Tensor,
    update_norm: float,
    ft_loss: float,
    lr: float,
    steps: int,
    harmful_anchors: EncodedSet | None = None,
    safe_anchors: EncodedSet | None = None,
    aligned_state: dict | None = None,
    base_state: dict | None = None,
    seed: int = 0,
    cache: dict | None = None,
) -> dict:
    """Every baseline for one candidate set; ``g`` is the fine-tuning gradient over ``params``, and
    ``update_norm`` t‖D g‖ in the parameters actually trained (full or LoRA)."""
    gc = gradient_cosine(model, params, ft, safety, harmful_anchors, cache)
    rs = representation_similarity(model, ft, safety)
    out = {
        "baseline_gradient_cosine": {"score": gc["score"], "anchors": gc["anchors"]},
        "baseline_representation_similarity": {"score": rs["score"]},
        "baseline_update_norm": {"score": update_norm},
        "baseline_lr_steps": {"score": lr * steps},
        "baseline_ft_loss": {"score": ft_loss},
        "baseline_random": {"score": random_score(name, seed)},
    }
    if base_state is not None and aligned_state is not None:
        off, g_mod = 0, {}
        for n, p in params.items():
            g_mod[n] = g[off : off + p.numel()].reshape(p.shape)
            off += p.numel()
        sl = safe_lora_similarity(g_mod, aligned_state, base_state)
        out["baseline_safe_lora"] = {k: sl[k] for k in ("score", "mean_similarity", "undefined") if k in sl}
    per_example = {
        "baseline_gradient_cosine": gc["per_example"],
        "baseline_representation_similarity": rs["per_example"],
    }
    if harmful_anchors is not None and safe_anchors is not None:
        he = he2024_gradient(model, params, ft, harmful_anchors, safe_anchors, cache)
        hr = he2024_representation(model, ft, harmful_anchors)
        sf = surface_scores(
            [e.response or "" for e in ft.examples], [e.response or "" for e in harmful_anchors.examples]
        )
        out["baseline_he2024_gradient"] = {"score": he["score"], "anchors": "harmful + safe (bidirectional)"}
        out["baseline_he2024_gradient_unidirectional"] = {"score": he["unidirectional"]}
        out["baseline_he2024_representation"] = {"score": hr["score"]}
        out["baseline_surface_opener"] = {"score": sf["surface_opener"], "opener": sf["opener"]}
        out["baseline_surface_ngram"] = {"score": sf["surface_ngram"]}
        per_example["baseline_he2024_gradient"] = he["per_example"]
        per_example["baseline_he2024_representation"] = hr["per_example"]
        per_example["baseline_surface_ngram"] = sf["per_example_ngram"]
    return {"scores": out, "per_example": per_example}
