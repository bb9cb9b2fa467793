"""Reports of ``rank`` and ``study`` runs, rendered from their results.json (and the study's
``base_eval.json``, the unfine-tuned model's per-prompt evaluation kept beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aligncollapse.predict.study import harm_matrix
from aligncollapse.reporting.html import fmt, table, write_report
from aligncollapse.reporting.plots import plot_layer_overlap, plot_predicted_vs_measured, plot_ranking


def render_rank(out: Path, results: dict, src: Path | None = None) -> Path:
    rows, ranking, by = results["candidates"], results["ranking"], results["by"]
    plot_ranking({n: rows[n]["scores"][by] for n in ranking}, out / "ranking.png", by)
    budget = results.get("budget", {})
    md = "# Candidate ranking by predicted harm\n\n"
    md += (
        f"Ranked by `{by}` (mode: {results['mode']}, {budget.get('optimizer')} lr {budget.get('lr')}, "
        f"{budget.get('steps')} steps).\n\n![ranking](ranking.png)\n\n"
    )
    keys = [by, "prospective_first_order", "prospective_gamma", "baseline_gradient_cosine",
            "baseline_representation_similarity"]  # fmt: skip
    keys = list(dict.fromkeys(keys))
    md += table(
        [{"set": n, **{k: rows[n]["scores"].get(k, {}).get("score") for k in keys},
          "AIC verdict": rows[n].get("aic", {}).get("verdict")} for n in ranking],
        ["set", *keys, "AIC verdict"],
    )  # fmt: skip
    md += "Per-example attribution (riskiest first): `attribution/<set>.jsonl`.\n"
    return write_report(out, "report", md, "rank")


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def render_study(out: Path, results: dict, src: Path | None = None) -> Path:
    base_path = (src or out) / "base_eval.json"
    base_eval = json.loads(base_path.read_text()) if base_path.is_file() else None
    modes = results["modes"]
    summ = results["summary"]
    figures = []
    if base_eval is not None:
        pts, curves = {}, {}
        for mode, r in modes.items():
            best = summ[mode].get("primary_predictor") or "prospective_second_order"
            pts[mode] = {}
            for name, s in r["sets"].items():
                m = harm_matrix(s["runs"], base_eval, "refusal_drop").mean(1)
                pts[mode][name] = (s["prospective"][best]["score"], float(m.mean()), float(m.min()), float(m.max()))
            curves[mode] = {
                name: {k: float(np.mean([run["audit"]["per_layer_os"][k] for run in s["runs"]]))
                       for k in s["runs"][0]["audit"]["per_layer_os"]}
                for name, s in r["sets"].items()
            }  # fmt: skip
        plot_predicted_vs_measured(
            pts, out / "predicted_vs_measured.png", "best prospective score (per mode)", "refusal drop (seed range)"
        )
        plot_layer_overlap(curves, out / "layer_overlap.png")
        figures = ["![scatter](predicted_vs_measured.png)", "![layers](layer_overlap.png)"]
    md = "# Validation study: predicted vs measured harm\n\n"
    md += f"Seeds: {results['seeds']}. Base model: {results['base']}\n\n" + "\n\n".join(figures) + "\n\n"
    md += "## Table 1 shape: mean judge harmfulness (keyword refusal) per set\n\n"
    first = next(iter(modes.values()))["sets"]
    rows = []
    for n in first:
        row = {"set": n, "category": first[n].get("category")}
        for mode, r in modes.items():
            runs = r["sets"][n]["runs"]
            j = [x["summary"].get("judge_harmfulness") for x in runs]
            row[f"{mode} judge"] = float(np.mean(j)) if all(v is not None for v in j) else None
            row[f"{mode} refusal"] = float(np.mean([x["summary"]["harmful_refusal_rate"] for x in runs]))
            row[f"{mode} audit OS"] = float(np.mean([x["audit"]["scores"]["audit_os"] for x in runs]))
        rows.append(row)
    md += table(rows, list(rows[0]))
    for mode, corr in results["correlations"].items():
        sm = summ[mode]
        if "primary_predictor" in sm:
            sp = sm.get("spearman") or {}
            md += (f"\n## Preregistered result ({mode})\n\n**{sm['primary_predictor']}** vs **{sm['primary_measure']}** over "
                   f"{sm['n_sets']} sets: Spearman ρ = {_f(sp.get('value'))} [{_f(sp.get('ci_low'))}, {_f(sp.get('ci_high'))}], "
                   f"one-sided permutation p = {fmt(sm.get('permutation_p_greater'))}, Holm p = {fmt(sm.get('p_holm'))}; "
                   f"published baselines: {sm.get('published_baselines_spearman')}; criterion met in this organism: "
                   f"{sm.get('criterion_met_in_this_organism')}.\n")  # fmt: skip
        measures = [m for m in (sm.get("primary_measure"), "refusal_drop", "alignment_kl") if m]
        for h in dict.fromkeys(measures):
            md += (f"\n## Every predictor vs {h} ({mode}; Spearman with a CI resampling sets, seeds and prompts; "
                   "permutation p two-sided; Holm within its family; leave-one-set-out range)\n\n")  # fmt: skip
            crow = []
            for p in sorted(corr):
                c = corr[p].get(h)
                if not c:
                    continue
                sp = c["spearman"]
                lo = c.get("loso") or {}
                crow.append({"predictor": p, "spearman": sp["value"], "ci": f"[{_f(sp['ci_low'])}, {_f(sp['ci_high'])}]",
                             "permutation_p": c.get("permutation_p"), "p_holm": c.get("p_holm"),
                             "loso": f"[{_f(lo.get('min'))}, {_f(lo.get('max'))}]"})  # fmt: skip
            md += table(crow, ["predictor", "spearman", "ci", "permutation_p", "p_holm", "loso"])
    return write_report(out, "report", md, "study")
