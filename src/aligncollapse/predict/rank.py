"""``aligncollapse rank``: rank candidate fine-tuning sets (and their examples) by predicted harm.

One pass per candidate, all at θ*: prospective scores (:mod:`aligncollapse.predict.prospective`) and the
first-order baselines (:mod:`aligncollapse.predict.baselines`). Candidates are ranked by one predictor
(default ``prospective_second_order``, the scan's forecast Δu at the budget) with its CI; each
set's examples are written to ``attribution/<set>.jsonl`` riskiest first, and with
``drop_fraction`` a filtered copy of the set without its riskiest examples, ready to re-scan.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from aligncollapse import distributed
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.data.loading import save_examples
from aligncollapse.errors import UserError
from aligncollapse.evaluation.metrics import KLReference
from aligncollapse.geometry.curvature import FinetuneLoss
from aligncollapse.models import apply_lora
from aligncollapse.predict.baselines import baseline_scores
from aligncollapse.predict.overlap import BlockFisher, state_of
from aligncollapse.predict.prospective import prospective_scores, scan_settings_for
from aligncollapse.progress import progress
from aligncollapse.results import atomic_write_text
from aligncollapse.scan.aic import ScanSettings
from aligncollapse.training.finetune import FinetuneConfig


@dataclass
class RankContext:
    """What every candidate is scored against (computed once at θ*)."""

    model: object
    tokenizer: object
    safety: list[Example]
    safety_set: EncodedSet
    fisher: BlockFisher
    base_state: dict  # merged weights at θ* for the OS modules
    kl_reference: KLReference  # alignment KL on the safety prompts (never the evaluation prompts)
    anchors: EncodedSet | None = None
    safe_anchors: EncodedSet | None = None  # the anchors' prompts with a refusal (He et al.'s bidirectional anchoring)
    unaligned_state: dict | None = None  # the pre-alignment model's weights (Safe-LoRA baseline)
    cache: dict = field(default_factory=dict)  # quantities shared by all candidates (anchor gradients)


def build_context(
    model, tokenizer, safety: Sequence[Example], cfg: FinetuneConfig, *, anchors=None, unaligned_model=None
) -> RankContext:
    fisher = BlockFisher.compute(
        model,
        tokenizer,
        safety,
        template=cfg.template,
        use_chat_template=cfg.use_chat_template,
        max_length=cfg.max_length,
    )
    enc = EncodedSet(
        tokenizer, safety, cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length
    )
    kl = KLReference(
        model, tokenizer, safety, cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length
    )
    anc = (
        EncodedSet(tokenizer, anchors, cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length)
        if anchors
        else None
    )
    safe_anc = None
    if anchors:
        from collections import Counter

        # the safety set's most common refusal (v2 has act-specific ones, which would name another act)
        refusal = Counter(e.response for e in safety if e.response).most_common(1)[0][0] if any(
            e.response for e in safety) else "I cannot help with that ."  # fmt: skip
        safe = [Example(prompt=e.prompt, response=refusal, messages=None, fields=e.fields) for e in anchors]
        safe_anc = EncodedSet(tokenizer, safe, cfg.template, use_chat_template=cfg.use_chat_template,
                              max_length=cfg.max_length)  # fmt: skip
    unaligned = state_of(unaligned_model, fisher.names) if unaligned_model is not None else None
    return RankContext(model, tokenizer, list(safety), enc, fisher, state_of(model, fisher.names), kl, anc, safe_anc,
                       unaligned)  # fmt: skip


def lora_copy(model, cfg: FinetuneConfig):
    """A LoRA-wrapped copy initialised exactly as :func:`finetune` would (same seed)."""
    torch.manual_seed(cfg.seed)
    return apply_lora(copy.deepcopy(model), cfg.lora)


def candidate_scores(
    ctx: RankContext, name: str, examples: Sequence[Example], cfg: FinetuneConfig, scan: ScanSettings | None = None,
    probe_steps: int = 3,
) -> dict:  # fmt: skip
    """Prospective scores (in the mode of ``cfg``: full or LoRA) and baselines for one candidate."""
    m = lora_copy(ctx.model, cfg) if cfg.lora is not None else ctx.model
    pro = prospective_scores(
        m, ctx.tokenizer, ctx.safety, examples, cfg, ctx.fisher, ctx.base_state, scan=scan,
        probe_steps=probe_steps, kl_reference=ctx.kl_reference,
    )  # fmt: skip
    ft = EncodedSet(
        ctx.tokenizer, examples, cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length
    )
    sel = ScanSettings().blocks.select(ctx.model)
    steps = cfg.total_steps(len(examples))
    ft_loss, g = FinetuneLoss(ctx.model, sel, ft, 32).value_and_grad()
    base = baseline_scores(
        ctx.model, sel, ft, ctx.safety_set, name=name, g=g, update_norm=pro["t"] * pro["aic"]["g_norm"],
        ft_loss=float(ft_loss), lr=cfg.lr, steps=steps, harmful_anchors=ctx.anchors, safe_anchors=ctx.safe_anchors,
        aligned_state=ctx.base_state if ctx.unaligned_state is not None else None, base_state=ctx.unaligned_state,
        seed=cfg.seed, cache=ctx.cache,
    )  # fmt: skip
    return {
        "name": name,
        "n_examples": len(examples),
        "scores": {**pro["scores"], **base["scores"]},
        "per_example": {**pro["per_example"], **base["per_example"]},
        "aic": pro["aic"],
        "overlap": pro["overlap"],
    }


def shared_fisher_samples(
    ctx: RankContext, sets: dict[str, Sequence[Example]], cfgs: Sequence[FinetuneConfig], scan: ScanSettings | None
) -> ScanSettings:
    """``scan`` with ``--fisher-samples auto`` resolved once for every candidate set and budget: the
    fewest label draws any set's sample-space plan allows, so every set's λ, γ and scores come from the
    same estimator. An integer, or sets that all take the exact scan, leave ``scan`` as it is. Under
    torchrun rank 0 plans (with its memory limit, which every rank then uses) and every rank takes its
    choice. Planning only: a LoRA budget plans on one adapter-wrapped copy of the model."""
    from aligncollapse.scan.aic import resolve_method
    from aligncollapse.scan.sample_space import auto_fisher_samples

    s = scan or ScanSettings()
    if s.fisher_samples != "auto":
        return s
    s = replace(s, max_memory=distributed.broadcast_object(s.max_memory))
    draws: list[int] = []
    if distributed.is_main():
        with distributed.solo():
            for cfg in cfgs:
                m = lora_copy(ctx.model, cfg) if cfg.lora is not None else ctx.model
                for exs in sets.values():
                    si = scan_settings_for(cfg, len(exs), s)
                    if resolve_method(m, ctx.tokenizer, ctx.safety, exs, si) == "sample":
                        draws.append(auto_fisher_samples(m, ctx.tokenizer, ctx.safety, exs, si))
                del m
    S = distributed.broadcast_object(min(draws) if draws else None)
    return s if S is None else replace(s, fisher_samples=S)


def run_rank(
    ctx: RankContext,
    candidates: dict[str, Sequence[Example]],
    out_dir: str | Path,
    cfg: FinetuneConfig,
    scan: ScanSettings | None = None,
    *,
    by: str = "prospective_second_order",
    probe_steps: int = 3,
    drop_fraction: float = 0.0,
) -> dict:
    """Score every candidate and rank them by ``by``; per-example attributions (and, with
    ``drop_fraction``, the filtered sets) are written under ``out_dir``.

    Under torchrun the candidates are dealt round-robin to the ranks, each rank scores its own as a
    one-process run (:func:`aligncollapse.distributed.solo`: the scans inside do not shard) and writes
    their attribution files, and the rows are gathered to every rank: the one-process payload, with
    ``world_size`` and which rank scored each candidate added."""
    out = Path(out_dir)
    (out / "attribution").mkdir(parents=True, exist_ok=True)
    scan = shared_fisher_samples(ctx, candidates, [cfg], scan)
    world, me = distributed.world_size(), distributed.rank()
    names = list(candidates)
    mine = names[me::world]
    rows = {}
    with distributed.solo():
        for name in progress(mine, desc="rank candidates"):
            rows[name] = _score_one(ctx, name, candidates[name], cfg, scan, by, probe_steps, drop_fraction, out)
            rows[name]["scored_by_rank"] = me
    if world > 1:
        merged = {k: v for part in distributed.gather_objects(rows) for k, v in part.items()}
        rows = {n: merged[n] for n in names}
    if by not in next(iter(rows.values()))["scores"]:
        raise UserError(f"--by {by!r} is not a score; choose from {sorted(next(iter(rows.values()))['scores'])}")
    memory_plans = {n: (r.get("aic") or {}).get("memory_plan") for n, r in rows.items()}
    undefined = [n for n in rows if rows[n]["scores"][by]["score"] is None]
    if len(undefined) == len(rows):
        raise UserError(
            f"--by {by}: undefined for every candidate ({rows[undefined[0]]['scores'][by].get('undefined')})"
        )
    # Candidates whose score is undefined are listed last (their row says why).
    ranking = sorted(
        rows, key=lambda n: (rows[n]["scores"][by]["score"] is None, -(rows[n]["scores"][by]["score"] or 0.0))
    )
    payload = {"by": by, "ranking": ranking, "candidates": rows, "mode": "lora" if cfg.lora else "full",
               "memory_plan": memory_plans, "world_size": world, "fisher_samples": scan.fisher_samples,
               "budget": {**cfg.to_json(), "steps": cfg.total_steps(1)}}  # fmt: skip
    return payload


def _score_one(ctx, name, exs, cfg, scan, by, probe_steps, drop_fraction, out: Path) -> dict:
    """One candidate's row (its attribution, and filtered set, written under ``out``)."""
    r = candidate_scores(ctx, name, exs, cfg, scan, probe_steps)
    if by not in r["scores"]:  # checked on the first candidate, before the others are scored
        raise UserError(f"--by {by!r} is not a score; choose from {sorted(r['scores'])}")
    r["attribution_path"] = write_attribution(out / "attribution" / f"{name}.jsonl", exs, r["per_example"])
    if drop_fraction > 0:
        order = np.argsort(-np.asarray(r["per_example"]["second_order"]))
        keep = sorted(order[int(round(drop_fraction * len(exs))) :].tolist())
        path = out / "filtered" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_examples(path, [exs[i] for i in keep])
        r["filtered_path"] = str(path.relative_to(out))
    r.pop("per_example")
    return r


def write_attribution(path: Path, examples: Sequence[Example], per_example: dict) -> str:
    """One JSON line per example, riskiest (largest second-order contribution) first."""
    second = np.asarray(per_example["second_order"])
    total = float(second.sum())
    order = np.argsort(-second)
    lines = []
    for rank, i in enumerate(order.tolist(), 1):
        row = {"rank": rank, "index": i, "prompt": examples[i].prompt, "response": examples[i].response}
        for k, v in per_example.items():
            row[k] = float(v[i])
        row["share_of_second_order"] = float(second[i]) / total if total else None
        lines.append(json.dumps(row))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return str(Path(path.parent.name) / path.name)
