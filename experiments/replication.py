"""Collect per-organism study results into one table: the preregistered result on every organism.

Each organism's study is a plain ``aligncollapse study --model ORG --suite organism --out DIR``; this
script reads the DIRs and writes ``results.json`` with ``preregistered``, ``organisms`` (per organism:
path, seed, alignment depth, and every predictor's ρ / p / Holm p on every measure) and, per predictor
and measure, the distribution of ρ across organisms.

    python experiments/replication.py --out docs/results/study_v2 runs/study_v2_s0_a60 runs/study_v2_s1_a60 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from aligncollapse.predict.study import PREREGISTERED
from aligncollapse.results import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", help="study output directories, one per organism")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default=PREREGISTERED["mode"])
    ap.add_argument("--failed-gate", nargs="*", default=[], metavar="ORG",
                    help="organism directories that failed the validity gate (not studied; recorded with their gate "
                    "values, and counted against the criterion)")  # fmt: skip
    a = ap.parse_args()
    organisms, per = [], {}
    failed = []
    for d in a.failed_gate:
        res = json.loads((Path(d) / "results.json").read_text())
        ev = res["evaluation"]
        failed.append({"model": str(d), "organism": res.get("config", {}).get("organism"),
                       "harmful_refusal_rate": ev["harmful_refusal_rate"]["value"],
                       "benign_accuracy": ev["benign_accuracy"]["value"], "gate": PREREGISTERED["gate"]})  # fmt: skip
    for d in a.studies:
        res = json.loads((Path(d) / "results.json").read_text())
        meta = (
            json.loads((Path(res["config"]["model"]) / "organism.json").read_text())
            if (Path(res["config"]["model"]) / "organism.json").exists()
            else {}
        )
        corr = res["correlations"][a.mode]
        rows = {p: {h: {"spearman": e["spearman"]["value"], "ci": [e["spearman"]["ci_low"], e["spearman"]["ci_high"]],
                        "permutation_p": e.get("permutation_p"), "permutation_p_greater": e.get("permutation_p_greater"),
                        "p_holm": e.get("p_holm")} for h, e in hs.items()} for p, hs in corr.items()}  # fmt: skip
        sets = {}
        for name, st in res["modes"][a.mode]["sets"].items():
            judge = [r["summary"].get("judge_harmfulness") for r in st["runs"]]
            sets[name] = {"category": st.get("category"),
                          "primary_predictor": st["prospective"][PREREGISTERED["primary_predictor"]]["score"],
                          "judge_harmfulness": float(np.mean(judge)) if all(j is not None for j in judge) else None,
                          "refusal": float(np.mean([r["summary"]["harmful_refusal_rate"] for r in st["runs"]]))}  # fmt: skip
        organisms.append({"study": str(d), "model": res["config"]["model"], "organism": meta.get("config", meta),
                          "summary": res["summary"][a.mode], "sets": sets, "correlations": rows})  # fmt: skip
        for p, hs in rows.items():
            for h, e in hs.items():
                per.setdefault(p, {}).setdefault(h, []).append(e["spearman"])
    dist = {p: {h: {"values": v, "median": float(np.median([x for x in v if x is not None])) if any(
        x is not None for x in v) else None} for h, v in hs.items()} for p, hs in per.items()}  # fmt: skip
    met = sum(o["summary"].get("criterion_met_in_this_organism", False) for o in organisms)
    write_results(a.out, "experiment replication", {"preregistered": PREREGISTERED, "organisms": organisms,
                  "rho_across_organisms": dist, "criterion_met_in": met, "n_organisms": len(organisms) + len(failed),
                  "failed_gate": failed}, {"studies": a.studies, "failed_gate": a.failed_gate, "mode": a.mode})  # fmt: skip
    print(f"preregistered criterion met in {met} of {len(organisms) + len(failed)} organisms "
          f"({len(failed)} failed the validity gate)")  # fmt: skip


if __name__ == "__main__":
    main()
