"""The demo: organism -> evaluation -> fine-tuning on a benign and a seemingly-benign set."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.evaluation import headline
from aligncollapse.finetune import FinetuneConfig, finetune
from aligncollapse.judge import OrganismJudge
from aligncollapse.models import load_model
from aligncollapse.organism.api import build_and_evaluate
from aligncollapse.organism.build import OrganismConfig, default_organism_dir
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.plots import plot_trajectories
from aligncollapse.results import write_results

DEMO_SETS = ("arithmetic", "affirmative_steps")


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
    judge = OrganismJudge()
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
        "plot": plot.name,
    }
    write_results(out, "demo", payload, {"align_steps": align_steps, "steps": steps, "sets": list(sets)})
    return payload
