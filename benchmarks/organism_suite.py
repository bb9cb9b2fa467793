"""Fine-tune the organism on every suite set with the default budget and measure harm.

Prints one row per set (mean over fine-tuning seeds, with the seed range) and writes the
numbers to ``--out``/results.json. Used for the README's organism table, at both alignment
depths:

    python benchmarks/organism_suite.py --organism DIR --out runs/suite60 --seeds 0 1 2 --organism-version 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aligncollapse.evaluation.metrics import headline
from aligncollapse.models import load_model
from aligncollapse.organism.api import build_and_evaluate
from aligncollapse.organism.build import OrganismConfig, config_of
from aligncollapse.organism.judge import OrganismJudge
from aligncollapse.organism.suite import load_suite_set, suite_sets_by_category
from aligncollapse.results import write_results
from aligncollapse.training.finetune import FinetuneConfig, finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", required=True)
    ap.add_argument("--align-steps", type=int, help="default: the version's (150 for v2, 60 for v1)")
    ap.add_argument("--organism-version", type=int, choices=(1, 2), default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    org_dir = Path(args.organism)
    # An existing build is used as it is (never rebuilt with other settings); else built with the flags.
    cfg = config_of(org_dir) or OrganismConfig(align_steps=args.align_steps, version=args.organism_version)
    org = build_and_evaluate(org_dir, cfg)
    suite = org_dir / "suite"
    harmful, benign = load_suite_set(suite, "eval_harmful"), load_suite_set(suite, "eval_benign")
    judge = OrganismJudge()
    rows: dict[str, dict] = {}
    print(f"organism {org_dir}: {headline(org['evaluation'])}")
    print(f"{'set':20s} {'category':17s} {'refusal':>14s} {'judge':>6s} {'benign':>7s} {'NLL':>6s} {'KL':>7s}")
    for entry in suite_sets_by_category(suite):
        name = entry["name"]
        per_seed = []
        for seed in args.seeds:
            model, tok = load_model(org_dir)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = finetune(
                    model,
                    tok,
                    load_suite_set(suite, name),
                    tmp,
                    FinetuneConfig(steps=args.steps, seed=seed, refusal_every=0, track_every=10),
                    eval_harmful=harmful,
                    eval_benign=benign,
                    resume=False,
                    save_model=False,
                )
            ev = res["evaluation"]
            h = headline(ev)
            samples = ev["samples_harmful"]
            h["judge"] = sum(judge.score_many([s["prompt"] for s in samples], [s["response"] for s in samples])) / len(
                samples
            )
            h["seconds"] = time.perf_counter() - t0
            per_seed.append(h)
        agg = {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
        agg["refusal_min"] = min(r["harmful_refusal_rate"] for r in per_seed)
        agg["refusal_max"] = max(r["harmful_refusal_rate"] for r in per_seed)
        rows[name] = {"category": entry["category"], "mean": agg, "per_seed": per_seed}
        print(
            f"{name:20s} {entry['category']:17s} {agg['harmful_refusal_rate']:.2f} [{agg['refusal_min']:.2f},{agg['refusal_max']:.2f}]"
            f" {agg['judge']:6.2f} {agg['benign_accuracy']:7.2f} {agg['alignment_loss']:6.2f} {agg['alignment_kl']:7.2f}",
            flush=True,
        )
    write_results(
        args.out, "benchmark organism_suite", {"organism": org["evaluation"]["summary"], "sets": rows}, vars(args)
    )


if __name__ == "__main__":
    main()
