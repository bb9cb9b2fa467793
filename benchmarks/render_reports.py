"""Render every report under a directory of runs to PNG with headless Chromium, to look at them.

    python benchmarks/render_reports.py RUNS_DIR [RUNS_DIR ...] --out docs/screenshots

Each run's ``report.html`` is re-rendered from its results.json first (``aligncollapse report``),
then photographed at a fixed width; ``index.html`` pages are photographed too. Chromium comes from
Debian (``apt-get install chromium``); without it the script says so and exits 1.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from aligncollapse.reporting import find_runs, render, render_index


def screenshot(browser: str, page: Path, png: Path, width: int = 1200, height: int = 2600) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
           f"--screenshot={png.resolve()}", page.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    ap.add_argument("--height", type=int, default=2600)
    args = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 1
    for d in args.dirs:
        for run in find_runs(d):
            page = render(run)
            name = "_".join((d.name, *run.relative_to(d).parts)) or d.name
            png = args.out / f"{name}.png"
            screenshot(browser, page, png, height=args.height)
            print(f"{png}  <- {page}")
        if len(find_runs(d)) > 1:
            png = args.out / f"{d.name}_index.png"
            screenshot(browser, render_index(d), png, height=900)
            print(f"{png}  <- {d / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
