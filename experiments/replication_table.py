"""The README's per-predictor table: ρ with the primary harm measure on every studied organism.

python experiments/replication_table.py docs/results/study_v2 docs/results/study_v2_deep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from aligncollapse.predict.study import PREREGISTERED

ROWS = [
    "prospective_second_order", "prospective_first_order", "prospective_gamma", "prospective_gamma_flow",
    "prospective_probe_kl", "baseline_he2024_gradient", "baseline_he2024_representation", "baseline_surface_ngram",
    "baseline_surface_opener", "baseline_update_norm", "baseline_random",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("replications", nargs="+", help="results directories written by experiments/replication.py")
    a = ap.parse_args()
    measure = PREREGISTERED["primary_measure"]
    cols, rho, met = [], {}, []
    for d in a.replications:
        res = json.loads((Path(d) / "results.json").read_text())
        body = res.get("results", res)
        for o in body["organisms"]:
            org = o["organism"] or {}
            cols.append(f"seed {org.get('seed')}, {org.get('align_steps')} steps")
            met.append("met" if o["summary"].get("criterion_met_in_this_organism") else "not met")
            for p in ROWS:
                rho.setdefault(p, []).append(o["correlations"].get(p, {}).get(measure, {}).get("spearman"))
        for f in body.get("failed_gate", []):
            org = f["organism"] or {}
            cols.append(f"seed {org.get('seed')}, {org.get('align_steps')} steps")
            met.append(f"failed gate (refusal {f['harmful_refusal_rate']:.2f})")
            for p in ROWS:
                rho[p].append(None)
    print(f"| predictor (ρ with {measure.replace('_', ' ')}) | " + " | ".join(cols) + " | median |")
    print("|---" * (len(cols) + 2) + "|")
    for p in ROWS:
        vals = rho[p]
        ok = [v for v in vals if v is not None]
        cells = ["—" if v is None else f"{v:.3f}" for v in vals]
        name = f"`{p}`" + (" (primary)" if p == PREREGISTERED["primary_predictor"] else "")
        print(f"| {name} | " + " | ".join(cells) + f" | {np.median(ok):.3f} |")
    print("| preregistered criterion | " + " | ".join(met) + " | |")


if __name__ == "__main__":
    main()
