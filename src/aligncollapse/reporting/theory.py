"""Report of ``theory``: exact synthetic checks of the quartic law and the drift bounds."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.reporting.html import table, write_report
from aligncollapse.reporting.plots import plot_theory


def render_theory(out: Path, results: dict, src: Path | None = None) -> Path:
    plot_theory(results["regimes"], out / "theory.png")
    md = "# Theory checks (exact, synthetic)\n\n![theory](theory.png)\n\n"
    md += table(results["table"], list(results["table"][0]))
    md += "## ε sweep\n\n" + table(results["eps_sweep"], ["eps", "exponent", "t_crossover"])
    return write_report(out, "report", md, "theory")
