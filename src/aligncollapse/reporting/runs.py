"""Reports of single runs: ``finetune``, ``eval``, ``demo`` and the organism's ``build`` / ``suite``."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.reporting.html import fmt, table, write_report
from aligncollapse.reporting.plots import plot_trajectories

SUMMARY_KEYS = ("harmful_refusal_rate", "harmful_compliance_rate", "judge_harmfulness", "benign_accuracy",
                "alignment_loss", "alignment_kl")  # fmt: skip


def summary_rows(named: dict[str, dict]) -> str:
    rows = [{"model / data": n, **{k: (s or {}).get(k) for k in SUMMARY_KEYS}} for n, s in named.items()]
    return table(rows, ["model / data", *SUMMARY_KEYS])


def render_finetune(out: Path, results: dict, src: Path | None = None) -> Path:
    cfg = results.get("config", {})
    data = " ".join(str((cfg.get("args") or {}).get("data") or "fine-tuning data").split())
    md = f"# Fine-tuning run: {data}\n\n"
    md += (
        f"> Status: **{results.get('status')}** after {results.get('steps_done')} of {results.get('steps_total')} steps"
    )
    md += f" ({fmt(results.get('seconds'))} s).\n\n"
    if results.get("trajectory"):
        plot_trajectories(
            {data: results["trajectory"]}, out / "trajectory.png", "alignment loss and refusal over steps"
        )
        md += "![trajectory](trajectory.png)\n\n"
    if results.get("summary"):
        md += "## Final evaluation (held-out prompts)\n\n" + summary_rows({data: results["summary"]})
    if results.get("defense"):
        md += f"Defense: `{results['defense']}`\n"
    return write_report(out, "report", md, f"finetune: {data}")


def render_eval(out: Path, results: dict, src: Path | None = None) -> Path:
    model = " ".join(str((results.get("config") or {}).get("model", "model")).split())
    md = f"# Safety evaluation: {model}\n\n" + summary_rows({model: {k: results.get(k) for k in SUMMARY_KEYS}})
    if results.get("alignment_kl_sequence") is not None:
        md += (
            f"Sequence-level KL (Lemma 3.2): {fmt(results['alignment_kl_sequence'])} ± "
            f"{fmt(results.get('alignment_kl_sequence_stderr'))} (standard error); the `alignment_kl` column is the "
            "greedy-path form.\n"
        )
    return write_report(out, "report", md, f"eval: {model}")


def render_demo(out: Path, results: dict, src: Path | None = None) -> Path:
    traj = {n: r["trajectory"] for n, r in results["finetuned"].items()}
    plot_trajectories(traj, out / "demo.png", "organism: fine-tuning trajectories")
    md = "# aligncollapse demo: the organism\n\n"
    md += (
        "A tiny aligned Llama (built here) is scanned before fine-tuning on a benign and a seemingly-benign set, then\n"
    )
    md += "fine-tuned on each with the alignment loss and refusal tracked.\n\n"
    md += "## Pre-flight scans\n\n"
    rows = []
    for name, sc in results["scan"].items():
        rows.append({"set": f"[{name}]({sc['report']})", "verdict": sc["verdict"], "‖Pg‖/‖g‖": sc["eps_orth_rel"],
                     "random": sc["eps_orth_random"], "γ": sc["gamma"], "γ random": sc["gamma_random"],
                     "forecast Δu at budget": sc.get("forecast_at_budget")})  # fmt: skip
    md += table(rows, list(rows[0])) if rows else ""
    md += "## Fine-tuning\n\n![demo](demo.png)\n\n"
    named = {"organism (aligned)": results["organism"]["summary"]}
    named.update({f"after {n}": r["summary"] for n, r in results["finetuned"].items()})
    md += summary_rows(named)
    return write_report(out, "report", md, "demo")


def render_organism(out: Path, results: dict, src: Path | None = None) -> Path:
    if "manifest" in results:
        md = "# Organism suite\n\n" + table(results["manifest"]["files"], ["name", "category", "size", "path"])
        return write_report(out, "report", md, "organism suite")
    meta = results.get("organism", {})
    md = f"# Organism ({meta.get('n_parameters', 0):,} parameters)\n\n"
    md += summary_rows({"aligned organism": results["evaluation"]["summary"]})
    if results.get("calibration"):
        md += f"Collapse threshold calibration: {results['calibration']}\n"
    return write_report(out, "report", md, "organism")
