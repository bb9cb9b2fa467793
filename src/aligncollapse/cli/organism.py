"""the built-in model organism: `organism build` and `organism suite`."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.cli.args import int_at_least, positive_int, seed
from aligncollapse.cli.common import finish, print_table
from aligncollapse.organism.build import DEFAULT_VERSION


def register(sub) -> None:
    org = sub.add_parser("organism", help="the built-in model organism").add_subparsers(
        dest="organism_command", required=True
    )
    b = org.add_parser("build", help="build (or load from cache) the aligned organism")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=seed, default=0)
    b.add_argument("--align-steps", type=positive_int,
                   help="alignment depth in steps (default: 150 for version 2, 60 for version 1; 300 is deep)")  # fmt: skip
    b.add_argument("--pretrain-steps", type=positive_int, default=1000)
    b.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    b.add_argument("--organism-version", type=int, choices=(1, 2), default=DEFAULT_VERSION,
                   help="corpus version: 2 (default; no shortcuts: held-out templates and acts, disjoint "
                   "safety/harmful prompts, 4 refusals, decorrelated openers, 17-set suite) or 1 (v0.2's, kept for comparison)")  # fmt: skip
    b.set_defaults(func=run_build)
    s = org.add_parser("suite", help="write the fine-tuning suite and held-out evaluation sets")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--size", type=int_at_least(8), default=128, help="examples per fine-tuning set")
    s.add_argument(
        "--organism-version",
        type=int,
        choices=(1, 2),
        default=DEFAULT_VERSION,
        help="corpus version (see organism build)",
    )
    s.set_defaults(func=run_suite)


def run_build(args) -> int:
    from aligncollapse.organism.api import build_and_evaluate
    from aligncollapse.organism.build import OrganismConfig

    cfg = OrganismConfig(seed=args.seed, align_steps=args.align_steps, pretrain_steps=args.pretrain_steps,
                         version=args.organism_version)  # fmt: skip
    out = Path(args.out)
    res = build_and_evaluate(out, cfg, force=args.force)
    ev = res["evaluation"]
    print(
        f"organism at {out} ({'cached' if res['organism']['cached'] else 'built'}; "
        f"{res['organism']['n_parameters']:,} parameters, align_steps={cfg.align_steps})"
    )
    finish(out)
    print_table("organism (held-out prompts)", {"aligned": ev["summary"]})
    return 0


def run_suite(args) -> int:
    from aligncollapse.organism.suite import write_suite
    from aligncollapse.results import write_results

    out = Path(args.out)
    manifest = write_suite(out, seed=args.seed, size=args.size, version=args.organism_version)
    write_results(out, "organism suite", {"manifest": manifest},
                  {"seed": args.seed, "size": args.size, "organism_version": args.organism_version})  # fmt: skip
    finish(out)
    for f in manifest["files"]:
        print(f"{f['name']:20s} {f['category']:17s} {f['size']:5d}  {out / f['path']}")
    return 0
