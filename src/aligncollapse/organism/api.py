"""Build, describe and evaluate the organism in one call (what ``organism build`` runs)."""

from __future__ import annotations

from pathlib import Path

from aligncollapse.evaluation import SafetyEvalConfig, evaluate_safety, headline
from aligncollapse.judge import OrganismJudge
from aligncollapse.organism.build import OrganismConfig, build_organism
from aligncollapse.organism.suite import load_suite_set, write_suite
from aligncollapse.results import read_results, write_results


def build_and_evaluate(out_dir: str | Path, cfg: OrganismConfig | None = None, force: bool = False) -> dict:
    """Build (or reuse) the organism in ``out_dir``, write its suite to ``out_dir/suite`` and its
    held-out evaluation to ``out_dir/results.json``; a cached build reuses the saved evaluation."""
    from aligncollapse.models import load_model

    cfg = cfg or OrganismConfig()
    out = Path(out_dir)
    meta = build_organism(out, cfg, force=force)
    res_path = out / "results.json"
    if meta["cached"] and res_path.exists():
        saved = read_results(res_path)
        if saved.get("organism", {}).get("key") == meta["key"] and (out / "suite" / "manifest.json").exists():
            saved["organism"]["cached"] = True
            return saved
    write_suite(out / "suite", seed=cfg.seed)
    model, tok = load_model(out)
    harmful = load_suite_set(out / "suite", "eval_harmful")
    benign = load_suite_set(out / "suite", "eval_benign")
    ev = evaluate_safety(model, tok, harmful, benign, SafetyEvalConfig(), judge=OrganismJudge())
    ev["summary"] = headline(ev)
    payload = {"organism": meta, "evaluation": ev}
    write_results(out, "organism build", payload, {"organism": meta["config"]})
    return payload
