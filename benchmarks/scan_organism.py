"""The pre-flight scan on every set of the organism's suite: properties, verdict, t⁴ coefficients.

    python benchmarks/scan_organism.py --out runs/scan-organism [--organism DIR | --organism-version 1] [--sets a,b] [--json FILE]

Each set is scanned with the demo's planned run (full-batch SGD, lr 1e-2, 30 steps; 200 bootstrap
resamples) through ``aligncollapse scan``; the table printed (Markdown) is the one in docs/results.md (measured on organism v1:
``--organism-version 1``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from aligncollapse.cli import main as cli
from aligncollapse.organism.api import build_and_evaluate
from aligncollapse.organism.build import OrganismConfig, config_of, default_organism_dir
from aligncollapse.organism.suite import suite_sets_by_category


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--organism", type=Path)
    ap.add_argument("--organism-version", type=int, choices=(1, 2), default=2,
                    help="without --organism: the cached default build of this version (the committed table: 1)")  # fmt: skip
    ap.add_argument("--sets", help="comma-separated suite sets (default: every fine-tuning set)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cfg = OrganismConfig(version=args.organism_version)
    org = args.organism or default_organism_dir(cfg)
    build_and_evaluate(org, config_of(org) or cfg)  # a given build is used as it is
    entries = suite_sets_by_category(org / "suite")
    names = args.sets.split(",") if args.sets else [e["name"] for e in entries]
    category = {e["name"]: e["category"] for e in entries}
    rows = []
    for name in names:
        out = args.out / name
        t0 = time.perf_counter()
        code = cli(["scan", "--model", str(org), "--finetune", name, "--optimizer", "sgd", "--lr", "1e-2", "--steps", "30",
                    "--batch-size", "0", "--n-boot", "200", "--out", str(out)])  # fmt: skip
        if code not in (0, 3):
            print(f"scan of {name} failed with exit {code}", file=sys.stderr)
            return code
        r = json.loads((out / "results.json").read_text())
        p, q = r["properties"], r["quartic_coefficient"]
        rows.append({
            "set": name, "category": category.get(name),
            "low_rank": p["low_rank_sensitivity"]["holds"], "orthogonality": p["initial_orthogonality"]["holds"],
            "coupling": p["curvature_coupling"]["holds"], "tail_fraction": r["tail_fraction"],
            "overlap_vs_null": p["initial_orthogonality"]["overlap_vs_null"],
            "coupling_vs_null": p["curvature_coupling"]["coupling_vs_null"],
            "t4_full": q["full"], "t4_gauss_newton": q["gauss_newton"], "gamma_sq_over_8": q["gamma_sq_over_8"],
            "verdict": r["verdict"], "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
