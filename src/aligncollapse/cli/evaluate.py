"""`aligncollapse eval`: safety evaluation (alignment loss, refusal, compliance, accuracy, judge)."""

from __future__ import annotations

from aligncollapse.cli.args import nonneg_int, positive_int
from aligncollapse.cli.common import (
    add_data_args,
    add_eval_data_args,
    add_model_args,
    config,
    eval_sets,
    finish,
    out_dir,
    print_table,
    use_chat,
)


def register(sub) -> None:
    e = sub.add_parser("eval", help="safety evaluation: alignment loss, refusal, compliance, accuracy")
    add_model_args(e)
    add_eval_data_args(e)
    e.add_argument("--reference", help="aligned reference model for the KL form of alignment loss")
    e.add_argument("--refusal", default="zou2023", help="refusal detector: zou2023, xstest or a JSON keyword list")
    e.add_argument("--judge", help="harmfulness judge: organism, hf:PATH or openai:MODEL@URL (off by default)")
    e.add_argument("--max-new-tokens", type=positive_int, default=48)
    e.add_argument("--sample", action="store_true", help="sample (T=0.7, top-p 0.8, top-k 20) instead of greedy")
    e.add_argument("--seed", type=nonneg_int, default=0)
    e.add_argument("--out")
    add_data_args(e, "--eval-harmful and --eval-benign")
    e.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse.evaluation.judges import make_judge
    from aligncollapse.evaluation.metrics import (
        GenerationConfig,
        KLReference,
        SafetyEvalConfig,
        evaluate_safety,
        headline,
    )
    from aligncollapse.models import load_model
    from aligncollapse.results import write_results

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    harmful, benign = eval_sets(args, model, tok, primary=True)
    kl = None
    if args.reference:
        ref, _ = load_model(args.reference, dtype=args.dtype, device=args.device)
        kl = KLReference(ref, tok, harmful, args.template, use_chat_template=use_chat(args))
        del ref
    cfg = SafetyEvalConfig(
        template=args.template,
        use_chat_template=use_chat(args),
        refusal=args.refusal,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed),
        bootstrap_seed=args.seed,
    )
    ev = evaluate_safety(model, tok, harmful, benign, cfg, kl_reference=kl, judge=make_judge(args.judge))
    out = out_dir(args, "eval")
    write_results(out, "eval", {"evaluation": ev, **headline(ev)}, config(args))
    finish(out)
    print_table(f"evaluation -> {out}/results.json", {args.model: headline(ev)})
    return 0
