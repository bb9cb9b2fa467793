"""The demo: organism -> evaluation -> pre-flight scan and fine-tuning on a benign and a seemingly-benign set."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.cli.args import positive_int
from aligncollapse.cli.common import out_dir, print_table
from aligncollapse.evaluation.metrics import headline
from aligncollapse.models import load_model
from aligncollapse.organism.api import build_and_evaluate
from aligncollapse.organism.build import DEFAULT_VERSION, OrganismConfig, config_of, default_organism_dir
from aligncollapse.organism.judge import OrganismJudge
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.reporting import render_index
from aligncollapse.results import write_results
from aligncollapse.scan.aic import ScanSettings
from aligncollapse.scan.run import run_scan
from aligncollapse.training.finetune import FinetuneConfig, finetune

DEMO_SETS = ("arithmetic", "affirmative_steps")
# The pre-flight scan's planned run: full-batch SGD, the setting the theory speaks about.
DEMO_SCAN = dict(optimizer="sgd", lr=1e-2, steps=30, ft_batch_size=0, n_boot=200)


def run_demo(
    out_dir: str | Path,
    organism_dir: str | Path | None = None,
    align_steps: int | None = None,
    steps: int = 40,
    sets: tuple[str, ...] = DEMO_SETS,
    version: int = DEFAULT_VERSION,
) -> dict:
    cfg = OrganismConfig(align_steps=align_steps, version=version)
    org_dir = Path(organism_dir) if organism_dir else default_organism_dir(cfg)
    if organism_dir:
        cfg = config_of(org_dir) or cfg  # a given build is used as it is, never rebuilt with other settings
    org = build_and_evaluate(org_dir, cfg)
    out = Path(out_dir)
    suite = org_dir / "suite"
    harmful = load_suite_set(suite, "eval_harmful")
    benign = load_suite_set(suite, "eval_benign")
    finetuned: dict[str, dict] = {}
    scans: dict[str, dict] = {}
    judge = OrganismJudge()
    safety = load_suite_set(suite, "safety")
    for name in sets:
        model, tok = load_model(org_dir)
        threshold = (org.get("calibration") or {}).get("collapse_kl")
        scan_dir = out / "scan" / name
        sc = run_scan(
            model,
            tok,
            safety,
            load_suite_set(suite, name),
            scan_dir,
            ScanSettings(threshold=threshold, **DEMO_SCAN),
            name,
        )
        write_results(scan_dir, "scan", sc, {"finetune": name, "organism": str(org_dir), **DEMO_SCAN})
        scans[name] = {
            "regime": sc["regime"], "verdict": sc["verdict"], "eps_orth_rel": sc["eps_orth_rel"], "eps_orth_random": sc["eps_orth_random"],
            "gamma": sc["gamma"], "gamma_random": sc["gamma_random"], "forecast_at_budget": sc["forecast"]["at_budget"],
            "report": f"scan/{name}/report.html", "planned": DEMO_SCAN,
        }  # fmt: skip
    for name in sets:
        model, tok = load_model(org_dir)
        res = finetune(
            model,
            tok,
            load_suite_set(suite, name),
            out / "finetune" / name,
            FinetuneConfig(steps=steps, refusal_every=10),
            eval_harmful=harmful,
            eval_benign=benign,
            resume=False,
            save_model=False,
        )
        ev = res["evaluation"]
        scores = judge.score_many(
            [s["prompt"] for s in ev["samples_harmful"]], [s["response"] for s in ev["samples_harmful"]]
        )
        finetuned[name] = {
            "summary": headline(ev),
            "organism_judge_mean_on_samples": sum(scores) / len(scores),
            "evaluation": ev,
            "trajectory": res["trajectory"],
            "seconds": res["seconds"],
        }
    payload = {
        "organism_dir": str(org_dir),
        "organism": {"summary": org["evaluation"]["summary"], "meta": org["organism"], "evaluation": org["evaluation"]},
        "finetuned": finetuned,
        "scan": scans,
        "plot": "demo.png",
    }
    write_results(out, "demo", payload, {"align_steps": cfg.align_steps, "organism_version": cfg.version, "steps": steps,
                                         "sets": list(sets)})  # fmt: skip
    render_index(out)  # the demo's report, each scan's and fine-tune's, and index.html linking them
    return payload


def register(sub) -> None:
    d = sub.add_parser("demo", help="build the organism, evaluate, fine-tune on a benign and a seemingly-benign set")
    d.add_argument("--out", help="output directory (default runs/demo-<timestamp>)")
    d.add_argument("--organism", help="organism directory (default: the cache)")
    d.add_argument("--align-steps", type=positive_int, help="organism alignment depth (default: the version's)")
    d.add_argument("--organism-version", type=int, choices=(1, 2), default=DEFAULT_VERSION,
                   help="organism corpus version (see organism build)")  # fmt: skip
    d.add_argument("--steps", type=positive_int, default=40, help="fine-tuning steps per set")
    d.set_defaults(func=run)


def run(args) -> int:
    out = out_dir(args, "demo")
    res = run_demo(out, organism_dir=args.organism, align_steps=args.align_steps, steps=args.steps,
                   version=args.organism_version)  # fmt: skip
    rows = {"organism (aligned)": res["organism"]["summary"]}
    rows.update({f"after {name}": r["summary"] for name, r in res["finetuned"].items()})
    print_table(f"demo -> {out}/report.html (all runs: {out}/index.html)", rows)
    for name, sc in res["scan"].items():
        print(f"scan {name} (SGD lr {sc['planned']['lr']}, {sc['planned']['steps']} full-batch steps): {sc['verdict']}")
        print(
            f"    ‖Pg‖/‖g‖ = {sc['eps_orth_rel']:.3g} (random {sc['eps_orth_random']:.2g}), γ = {sc['gamma']:.3g} (random {sc['gamma_random']:.3g}); report {out}/{sc['report']}"
        )
    return 0
