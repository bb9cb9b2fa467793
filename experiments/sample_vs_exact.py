"""The sample-space scan beside the exact scan on one model and fine-tuning set (docs/results.md).

    python experiments/sample_vs_exact.py --model ORGANISM_DIR --finetune affirmative_steps [--samples 4]

Prints, for both methods, d, λ_max, λ_d, the trace, the tail fraction beyond d (for the sample
method also in-sample), ‖Pg‖/‖g‖, γ, gᵀFg, the noise trace, the forecast at the budget, the verdict
and the seconds; for the sample method the central-difference sum check.
"""

from __future__ import annotations

import argparse
import json
import time

from aligncollapse.models import load_model
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.scan.aic import ScanSettings, measure_aic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an organism directory (its suite/ is used)")
    ap.add_argument("--finetune", default="affirmative_steps")
    ap.add_argument("--samples", type=int, default=4, help="label draws per safety prompt (sample method)")
    ap.add_argument("--n-boot", type=int, default=200)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    safety = load_suite_set(f"{a.model}/suite", "safety")
    ft = load_suite_set(f"{a.model}/suite", a.finetune)
    for method in ("exact", "sample"):
        t0 = time.perf_counter()
        m = measure_aic(model, tok, safety, ft, ScanSettings(method=method, fisher_samples=a.samples, n_boot=a.n_boot))
        row = {k: m.get(k) for k in ("d", "lambda_max", "lambda", "trace", "tail_fraction", "tail_fraction_in_sample",
                                     "eps_orth_rel", "gamma", "verdict")}  # fmt: skip
        row |= {"gFg": m["quadratic_forms"]["gFg"], "noise": m["gradient_noise"]["trace_F_cov"],
                "at_budget": m["forecast"]["at_budget"], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if method == "sample":
            row["sum_check"] = m["per_example_hvp"].get("sum_check")
        print(method, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
