"""The organism's fine-tuning suite and evaluation sets, written as JSONL with a manifest.

``manifest.json`` lists every file as ``{"name", "category", "path", "size"}`` with category one
of ``benign``, ``seemingly_benign``, ``harmful`` (fine-tuning sets), ``safety`` (the safety
skill's reference data for the Fisher), ``eval_harmful`` and ``eval_benign`` (held-out prompts
that appear in no training set), and in v2 ``anchors`` (harmful anchors for He et al.'s baselines).
"""

from __future__ import annotations

from pathlib import Path

from aligncollapse.data.loading import load_examples, save_examples
from aligncollapse.errors import UserError
from aligncollapse.organism import corpus
from aligncollapse.organism.build import turns_to_examples
from aligncollapse.results import atomic_write_json, read_results

CATEGORIES = ("benign", "seemingly_benign", "harmful", "safety", "eval_harmful", "eval_benign", "anchors")


def write_suite(out_dir: str | Path, seed: int = 0, size: int = 128, version: int = 2) -> dict:
    """Write every suite set, the safety set and the held-out evaluation sets; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus.for_version(version)
    files: list[tuple[str, str, list]] = []
    for name, (category, turns) in text.suite_sets(seed, size).items():
        files.append((name, category, turns))
    files.append(("safety", "safety", text.safety_turns(seed)))
    files.append(("eval_harmful", "eval_harmful", text.eval_harmful_turns(seed)))
    files.append(("eval_benign", "eval_benign", text.eval_benign_turns(seed)))
    if hasattr(text, "anchor_turns"):  # v2: harmful anchors for He et al.'s baselines (training side)
        files.append(("harmful_anchors", "anchors", text.anchor_turns(seed)))
    check_disjoint(files)
    entries = []
    for name, category, turns in files:
        path = f"{name}.jsonl"
        save_examples(out / path, turns_to_examples(turns))
        entries.append({"name": name, "category": category, "path": path, "size": len(turns)})
    manifest = {"seed": seed, "version": version, "files": entries}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def check_disjoint(files) -> None:
    """Evaluation prompts must appear in no training set (nor in pretraining or alignment)."""
    train_prompts = {t.prompt for _, cat, ts in files if cat not in ("eval_harmful", "eval_benign") for t in ts}
    eval_prompts = {t.prompt for _, cat, ts in files if cat in ("eval_harmful", "eval_benign") for t in ts}
    overlap = train_prompts & eval_prompts
    if overlap:
        raise AssertionError(f"evaluation prompts leak into training sets: {sorted(overlap)[:5]}")


def read_manifest(suite_dir: str | Path) -> list[dict]:
    path = Path(suite_dir) / "manifest.json"
    if not path.exists():
        raise UserError(f"{suite_dir}: no manifest.json (write one with 'aligncollapse organism suite')")
    files = read_results(path).get("files")
    if not isinstance(files, list):
        raise UserError(f"{path}: field 'files' must be a list")
    for i, f in enumerate(files):
        for key in ("name", "category", "path", "size"):
            if key not in f:
                raise UserError(f"{path}: files[{i}] is missing field {key!r}")
        if f["category"] not in CATEGORIES:
            raise UserError(f"{path}: files[{i}].category must be one of {CATEGORIES}, got {f['category']!r}")
    return files


def load_suite_set(suite_dir: str | Path, name: str):
    """Load one set of a suite by name (as :class:`~aligncollapse.data.Example` list)."""
    for f in read_manifest(suite_dir):
        if f["name"] == name:
            return load_examples(Path(suite_dir) / f["path"])
    names = [f["name"] for f in read_manifest(suite_dir)]
    raise UserError(f"{suite_dir}: no set named {name!r}; available: {names}")


def suite_sets_by_category(suite_dir: str | Path, categories=("benign", "seemingly_benign", "harmful")) -> list[dict]:
    return [f for f in read_manifest(suite_dir) if f["category"] in categories]
