"""`aligncollapse eval`: safety evaluation (alignment loss, refusal, compliance, accuracy, judge)."""

from __future__ import annotations

from aligncollapse.cli.args import judge_spec, nonneg_int, positive_int, seed
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
from aligncollapse.errors import UserError


def register(sub) -> None:
    e = sub.add_parser("eval", help="safety evaluation: alignment loss, refusal, compliance, accuracy")
    add_model_args(e)
    add_eval_data_args(e)
    e.add_argument("--reference", help="aligned reference model for the KL forms of alignment loss")
    e.add_argument("--kl-samples", type=nonneg_int, default=4,
                   help="responses sampled per prompt for the sequence-level KL (Lemma 3.2); 0: greedy-path form only")  # fmt: skip
    e.add_argument("--refusal", default="zou2023", help="refusal detector: zou2023, xstest or a JSON keyword list")
    e.add_argument(
        "--judge", type=judge_spec, help="harmfulness judge: organism, hf:PATH or openai:MODEL@URL (off by default)"
    )
    e.add_argument("--max-new-tokens", type=positive_int, default=48)
    e.add_argument("--sample", action="store_true", help="sample (T=0.7, top-p 0.8, top-k 20) instead of greedy")
    e.add_argument("--seed", type=seed, default=0)
    e.add_argument("--out")
    add_data_args(e, "--eval-harmful and --eval-benign")
    e.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse.evaluation.judges import make_judge
    from aligncollapse.evaluation.metrics import (
        GenerationConfig,
        KLReference,
        SafetyEvalConfig,
        SequenceKL,
        evaluate_safety,
        headline,
    )
    from aligncollapse.models import load_model
    from aligncollapse.results import write_results

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    harmful, benign = eval_sets(args, model, tok, primary=True)
    kl = seq_kl = None
    if args.reference:
        ref, ref_tok = load_model(args.reference, dtype=args.dtype, device=args.device)
        if ref.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0] or len(
            ref_tok
        ) != len(tok):
            raise UserError(
                f"--reference {args.reference}: another vocabulary than --model; the KL needs the same tokenizer"
            )
        kl = KLReference(ref, tok, harmful, args.template, use_chat_template=use_chat(args))
        if args.kl_samples:
            seq_kl = SequenceKL(ref, tok, harmful, args.template, samples=args.kl_samples, seed=args.seed,
                                use_chat_template=use_chat(args))  # fmt: skip
        del ref
    cfg = SafetyEvalConfig(
        template=args.template,
        use_chat_template=use_chat(args),
        refusal=args.refusal,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed),
        bootstrap_seed=args.seed,
    )
    ev = evaluate_safety(model, tok, harmful, benign, cfg, kl_reference=kl, judge=make_judge(args.judge))
    extra = {}
    if seq_kl is not None:
        s = seq_kl(model)
        extra["alignment_kl_sequence"] = s["value"]
        extra["alignment_kl_sequence_stderr"] = s["stderr"]
        extra["kl_forms"] = {
            "alignment_kl": "greedy path: Σ_t KL(π_ref(·|x,y*<t) ‖ π_θ(·|x,y*<t)) along π_ref's greedy response y*",
            "alignment_kl_sequence": f"Lemma 3.2: E_x KL(π_ref(·|x) ‖ π_θ(·|x)), Monte Carlo over {s['samples_per_prompt']} "
            "responses per prompt sampled from π_ref at temperature 1 (first 32 tokens)",
        }
    out = out_dir(args, "eval")
    write_results(out, "eval", {"evaluation": ev, **headline(ev), **extra}, config(args))
    finish(out)
    print_table(f"evaluation -> {out}/results.json", {args.model: headline(ev)})
    if extra:
        print(f"sequence-level KL (Lemma 3.2): {extra['alignment_kl_sequence']:.4g} ± {extra['alignment_kl_sequence_stderr'] or 0:.2g} "
              f"(greedy-path form: {headline(ev).get('alignment_kl')})")  # fmt: skip
    return 0
