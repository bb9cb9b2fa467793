"""`aligncollapse rank`: rank candidate sets and their examples by predicted harm."""

from __future__ import annotations

from aligncollapse.cli.args import fraction
from aligncollapse.cli.common import (
    add_candidate_args,
    add_data_args,
    budget,
    candidates,
    config,
    finish,
    lora_settings,
    out_dir,
    rank_context,
    scan_limits,
)


def register(sub) -> None:
    rk = sub.add_parser("rank", help="rank candidate fine-tuning sets and their examples by predicted harm")
    add_candidate_args(rk, lora_flag=True)
    rk.add_argument("--by", default="prospective_second_order", help="the score to rank by")
    rk.add_argument("--drop-fraction", type=fraction, default=0.0,
                    help="also write each set without its riskiest fraction of examples (filtered/<set>.jsonl)")  # fmt: skip
    add_data_args(rk, "--finetune")
    rk.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.models import load_model
    from aligncollapse.predict.rank import run_rank
    from aligncollapse.results import write_results

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    cands = candidates(args)
    cfg = budget(args, lora=lora_settings(args))
    with distributed.solo():  # under torchrun each rank builds the context alone; the candidates are split
        ctx = rank_context(args, model, tok, cfg)
    out = out_dir(args, "rank")
    res = run_rank(ctx, cands, out, cfg, scan_limits(args, model), by=args.by, probe_steps=args.probe_steps,
                   drop_fraction=args.drop_fraction)  # fmt: skip
    if not distributed.is_main():  # rank 0 writes results.json and the report
        return 0
    write_results(out, "rank", res, config(args))
    finish(out)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"predicted harm ({res['mode']}, by {args.by}) -> {out}/report.html")
    for c in ("rank", "set", "score", "95% CI", "first-order", "verdict"):
        t.add_column(c)
    for i, n in enumerate(res["ranking"], 1):
        sc = res["candidates"][n]["scores"]
        b = sc[args.by]
        ci = f"[{b['ci_low']:.3g}, {b['ci_high']:.3g}]" if b.get("ci_low") is not None else "–"
        t.add_row(str(i), n, f"{b['score']:.4g}", ci, f"{sc['prospective_first_order']['score']:.3g}",
                  res["candidates"][n]["aic"]["verdict"][:60])  # fmt: skip
    Console().print(t)
    return 0
