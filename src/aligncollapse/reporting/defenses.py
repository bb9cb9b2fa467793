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
    for data_name, rows in results["table"].items():
        md += f"## {data_name}\n\n"
        md += table([{**r, "refusal_ci": f"[{r['refusal_ci'][0]:.2f}, {r['refusal_ci'][1]:.2f}]"} for r in rows],
                    ["defense", "refusal", "refusal_ci", "alignment_kl", "judge", "task_metric", "task_delta",
                     "benign_accuracy", "time_ratio", "time_ratio_with_setup"])  # fmt: skip
    md += f"\nBar: {results.get('bar')}\n"
    return write_report(out, "report", md, "defense study")
