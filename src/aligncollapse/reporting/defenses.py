"""Report of a defense study (``study --defenses``), rendered from its results.json."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.reporting.html import table, write_report
from aligncollapse.reporting.plots import plot_defenses


def render_defenses(out: Path, results: dict, src: Path | None = None) -> Path:
    plot_defenses(results["trajectories"], out / "defenses.png")
    b = results.get("budget", {})
    md = "# Defense study\n\n![defenses](defenses.png)\n\n"
    if b:
        md += f"Budget: {b.get('optimizer')} lr {b.get('lr')}, {b.get('steps')} steps, batch {b.get('batch_size')}; "
    md += f"seeds {results.get('seeds')}.\n\n"
    tun = results.get("tuning")
    if tun:
        sp = tun["split"]
        md += (
            f"## Tuning (development split)\n\nEvery defense was tuned on **{sp['development_set']}** (not a reported set), "
            f"scored on {sp['development_prompts']} development prompts; every row below is scored on the other "
            f"{sp['test_prompts']} (test) prompts. Rule, fixed before the runs: {tun['criterion']}. Matched controls "
            f"(as many directions as the tuned curvature defense): {', '.join(tun['matched_controls']) or 'none'}.\n\n"
        )
        md += table(tun["rows"], ["defense", "setting", "selected", "refusal", "alignment_kl", "task_accuracy",
                                  "task_delta"])  # fmt: skip
        md += "\n"
    elif "tuning" in results:
        md += "No tuning split: every defense ran with the settings given.\n\n"
    for data_name, rows in results["table"].items():
        md += f"## {data_name}\n\n"
        md += table([{**r, "refusal_ci": f"[{r['refusal_ci'][0]:.2f}, {r['refusal_ci'][1]:.2f}]"} for r in rows],
                    ["defense", "refusal", "refusal_ci", "alignment_kl", "judge", "task_metric", "task_delta",
                     "benign_accuracy", "time_ratio", "time_ratio_with_setup", "tuned", "matched_control"])  # fmt: skip
    md += f"\nBar: {results.get('bar')}\n"
    return write_report(out, "report", md, "defense study")
