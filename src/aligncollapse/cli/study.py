"""`aligncollapse study`: predictors against measured harm, or the defense study."""

from __future__ import annotations

from aligncollapse.cli.args import (
    defense_spec,
    fraction,
    int_at_least,
    int_list,
    judge_spec,
    name_list,
    positive_float,
    positive_int,
)
from aligncollapse.cli.common import (
    add_candidate_args,
    add_data_args,
    add_eval_data_args_no_limit,
    budget,
    candidates,
    config,
    defense_sets,
    eval_sets,
    finish,
    organism_suite,
    out_dir,
    rank_context,
    scan_limits,
    tuning_set,
    unaligned_model,
)
from aligncollapse.errors import UserError


def register(sub) -> None:
    st = sub.add_parser("study", help="validate predictors against real fine-tunes, or compare defenses")
    add_candidate_args(st, lora_flag=False)
    add_eval_data_args_no_limit(st)
    st.add_argument("--suite", help="'organism': every set of the organism's suite")
    st.add_argument("--modes", type=name_list(("full", "lora")), default="full,lora", help="full and/or lora")
    st.add_argument("--seeds", type=int_list, default="0,1,2", help="fine-tuning seeds, comma-separated")
    st.add_argument("--lora-r", type=positive_int, default=8)
    st.add_argument("--lora-alpha", type=positive_float, default=16.0)
    st.add_argument("--lora-dropout", type=fraction, default=0.0)
    st.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    st.add_argument("--lora-lr", type=positive_float, default=2e-3)
    st.add_argument(
        "--judge",
        type=judge_spec,
        help="harmfulness judge: organism (default on the organism), hf:PATH, openai:MODEL@URL",
    )
    st.add_argument("--n-boot", type=int_at_least(20), default=1000)
    st.add_argument("--defenses", nargs="+", type=defense_spec,
                    help="defenses to compare (defense study): names with options (curvature:every=1,d=8) or 'all'")  # fmt: skip
    st.add_argument("--tune-on", metavar="SET",
                    help="defense study: development set each defense is tuned on (same budget: 3 settings, seed 0), "
                    "scored on half of the eval prompts; reported rows use the other half. Default on the "
                    "organism: reckless_advice; 'none': no tuning")  # fmt: skip
    add_data_args(st, "--finetune")
    st.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.evaluation.judges import make_judge
    from aligncollapse.models import LoraSettings, load_model
    from aligncollapse.organism.judge import OrganismJudge
    from aligncollapse.results import write_results

    if args.defenses and distributed.is_distributed():
        raise UserError("study --defenses does not run under torchrun yet; run it in one process")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    harmful, benign = eval_sets(args, model, tok)
    if not harmful:
        raise UserError("the study needs held-out harmful prompts: give --eval-harmful")
    judge = make_judge(args.judge) if args.judge else (OrganismJudge() if organism_suite(args.model) else None)
    out = out_dir(args, "study")
    base_cfg = budget(args)
    with distributed.solo():  # under torchrun each rank builds the context alone; the units are split
        ctx = rank_context(args, model, tok, base_cfg)
    if args.defenses:
        from aligncollapse.defenses.study import run_defense_study

        sets = defense_sets(args)
        res = run_defense_study(ctx, sets, out, base_cfg, args.defenses, args.seeds, harmful, benign, judge=judge,
                                unaligned=unaligned_model(args), tune_on=tuning_set(args))  # fmt: skip
        write_results(out, "study defenses", res, config(args))
        finish(out)
        _print_defense_table(res, out)
        return 0
    cands = candidates(args)
    modes = args.modes
    configs = {}
    if "full" in modes:
        configs["full"] = base_cfg
    if "lora" in modes:
        lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","))
        configs["lora"] = budget(args, lora=lora, lr=args.lora_lr)
    cats = {}
    suite = organism_suite(args.model)
    if suite is not None:
        from aligncollapse.organism.suite import read_manifest

        cats = {e["name"]: e["category"] for e in read_manifest(suite)}
    from aligncollapse.predict.study import run_study

    res = run_study(ctx, cands, out, configs, args.seeds, harmful, benign, judge=judge,
                    probe_steps=args.probe_steps, n_boot=args.n_boot, categories=cats,
                    scan=scan_limits(args, model))  # fmt: skip
    if not distributed.is_main():  # rank 0 writes results.json and the report
        return 0
    write_results(out, "study", res, config(args))
    finish(out)
    for mode, sm in res["summary"].items():
        sp = sm["spearman"] or {}
        print(f"{mode} (preregistered): {sm['primary_predictor']} vs {sm['primary_measure']} over {sm['n_sets']} sets: "
              f"Spearman ρ = {_f(sp.get('value'))} [{_f(sp.get('ci_low'))}, {_f(sp.get('ci_high'))}], one-sided "
              f"permutation p = {_f(sm['permutation_p_greater'])}, Holm p = {_f(sm['p_holm'])}; published baselines "
              + ", ".join(f"{k} ρ = {_f(v)}" for k, v in sm["published_baselines_spearman"].items()))  # fmt: skip
    print(f"report: {out}/report.html")
    return 0


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _print_defense_table(res: dict, out) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"defenses -> {out}/report.html")
    for c in ("data", "defense", "refusal", "95% CI", "task metric", "Δ task", "time ×"):
        t.add_column(c)
    for data, rows in res["table"].items():
        for r in rows:
            t.add_row(data, r["defense"], f"{r['refusal']:.2f}", f"[{r['refusal_ci'][0]:.2f}, {r['refusal_ci'][1]:.2f}]",
                      f"{r['task_metric']:.3f}", f"{r['task_delta']:+.3f}", f"{r['time_ratio']:.2f}")  # fmt: skip
    Console().print(t)
