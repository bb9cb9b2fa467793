"""Prospective harm scores, computed at θ* before any training, with per-example attribution.

With t = η·steps, D g and D H D g the (preconditioned) fine-tuning gradient and curvature term of
the scan (:mod:`aligncollapse.scan.aic`) and F the model-sampled Fisher of the alignment KL:

* ``prospective_first_order``  = ½ t² gᵀF g: Δu of the first-order update q₁ = −t·D g;
* ``prospective_second_order`` = the scan's forecast Δu at the budget: q₂ = −t·D g + ½t²·D H D g,
  ½ q₂ᵀ F q₂ plus the mini-batch noise term; ``prospective_second_order_flow`` without the noise;
* ``prospective_second_order_bounded``: ½ q₂ᵀF q₂ with q₂ clipped to |q₂ᵢ| ≤ η·steps for AdamW
  (Adam moves a coordinate by at most about η per step, a bound the fixed-preconditioner model of
  the scan ignores; for SGD it equals the flow forecast); ``_os``: its Overlap Score;
* ``prospective_gamma``: the curvature coupling γ = ‖F^{1/2} P H g‖ of the AIC (with Adam's D);
* ``prospective_gamma_flow`` / ``prospective_first_order_flow``: γ and ½t² gᵀF g in the
  optimiser-free gradient-flow geometry (D = I), properties of model and data alone;
* ``*_os``: the paper's Overlap Score (block-wise empirical Fisher, exact) of the merged ΔW that
  q₁ / q₂ would produce (for LoRA the merged adapter update, ΔB·ΔA product included);
* ``prospective_probe_kl`` / ``prospective_probe_os``: a short probe — the measured alignment KL
  and the OS of ΔW after ``probe_steps`` real optimiser steps (a few percent of the budget).

Attribution: the flow forecast is a quadratic form in the sum of per-example vectors
v_n = −t u_n + ½t² h_n (Σ u_n = D g, Σ h_n = D H D g), so c_n = ½ v_nᵀ F v sums exactly to it:
c_n = ½[t² u_nᵀFg − ½t³ (u_nᵀFHg + h_nᵀFg) + ¼t⁴ h_nᵀFHg]; first-order: c_n = ½ t² u_nᵀF g.
An example with a large c_n pushes the trajectory into the safety-sensitive directions.

CIs over the fine-tuning examples: a linearised bootstrap (infinitesimal jackknife): with
multinomial resampling weights w, S(w) ≈ S + Σ_n (w_n − 1)·2c_n, F and the normalisation held fixed.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from aligncollapse.data.examples import Example
from aligncollapse.evaluation.metrics import KLReference
from aligncollapse.predict.overlap import BlockFisher, displaced_delta, overlap_scores, weight_delta
from aligncollapse.scan.aic import ScanSettings, measure_aic
from aligncollapse.training.finetune import FinetuneConfig, finetune


def example_contributions(per_example: dict, t: float) -> dict[str, np.ndarray]:
    """Per-example c_n of the first-order and second-order (flow) forecasts at time t."""
    uFg, uFHg = np.asarray(per_example["u_Fg"]), np.asarray(per_example["u_FHg"])
    hFg, hFHg = np.asarray(per_example["h_Fg"]), np.asarray(per_example["h_FHg"])
    first = 0.5 * t**2 * uFg
    second = 0.5 * (t**2 * uFg - 0.5 * t**3 * (uFHg + hFg) + 0.25 * t**4 * hFHg)
    return {"first_order": first, "second_order": second}


def linearised_ci(contrib: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of Σ c_n under example resampling, to first order in the weights."""
    m = len(contrib)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    s = contrib.sum() + (w - 1.0) @ (2.0 * contrib)
    lo, hi = np.quantile(s, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _with_ci(value: float, contrib: np.ndarray, seed: int) -> dict:
    """The CI of Σ c_n, shifted by any constant the score adds to it (the mini-batch noise term)."""
    lo, hi = linearised_ci(contrib, seed=seed)
    shift = float(value) - float(contrib.sum())
    return {"score": float(value), "ci_low": lo + shift, "ci_high": hi + shift}


def scan_settings_for(cfg: FinetuneConfig, n_examples: int, base: ScanSettings | None = None) -> ScanSettings:
    """The scan settings that forecast this fine-tuning budget."""
    s = copy.copy(base or ScanSettings())
    s.optimizer, s.lr, s.steps = cfg.optimizer, cfg.lr, cfg.total_steps(n_examples)
    s.ft_batch_size, s.seed = cfg.batch_size, cfg.seed
    s.template, s.use_chat_template, s.max_length = cfg.template, cfg.use_chat_template, cfg.max_length
    return s


def prospective_scores(
    model,
    tokenizer,
    safety: Sequence[Example],
    finetune_set: Sequence[Example],
    cfg: FinetuneConfig,
    fisher: BlockFisher,
    base_state: dict,
    *,
    scan: ScanSettings | None = None,
    probe_steps: int = 3,
    kl_reference: KLReference | None = None,
    projected=None,
) -> dict:
    """Every prospective score for one candidate set (``model`` at θ*; LoRA-wrapped for LoRA).

    ``base_state`` holds the merged weights at θ* for the modules of ``fisher`` (the OS base).
    Returns ``{"scores", "per_example", "aic", "overlap"}``; the model is left unchanged.
    """
    s = scan_settings_for(cfg, len(finetune_set), scan)
    steps = s.steps
    t = s.lr * steps
    aic = measure_aic(model, tokenizer, safety, finetune_set, s)
    vec = aic.pop("update_vectors")
    aic.pop("basis")
    params = s.blocks.select(model)
    g, Hg = vec["g"], vec["Hg"]
    q1 = -t * g
    q2 = -t * g + 0.5 * t**2 * Hg
    names = fisher.names
    os1 = overlap_scores(displaced_delta(model, params, q1, base_state, names), fisher, projected)
    os2 = overlap_scores(displaced_delta(model, params, q2, base_state, names), fisher, projected)
    # Adam moves each coordinate by at most about η per step: bound the forecast update to |q_i| ≤ η·steps.
    q2b = q2.clamp(-t, t) if s.optimizer == "adamw" else q2
    Fq2b = vec["fisher"].matvec(q2b.to(vec["fisher"].dtype)).to(torch.float64)
    bounded = 0.5 * float(q2b.to(torch.float64) @ Fq2b)
    os2b = overlap_scores(displaced_delta(model, params, q2b, base_state, names), fisher, projected)
    contrib = example_contributions(aic["per_example"], t)
    fc = aic["forecast"]
    i_budget = fc["steps"].index(steps) if steps in fc["steps"] else int(np.searchsorted(fc["steps"], steps))
    flow = float(fc["delta_u_flow"][i_budget])
    scores = {
        "prospective_first_order": _with_ci(0.5 * t**2 * aic["quadratic_forms"]["gFg"], contrib["first_order"], s.seed),
        "prospective_second_order": _with_ci(fc["at_budget"], contrib["second_order"], s.seed),
        "prospective_second_order_flow": _with_ci(flow, contrib["second_order"], s.seed),
        "prospective_gamma_flow": {"score": aic["flow_geometry"]["gamma"]},
        "prospective_first_order_flow": {"score": 0.5 * t**2 * aic["flow_geometry"]["gFg"]},
        "prospective_second_order_bounded": {"score": bounded},
        "prospective_second_order_bounded_os": {"score": os2b["exact"]["total"]},
        "prospective_gamma": {"score": aic["gamma"], **_ci_of(aic["ci"]["gamma"])},
        "prospective_first_order_os": {"score": os1["exact"]["total"]},
        "prospective_second_order_os": {"score": os2["exact"]["total"]},
    }
    if "projected" in os1:
        scores["prospective_first_order_os_projected"] = {"score": os1["projected"]["total"]}
        scores["prospective_second_order_os_projected"] = {"score": os2["projected"]["total"]}
    if probe_steps > 0:
        probe = run_probe(model, tokenizer, finetune_set, cfg, probe_steps, fisher, base_state, kl_reference, projected)
        scores["prospective_probe_kl"] = {"score": probe["kl"]}
        scores["prospective_probe_os"] = {"score": probe["overlap"]["exact"]["total"]}
    return {
        "scores": scores,
        "per_example": {k: v.tolist() for k, v in contrib.items()},
        "aic": aic,
        "overlap": {"first_order": os1, "second_order": os2},
        "t": t,
    }


def _ci_of(c: dict) -> dict:
    return {"ci_low": c["ci_low"], "ci_high": c["ci_high"]}


def run_probe(
    model, tokenizer, finetune_set, cfg: FinetuneConfig, probe_steps, fisher, base_state, kl_reference, projected
):
    """``probe_steps`` real optimiser steps on a copy: the measured KL and the OS of its ΔW."""
    m = copy.deepcopy(model)
    pcfg = copy.deepcopy(cfg)
    pcfg.steps, pcfg.epochs, pcfg.checkpoint_every, pcfg.lora = probe_steps, None, 0, None
    with tempfile.TemporaryDirectory() as tmp:
        res = finetune(m, tokenizer, finetune_set, tmp, pcfg, final_eval=False, save_model=False, resume=False)
    m = res["model"]
    out = {
        "overlap": overlap_scores(weight_delta(m, base_state, fisher.names), fisher, projected),
        "steps": probe_steps,
    }
    out["kl"] = kl_reference(m) if kl_reference is not None else None
    return out
