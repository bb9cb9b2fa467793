"""The demo: organism -> evaluation -> pre-flight scan and fine-tuning on a benign and a seemingly-benign set."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.aic import ScanSettings
from aligncollapse.evaluation import headline
from aligncollapse.finetune import FinetuneConfig, finetune
from aligncollapse.judge import OrganismJudge
from aligncollapse.models import load_model
from aligncollapse.organism.api import build_and_evaluate
from aligncollapse.organism.build import OrganismConfig, default_organism_dir
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.plots import plot_trajectories
from aligncollapse.results import write_results
from aligncollapse.scan import run_scan

DEMO_SETS = ("arithmetic", "affirmative_steps")
# The pre-flight scan's planned run: full-batch SGD, the setting the theory speaks about.
DEMO_SCAN = dict(optimizer="sgd", lr=1e-2, steps=30, ft_batch_size=0, n_boot=200)


def run_demo(
    out_dir: str | Path,
    organism_dir: str | Path | None = None,
    align_steps: int = 60,
    steps: int = 40,
    sets: tuple[str, ...] = DEMO_SETS,
) -> dict:
    cfg = OrganismConfig(align_steps=align_steps)
    org_dir = Path(organism_dir) if organism_dir else default_organism_dir(cfg)
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
        sc = run_scan(
            model,
            tok,
            safety,
            load_suite_set(suite, name),
            out / "scan" / name,
            ScanSettings(threshold=threshold, **DEMO_SCAN),
            name,
        )
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
    plot = plot_trajectories(
        {n: r["trajectory"] for n, r in finetuned.items()}, out / "demo.png", "organism: fine-tuning trajectories"
    )
    payload = {
        "organism_dir": str(org_dir),
        "organism": {"summary": org["evaluation"]["summary"], "meta": org["organism"], "evaluation": org["evaluation"]},
        "finetuned": finetuned,
        "scan": scans,
        "plot": plot.name,
    }
    write_results(out, "demo", payload, {"align_steps": align_steps, "steps": steps, "sets": list(sets)})
    return payload
