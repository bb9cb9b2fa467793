"""`aligncollapse scan`: the pre-flight check (AIC, forecast, verdict, report)."""

from __future__ import annotations

import argparse

from aligncollapse.cli.args import (
    int_at_least,
    memory_size,
    nonneg_int,
    positive_float,
    positive_int,
    seed,
    subspace_d,
    threshold,
)
from aligncollapse.cli.common import (
    add_data_args,
    add_lora_args,
    add_method_args,
    add_model_args,
    check_fsdp,
    config,
    finish,
    lora_settings,
    memory_limit,
    out_dir,
    safety_set,
    scan_settings,
    shard_if_fsdp,
    training_data,
)
from aligncollapse.errors import UserError
from aligncollapse.models import weights_digest


def register(sub) -> argparse.ArgumentParser:
    sc = sub.add_parser("scan", help="pre-flight check: AIC, quartic-law forecast, verdict, report")
    add_model_args(sc)
    add_lora_args(sc)
    sc.add_argument("--safety", help="safety prompts (responses are the model's own); default: the organism's")
    sc.add_argument("--safe-target", help=argparse.SUPPRESS)
    sc.add_argument("--limit", type=positive_int, help="use at most this many safety prompts")
    sc.add_argument(
        "--finetune", required=True, help="fine-tuning data file / HF dataset, or an organism suite set name"
    )
    sc.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw"],
        help="how t relates to steps (AdamW: fixed preconditioner)",
    )
    sc.add_argument("--lr", type=positive_float, default=1e-3)
    sc.add_argument("--steps", type=positive_int, default=50, help="planned fine-tuning steps")
    sc.add_argument(
        "--batch-size", type=nonneg_int, default=16, help="planned mini-batch size (0: the whole set, gradient descent)"
    )
    sc.add_argument(
        "--d",
        "--subspace-d",
        dest="d",
        type=subspace_d,
        default="energy:0.9",
        help="subspace dimension: an integer, energy:F or eigengap (--subspace-d under torchrun, whose parser "
        "takes --d for an abbreviation of its own flags)",
    )
    sc.add_argument("--max-d", type=positive_int, default=16, help="eigenpairs computed by Lanczos")
    sc.add_argument(
        "--threshold",
        type=threshold,
        help="Δu counting as collapse: a number, 'organism' (calibrated, default when present) or 'none'",
    )
    sc.add_argument("--n-boot", type=int_at_least(20), default=500)
    sc.add_argument("--blocks")
    sc.add_argument("--layers")
    sc.add_argument("--modules")
    sc.add_argument("--seed", type=seed, default=0)
    sc.add_argument(
        "--max-memory",
        type=memory_size,
        default="auto",
        help="stop before any heavy work when the planned peak exceeds this: a size (16GB, 500MB, bytes) or "
        "auto (the CUDA device's memory, else the available RAM; default)",
    )
    add_method_args(sc)
    sc.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard the model over the processes with FSDP2 (for models that do not fit "
                    "one device; sample-space scan, float32 or float64 weights)")  # fmt: skip
    sc.add_argument("--out")
    add_data_args(sc, "--finetune")
    sc.set_defaults(func=run)
    return sc


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.models import apply_lora, load_model
    from aligncollapse.results import write_results
    from aligncollapse.scan.run import run_scan

    check_fsdp(args, args.scan_method != "exact",
               "--fsdp needs --scan-method sample (or auto): the exact scan's Lanczos basis is not sharded")  # fmt: skip
    if args.fsdp and args.dtype in ("float16", "bfloat16"):
        raise UserError("--fsdp: the sharded scan steps the weights by finite differences, which need "
                        "--dtype float32 or float64")  # fmt: skip
    # --fsdp: loaded on the host, then each unit moves to the device as it is sharded
    model, tok = load_model(args.model, dtype=args.dtype, device="cpu" if args.fsdp else args.device)
    safety = safety_set(args, model, tok)
    finetune = training_data(args.finetune, args)
    lora = lora_settings(args)
    if lora is not None:
        model = apply_lora(model, lora)
    s = scan_settings(args)
    model = shard_if_fsdp(args, model)
    before = weights_digest(model)  # of this rank's shards under --fsdp
    s.max_memory, s.max_memory_flag = memory_limit(args.max_memory, next(model.parameters()).device)
    out = out_dir(args, "scan")
    res = run_scan(model, tok, safety, finetune, out, s, label=args.finetune)
    # every rank's shards (a collective under --fsdp, so before the other ranks return)
    unchanged = not distributed.any_rank(weights_digest(model) != before) if args.fsdp else None
    if not distributed.is_main():  # under torchrun the other ranks only compute
        return 0
    res["model_unchanged"] = unchanged if args.fsdp else before == weights_digest(model)
    write_results(out, "scan", res, config(args))
    finish(out)
    fc = res["forecast"]
    print(f"scan of {args.finetune} -> {out}/report.html")
    print(f"  verdict: {res['verdict']}")
    null, flow = res["shuffled_null"], res["flow_geometry"]
    print(f"  d={res['d']}  λ={res['lambda']:.4g}  tail={res['tail_fraction']:.3f}  ‖Pg‖/‖g‖={flow['eps_orth_rel']:.3g} "
          f"(shuffled null {null['eps_orth_rel']:.3g})  γ/‖Hg‖={flow['gamma_rel']:.3g} (shuffled null {null['gamma_rel']:.3g})")  # fmt: skip
    for name, prop in res["properties"].items():
        print(f"  {name}: {'holds' if prop['holds'] else 'fails'} ({prop['why']})")
    if fc.get("threshold") is not None:
        print(
            f"  forecast Δu at step {args.steps}: {fc['at_budget']:.4g}; threshold {fc['threshold']:.3g} crossed at step {fc.get('predicted_collapse_step')}"
        )
    return 0
