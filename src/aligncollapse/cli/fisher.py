"""`aligncollapse fisher`: the safety skill's Fisher, its spectrum, subspace and null references."""

from __future__ import annotations

from aligncollapse.cli.args import memory_size, positive_float, positive_int, seed, subspace_d
from aligncollapse.cli.common import (
    add_data_args,
    add_model_args,
    blocks,
    check_fsdp,
    config,
    finish,
    memory_limit,
    out_dir,
    safety_set,
    shard_if_fsdp,
    use_chat,
)
from aligncollapse.errors import UserError


def register(sub) -> None:
    fi = sub.add_parser("fisher", help="the safety skill's Fisher: spectrum, subspace, null references")
    add_model_args(fi)
    fi.add_argument("--safety", help="safety set (harmful prompts + safe responses); default: the organism's")
    fi.add_argument("--safe-target", help="for prompt-only safety sets: a fixed TEXT, or 'model'")
    fi.add_argument("--limit", type=positive_int, help="use at most this many safety examples")
    fi.add_argument("--fisher", default="both", choices=["empirical", "sampled", "both"],
                    help="empirical (given safe responses), sampled (responses drawn from the model) or both")  # fmt: skip
    fi.add_argument("--method", default="exact", choices=["exact", "factored", "projected", "lanczos"],
                    help="exact: per-sample gradient rows (memory N·n, grouped by --memory-budget); factored: the same "
                    "eigenpairs from factored per-example gradients (memory: the factors, no N × n rows); projected: "
                    "block-wise random projections; lanczos: matrix-free top-k")  # fmt: skip
    fi.add_argument("--projection", default="rademacher", choices=["rademacher", "kronecker"])
    fi.add_argument("--projection-dim", type=positive_int, default=4096)
    fi.add_argument("--top-k", type=positive_int, default=32)
    fi.add_argument("--d", "--subspace-d", dest="d", type=subspace_d, default="energy:0.9",
                    help="subspace dimension: an integer, energy:F or eigengap (--subspace-d under torchrun, whose "
                    "parser takes --d for an abbreviation of its own flags)")  # fmt: skip
    fi.add_argument(
        "--memory-budget", type=positive_float, default=1.0, help="GiB for per-sample gradients (default 1)"
    )
    fi.add_argument("--n-samples", type=positive_int, default=1, help="sampled responses per prompt (sampled Fisher)")
    fi.add_argument("--blocks", help="comma-separated regular expressions on parameter names")
    fi.add_argument("--layers", help="layer range, e.g. 0-3")
    fi.add_argument("--modules", help="module types, e.g. q,k,v,o,gate,up,down")
    fi.add_argument("--shuffled-null", action="store_true", help="also compute the label-shuffled null (one more pass)")
    fi.add_argument("--no-representation", action="store_true", help="skip the representation-space analysis")
    fi.add_argument("--seed", type=seed, default=0)
    fi.add_argument("--max-memory", type=memory_size, default="auto",
                    help="stop before any heavy work when the planned peak exceeds this: a size (16GB, 500MB, "
                    "bytes) or auto (the CUDA device's memory, else the available RAM; default)")  # fmt: skip
    fi.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard the model over the processes with FSDP2 (--method factored; spectra "
                    "only, no subspace saved)")  # fmt: skip
    fi.add_argument("--out")
    add_data_args(fi, "--safety")
    fi.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.geometry.analysis import FisherSettings, run_fisher
    from aligncollapse.models import load_model
    from aligncollapse.results import write_results

    check_fsdp(args, args.method == "factored", "--fsdp needs --method factored: the other methods differentiate "
               "through the parameters with torch.func or keep n-sized rows, which a sharded model does not allow")  # fmt: skip
    model, tok = load_model(args.model, dtype=args.dtype, device="cpu" if args.fsdp else args.device)
    safety = safety_set(args, model, tok, primary=True)
    model = shard_if_fsdp(args, model)
    if len(safety) < distributed.world_size() and not args.fsdp:  # --fsdp: every rank takes every example
        raise UserError(f"--safety holds {len(safety)} examples, fewer than the {distributed.world_size()} processes: "
                        "each needs one")  # fmt: skip
    kinds = ("empirical", "sampled") if args.fisher == "both" else (args.fisher,)
    s = FisherSettings(
        kinds=kinds, method=args.method, projection=args.projection, projection_dim=args.projection_dim, top_k=args.top_k,
        d_rule=args.d, memory_budget=int(args.memory_budget * 2**30), n_samples=args.n_samples,
        shuffled_null=args.shuffled_null, representation=not args.no_representation, seed=args.seed,
        template=args.template, use_chat_template=use_chat(args), blocks=blocks(args),
    )  # fmt: skip
    s.max_memory, s.max_memory_flag = memory_limit(args.max_memory, next(model.parameters()).device)
    out = out_dir(args, "fisher")
    payload = run_fisher(model, tok, safety, out, s)
    if not distributed.is_main():  # under torchrun the other ranks only compute
        return 0
    write_results(out, "fisher", payload, config(args))
    finish(out)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"safety Fisher ({args.method}) -> {out}/results.json")
    for c in ("Fisher", "n", "effective rank", "energy 90/95/99", "d", "tail mass", "null eff. rank"):
        table.add_column(c)
    for kind, e in payload["fisher"].items():
        g = e.get("global")
        if g:
            null = e.get("null_random", {}).get("effective_rank")
            table.add_row(kind, str(e["n_samples"]), f"{g['effective_rank']:.2f}", f"{g['energy_90']}/{g['energy_95']}/{g['energy_99']}",
                          str(g.get("d")), f"{g.get('tail_fraction', 0):.3f}", "-" if null is None else f"{null:.2f}")  # fmt: skip
        else:
            table.add_row(kind, str(e["n_samples"]), f"{len(e['blocks'])} blocks", "", "", "", "")
    Console().print(table)
    return 0
