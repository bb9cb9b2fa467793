"""`aligncollapse report DIR`: re-render a run's report from its results.json, or index a directory of runs."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.errors import UserError


def register(sub) -> None:
    r = sub.add_parser("report", help="re-render the report of a run directory, and an index of every run below DIR")
    r.add_argument("dir", help="a run directory (holding results.json) or a directory of runs")
    r.add_argument("--out", help="write the reports here instead of beside each results.json")
    r.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse.reporting import find_runs, render, render_index

    d = Path(args.dir)
    if not d.is_dir():
        raise UserError(f"report: {d} is not a directory")
    from aligncollapse.cli.common import _check_symlinks, prepare_out

    out = Path(args.out) if args.out else None
    if out is not None:
        prepare_out(out, flag="--out", command="report")
    else:
        _check_symlinks(d, "report")  # rendering in place never writes through a link leaving DIR
    runs = find_runs(d)
    if (d / "results.json").is_file():
        print(f"report: {render(d, out)}")
    if len(runs) > 1 or (runs and runs[0] != d):
        print(f"index: {render_index(d, out)}")
    elif not runs:
        raise UserError(f"report: {d} holds no results.json (in it or below it)")
    return 0
