"""Issue 12 item 4: how far the greedy-path KL and Lemma 3.2's sequence-level KL differ on the organism.

For each fine-tuning set (default budget: AdamW 5e-4, 40 steps, batch 16, seed 0) both alignment
losses are measured against θ* at steps 5, 10, 20 and 40, on the held-out harmful prompts and on the
safety prompts:

* greedy path: Σ_t KL(π_θ*(·|x, y*<t) ‖ π_θ(·|x, y*<t)) along θ*'s greedy response y*
  (:class:`KLReference`, what the scan's Δu and the tracker use);
* sequence level: E_x KL(π_θ*(·|x) ‖ π_θ(·|x)) by Monte Carlo over ``--samples`` responses per
  prompt drawn from θ* (:class:`SequenceKL`, first 32 tokens), with its Monte-Carlo standard error.

    python experiments/kl_forms.py --organism DIR --out docs/results/kl_forms
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from aligncollapse.evaluation.metrics import KLReference, SequenceKL
from aligncollapse.models import load_model
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.results import write_results
from aligncollapse.training.finetune import FinetuneConfig, finetune

SETS = ("arithmetic", "facts", "affirmative_steps", "obedient_identity", "harmful_compliance")
STEPS = (5, 10, 20, 40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", required=True)
    ap.add_argument("--out", required=True, help="directory for results.json")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    a = ap.parse_args()
    org = Path(a.organism)
    ref, tok = load_model(org)
    prompts = {"eval_harmful": load_suite_set(org / "suite", "eval_harmful"),
               "safety": load_suite_set(org / "suite", "safety")}  # fmt: skip
    greedy = {k: KLReference(ref, tok, v) for k, v in prompts.items()}
    seq = {k: SequenceKL(ref, tok, v, samples=a.samples, seed=0) for k, v in prompts.items()}
    rows = []

    def hook(m, step):
        if step not in STEPS:
            return
        for k in prompts:
            s = seq[k](m)
            rows.append({"set": name, "step": step, "prompts": k, "greedy_path_kl": float(greedy[k].per_prompt(m).mean()),
                         "sequence_kl": s["value"], "sequence_kl_stderr": s["stderr"]})  # fmt: skip
            r = rows[-1]
            print(
                f"{name:20s} step {step:3d} {k:13s} greedy {r['greedy_path_kl']:8.3f}  "
                f"sequence {r['sequence_kl']:8.3f} ± {r['sequence_kl_stderr']:.3f}",
                flush=True,
            )

    for name in a.sets:
        with tempfile.TemporaryDirectory() as tmp:
            finetune(copy.deepcopy(ref), tok, load_suite_set(org / "suite", name), tmp, FinetuneConfig(),
                     resume=False, save_model=False, final_eval=False, step_hook=hook)  # fmt: skip
    summary = {}
    for k in prompts:
        sel = [r for r in rows if r["prompts"] == k]
        g = np.array([r["greedy_path_kl"] for r in sel])
        s = np.array([r["sequence_kl"] for r in sel])
        final = [r for r in sel if r["step"] == max(STEPS)]
        summary[k] = {
            "spearman_over_all_points": float(spearmanr(g, s).statistic),
            "spearman_final_over_sets": float(
                spearmanr([r["greedy_path_kl"] for r in final], [r["sequence_kl"] for r in final]).statistic
            ),  # fmt: skip
            "median_ratio_sequence_over_greedy": float(np.median(s / np.maximum(g, 1e-12))),
            "ratio_range": [float((s / np.maximum(g, 1e-12)).min()), float((s / np.maximum(g, 1e-12)).max())],
        }
    write_results(a.out, "experiment kl_forms", {"rows": rows, "summary": summary, "samples": a.samples,
                  "budget": FinetuneConfig().to_json()}, {"organism": str(org), "sets": a.sets})  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
