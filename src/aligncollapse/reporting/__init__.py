"""Stage 10 — reporting: plots and HTML/Markdown reports rendered from a run's ``results.json``.

Every command writes ``results.json`` first and then calls :func:`render`; ``aligncollapse report
DIR`` calls the same function later, so a report can always be regenerated from the saved numbers.
Given a directory of runs, :func:`render_index` re-renders each and writes an ``index.html``
linking them with their headline numbers.
"""

from __future__ import annotations

import html as _html
import json
import os
from collections.abc import Callable
from pathlib import Path

from aligncollapse.errors import UserError
from aligncollapse.reporting.defenses import render_defenses
from aligncollapse.reporting.fisher import render_fisher
from aligncollapse.reporting.html import STYLE, fmt, table, write_report
from aligncollapse.reporting.predict import render_rank, render_study
from aligncollapse.reporting.runs import render_demo, render_eval, render_finetune, render_organism
from aligncollapse.reporting.scan import render_scan, render_validate
from aligncollapse.reporting.theory import render_theory
from aligncollapse.results import atomic_write_text, read_results

RENDERERS: dict[str, Callable[[Path, dict], Path]] = {
    "scan": render_scan,
    "validate": render_validate,
    "rank": render_rank,
    "study": render_study,
    "study defenses": render_defenses,
    "fisher": render_fisher,
    "theory": render_theory,
    "finetune": render_finetune,
    "eval": render_eval,
    "demo": render_demo,
    "organism build": render_organism,
    "organism suite": render_organism,
}


def _load(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    try:
        res = read_results(path)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path}: not readable as results ({type(e).__name__})") from None
    if not isinstance(res, dict) or res.get("schema") != "aligncollapse.results":
        raise UserError(f"{path}: not an aligncollapse results.json (no 'schema': 'aligncollapse.results')")
    return res


def render(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Render the report of one run directory from its results.json, into ``out_dir`` (default: the
    run directory itself); returns the report.html path."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    res = _load(run_dir)
    command = res.get("command")
    fn = RENDERERS.get(command) if isinstance(command, str) else None
    if fn is None:
        raise UserError(f"{run_dir / 'results.json'}: no report for command {res.get('command')!r}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "report.html").is_dir() or (out / "report.md").is_dir():
        raise UserError(f"{out}: report.html or report.md is a directory; move it away")
    try:
        return fn(out, res, run_dir)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise UserError(
            f"{run_dir / 'results.json'}: incomplete or malformed for a {res['command']} report ({e!r})"
        ) from None


def headline(res: dict) -> str:
    """One line of the numbers that matter for a run, for the index page."""
    c = res.get("command")
    if c == "scan":
        return f"{res.get('verdict')}; Δu at budget {fmt(res.get('forecast', {}).get('at_budget'))}"
    if c == "validate":
        ex = res.get("exponent") or {}
        return f"{res['scan'].get('verdict')}; measured exponent {fmt(ex.get('exponent'))}"
    if c == "rank":
        return "ranking: " + " > ".join(res.get("ranking", [])[:6])
    if c in ("finetune",):
        s = res.get("summary") or {}
        return f"{res.get('status')}; refusal {fmt(s.get('harmful_refusal_rate'))}, KL {fmt(s.get('alignment_kl'))}"
    if c == "eval":
        return f"refusal {fmt(res.get('harmful_refusal_rate'))}, benign accuracy {fmt(res.get('benign_accuracy'))}"
    if c == "demo":
        return "; ".join(
            f"{n}: refusal {fmt(r['summary'].get('harmful_refusal_rate'))}" for n, r in res.get("finetuned", {}).items()
        )
    if c == "study":
        return "; ".join(f"{m}: {len(r.get('sets', {}))} sets" for m, r in res.get("modes", {}).items())
    if c == "study defenses":
        return f"{sum(len(r) for r in res.get('table', {}).values())} defense rows"
    if c == "theory":
        return f"{len(res.get('table', []))} regimes"
    if c == "fisher":
        return ", ".join(
            f"{k}: eff. rank {fmt((e.get('global') or {}).get('effective_rank'))}"
            for k, e in res.get("fisher", {}).items()
        )
    return ""


def find_runs(parent: Path, max_depth: int = 4) -> list[Path]:
    """Run directories (holding results.json) under ``parent``, not following symlinks."""
    runs = []
    for root, dirs, files in os.walk(parent, followlinks=False):
        depth = len(Path(root).relative_to(parent).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < max_depth)
        if "results.json" in files:
            runs.append(Path(root))
    return runs


def render_index(parent: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Render every run under ``parent`` and write ``index.html`` linking them, into ``out_dir``
    (default ``parent``; each run's report goes to the same relative path below it)."""
    parent = Path(parent)
    dest = Path(out_dir) if out_dir is not None else parent
    runs = find_runs(parent)
    if not runs:
        raise UserError(f"{parent}: no results.json in it or below it")
    rows = []
    for run in runs:
        rel = run.relative_to(parent)
        try:
            res = _load(run)
            command = res.get("command")
            report = render(run, dest / rel) if isinstance(command, str) and command in RENDERERS else None
            status = "ok" if report else "no report for this command"
            try:
                line = headline(res)
            except (KeyError, TypeError, AttributeError, ValueError):
                line = "(headline unavailable: results.json is incomplete)"
        except UserError as e:
            res, report, status, line = {}, None, f"error: {e}", ""
        link = _html.escape(str(rel / "report.html")) if report else None
        name = _html.escape(str(rel) if str(rel) != "." else parent.name)
        rows.append(
            "<tr>"
            + (f'<td><a href="{link}">{name}</a></td>' if link else f"<td>{name}</td>")
            + f"<td>{_html.escape(str(res.get('command', '')))}</td><td>{_html.escape(str(res.get('created', '')))}</td>"
            + f"<td>{_html.escape(line)}</td><td>{_html.escape(status)}</td></tr>"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>aligncollapse runs: {_html.escape(parent.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>aligncollapse runs under {_html.escape(str(parent))}</h1>"
        "<table><tr><th>run</th><th>command</th><th>created</th><th>headline</th><th>report</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
    atomic_write_text(dest / "index.html", page)
    return dest / "index.html"


__all__ = ["RENDERERS", "find_runs", "headline", "render", "render_index", "table", "write_report"]
