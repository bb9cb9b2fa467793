"""Report of a ``fisher`` run: per-module and global spectra with their null references."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.reporting.html import table, write_report
from aligncollapse.reporting.plots import plot_block_spectra, plot_global_spectrum


def render_fisher(out: Path, results: dict, src: Path | None = None) -> Path:
    curves: dict[str, list[float]] = {}
    figures, rows = [], []
    for kind, e in results["fisher"].items():
        blocks = {n: b["eigenvalues"] for n, b in (e.get("blocks") or {}).items() if b.get("eigenvalues")}
        if blocks:
            figures.append(
                plot_block_spectra(
                    blocks, out / f"spectra_{kind}.png", f"{kind} Fisher, per module ({e['method']})"
                ).name
            )
        g = e.get("global")
        if g and g.get("eigenvalues"):
            curves[f"{kind} Fisher"] = g["eigenvalues"]
            for null in ("null_random", "null_shuffled"):
                if e.get(null, {}).get("eigenvalues"):
                    curves[f"{kind}: {null.replace('_', ' ')}"] = e[null]["eigenvalues"]
            rows.append({"Fisher": kind, "n": e["n_samples"], "effective rank": g.get("effective_rank"), "d": g.get("d"),
                         "tail fraction": g.get("tail_fraction"),
                         "null effective rank": e.get("null_random", {}).get("effective_rank")})  # fmt: skip
    if curves:
        figures.append(plot_global_spectrum(curves, out / "spectrum_global.png").name)
    md = "# Safety Fisher\n\n"
    if rows:
        md += table(rows, list(rows[0]))
    md += "".join(f"![{f}]({f})\n\n" for f in figures)
    return write_report(out, "report", md, "fisher")
