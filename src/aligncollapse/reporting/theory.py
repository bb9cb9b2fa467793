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
    nl = results.get("nonlinear")
    if nl:
        md += f"## Curved logits: the full t⁴ coefficient\n\n{nl['problem']}.\n\n"
        md += table([{"coefficient": k, "value": nl[k]} for k in ("measured_t4_coefficient", "computed_t4_coefficient",
                     "gauss_newton_t4_coefficient", "curvature_term_coefficient", "coefficient_ratio",
                     "gauss_newton_ratio", "early_exponent")], ["coefficient", "value"])  # fmt: skip
        md += nl["note"] + "\n"
    return write_report(out, "report", md, "theory")
