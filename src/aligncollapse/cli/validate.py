"""`aligncollapse validate`: scan, fine-tune with tracking, check the forecast and the bounds."""

from __future__ import annotations

from aligncollapse.cli.args import nonneg_int
from aligncollapse.cli.common import (
    config,
    finish,
    memory_limit,
    out_dir,
    safety_set,
    scan_settings,
    training_data,
)
from aligncollapse.errors import UserError


def register(sub, scan_parser) -> None:
    va = sub.add_parser("validate", help="scan, fine-tune with tracking, and check the forecast and the laws")
    for action in scan_parser._actions:
        if action.dest not in ("help",):
            va._add_action(action)
    va.add_argument("--sequence-kl", type=nonneg_int, default=8, metavar="S",
                    help="also measure Lemma 3.2's sequence-level KL at the checkpoints with S responses sampled "
                    "per safety prompt (0: off)")  # fmt: skip
    va.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.models import load_model
    from aligncollapse.results import write_results
    from aligncollapse.scan.validate import run_validate

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    safety = safety_set(args, model, tok)
    finetune = training_data(args.finetune, args)
    if args.optimizer != "sgd":
        raise UserError(
            "validate compares against gradient flow: use --optimizer sgd (AdamW forecasts are a stated approximation)"
        )
    s = scan_settings(args)
    s.max_memory, s.max_memory_flag = memory_limit(args.max_memory, next(model.parameters()).device)
    out = out_dir(args, "validate")
    res = run_validate(model, tok, safety, finetune, out, s, label=args.finetune, sequence_kl_samples=args.sequence_kl)
    if not distributed.is_main():  # under torchrun the other ranks only compute
        return 0
    write_results(out, "validate", res, config(args))
    finish(out)
    ex = res["exponent"] or {}
    print(f"validate {args.finetune} -> {out}/report.html")
    print(f"  verdict: {res['scan']['verdict']}")
    print(f"  measured exponent {ex.get('exponent', float('nan')):.3f} [{ex.get('ci_low', float('nan')):.3f}, {ex.get('ci_high', float('nan')):.3f}];"
          f" forecast/measured {res['forecast_vs_measured']}")  # fmt: skip
    print(
        f"  Thm 6.2 holds at {'(vacuous everywhere)' if res['thm62_holds_fraction'] is None else format(res['thm62_holds_fraction'], '.0%')}"
        f" of its non-vacuous steps; Davis–Kahan holds: {res['davis_kahan']['holds']} (vacuous: {res['davis_kahan']['vacuous']})"
    )
    return 0
