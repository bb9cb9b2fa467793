"""Argument groups and loaders shared by the commands (one loader for data, models and sets)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import os
import warnings
from pathlib import Path

from aligncollapse.cli.args import device as args_device
from aligncollapse.cli.args import dtype as args_dtype
from aligncollapse.cli.args import fraction, int_or_auto, memory_size, nonneg_int, positive_float, positive_int, seed
from aligncollapse.errors import UserError


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001  pragma: no cover
        pass


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory or Hugging Face Hub id")
    p.add_argument("--dtype", type=args_dtype, default="float32", help="float32 (default), float64, bfloat16, float16")
    p.add_argument("--device", type=args_device, default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument(
        "--template", default="raw", choices=["raw", "alpaca", "samsum"], help="prompt template (default raw)"
    )
    p.add_argument("--no-chat-template", action="store_true", help="do not use the tokenizer's chat template")


def add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-harmful", help="held-out harmful prompts (+ safe targets); default: the organism's")
    p.add_argument("--eval-benign", help="held-out benign prompts (+ answers); default: the organism's")
    p.add_argument(
        "--safe-target",
        help="safe response for prompt-only harmful sets: a fixed TEXT, or 'model' for the model's own responses",
    )
    p.add_argument("--limit", type=positive_int, help="use at most this many rows of each evaluation set")


def add_eval_data_args_no_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-harmful", help="held-out harmful prompts (+ safe targets); default: the organism's")
    p.add_argument("--eval-benign", help="held-out benign prompts (+ answers); default: the organism's")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="store_true", help="fine-tune a peft LoRA adapter instead of all weights")
    p.add_argument("--lora-r", type=positive_int, default=64)
    p.add_argument("--lora-alpha", type=positive_float, default=128.0)
    p.add_argument("--lora-dropout", type=fraction, default=0.05)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="comma-separated module types")


def config(args) -> dict:
    """The command's arguments as recorded in results.json."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


def out_dir(args, command: str) -> Path:
    out = getattr(args, "out", None)
    if out is not None:
        if not str(out).strip():
            raise UserError("--out: an empty path; give a directory")
        return Path(out)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{stamp}"


RUN_MARKER = ".aligncollapse-run"
OWN_FILES = {RUN_MARKER, ".aligncollapse.lock"}


def prepare_out(path: Path, flag: str = "--out", create: bool = True, command: str | None = None) -> Path:
    """Check an output directory before any work, and claim it for ``command``.

    It must be a directory (or creatable) that we can write, that is empty or holds a run of the same
    command made by this tool (the marker file ``.aligncollapse-run``; runs from before the marker are
    recognised by their results.json), and that has no symlink anywhere below it leading outside it
    (outputs are never written through such a link). Nothing the tool did not make is ever replaced.
    """
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag} {path}: a dangling or looping symlink")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    if not path.exists():
        if not create:
            return path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    try:
        probe = path / ".aligncollapse-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: not writable ({e.strerror})") from None
    _check_symlinks(path, flag)
    if command is not None:
        _check_ownership(path, flag, command)
    if command is not None and not (path / RUN_MARKER).exists():
        (path / RUN_MARKER).write_text(command + "\n")
    return path


def _check_ownership(path: Path, flag: str, command: str) -> None:
    entries = {p.name for p in path.iterdir()} - OWN_FILES
    if not entries:
        return
    marker = path / RUN_MARKER
    if marker.is_file():
        owner = marker.read_text(errors="replace").strip()
        if owner != command:
            raise UserError(
                f"{flag} {path}: holds an aligncollapse {owner!r} run; use another directory for {command!r}"
            )
        return
    res = path / "results.json"
    if res.is_file():
        try:
            import json

            old = json.loads(res.read_text())
        except (OSError, ValueError, RecursionError):
            old = None
        if isinstance(old, dict) and old.get("schema") == "aligncollapse.results":
            if old.get("command") == command:
                return
            raise UserError(f"{flag} {path}: holds an aligncollapse {old.get('command')!r} run; use another directory")
    raise UserError(
        f"{flag} {path}: is not empty and was not made by aligncollapse {command}; choose a new or empty directory"
    )


def _check_symlinks(path: Path, flag: str, limit: int = 100_000) -> None:
    """No symlink anywhere below ``path`` may lead outside it (or loop)."""
    root = path.resolve()
    seen = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            if seen > limit:
                return
            entry = Path(dirpath) / name
            if not entry.is_symlink():
                continue
            try:
                target = entry.resolve(strict=False)
            except (RuntimeError, OSError):
                raise UserError(f"{flag} {path}: {entry} is a looping symlink") from None
            if target != root and root not in target.parents:
                raise UserError(
                    f"{flag} {path}: {entry.relative_to(path)} is a symlink to {target}, outside {flag}; refusing to write through it"
                )


@contextlib.contextmanager
def lock_out(path: Path):
    """An exclusive lock on ``path/.aligncollapse.lock`` for the command's duration (filelock)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / ".aligncollapse.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"--out {path}: another aligncollapse process is writing there (lock .aligncollapse.lock)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def use_chat(args) -> bool | None:
    return False if getattr(args, "no_chat_template", False) else None


def organism_suite(model_path: str) -> Path | None:
    suite = Path(model_path) / "suite"
    return suite if (suite / "manifest.json").exists() else None


def add_data_args(p: argparse.ArgumentParser, applies_to: str) -> None:
    """How rows map to examples. Field flags apply to the command's main data; shape flags to every file."""
    g = p.add_argument_group("data fields", f"--prompt-field/--response-field/--answer-field apply to {applies_to}")
    g.add_argument("--prompt-field", help="the field holding the prompt (overrides shape detection)")
    g.add_argument("--response-field", help="the field holding the response")
    g.add_argument("--answer-field", help="the field holding a reference answer (accuracy)")
    g.add_argument(
        "--hh-side", default="chosen", choices=["chosen", "rejected"], help="Anthropic HH rows: which dialogue"
    )
    g.add_argument(
        "--mt-bench-turns", default="first", choices=["first", "all"], help="MT-Bench rows: first or all turns"
    )
    g.add_argument(
        "--targets", help="HarmBench targets JSON (id -> affirmative target), joined to behaviors by BehaviorID"
    )


def data_kwargs(args, primary: bool) -> dict:
    """load_examples keyword arguments from the data flags (field flags only for the main data)."""
    kw = {
        "hh_side": getattr(args, "hh_side", "chosen"),
        "mt_bench_turns": getattr(args, "mt_bench_turns", "first"),
        "targets": getattr(args, "targets", None),
    }
    if primary:
        kw.update(
            prompt_field=getattr(args, "prompt_field", None),
            response_field=getattr(args, "response_field", None),
            answer_field=getattr(args, "answer_field", None),
        )
    return kw


def harmful_prompts(path: str, args, model, tokenizer, primary: bool = False):
    """Harmful prompts with safe targets: from the file, a fixed --safe-target, or the model's own."""
    from aligncollapse.data.loading import load_examples_with_info
    from aligncollapse.progress import log

    fixed = args.safe_target if args.safe_target not in (None, "model") else None
    exs, info = load_examples_with_info(path, limit=args.limit, **data_kwargs(args, primary))
    harmful_targets = {"advbench", "harmbench"} & set(info["shapes"])
    if harmful_targets and not getattr(args, "response_field", None):
        # AdvBench's `target` and HarmBench's joined targets are affirmative (harmful) completions: they
        # must never stand in for the safe response of a harmful prompt.
        for e in exs:
            e.response = None
        log(f"data: {path}: the {'/'.join(sorted(harmful_targets))} targets are harmful completions, not safe "
            "targets; they are dropped (give --safe-target TEXT or model)")  # fmt: skip
    if fixed is not None:
        for e in exs:
            if e.response is None:
                e.response = fixed
    if args.safe_target == "model" and any(e.response is None for e in exs):
        from aligncollapse.evaluation.metrics import generate_safe_targets

        exs, frac = generate_safe_targets(model, tokenizer, exs, args.template, use_chat_template=use_chat(args))
        print(f"safe targets generated by the model ({frac:.0%} of them are refusals)")
    return exs


def eval_sets(args, model=None, tokenizer=None, primary: bool = False):
    """Held-out harmful and benign sets from the flags, else from the organism's suite."""
    from aligncollapse.data.loading import load_examples
    from aligncollapse.organism.suite import load_suite_set

    suite = organism_suite(args.model)
    harmful = benign = None
    if args.eval_harmful:
        harmful = harmful_prompts(args.eval_harmful, args, model, tokenizer, primary)
    elif suite is not None:
        harmful = load_suite_set(suite, "eval_harmful")
    if args.eval_benign:
        benign = load_examples(args.eval_benign, limit=args.limit, **data_kwargs(args, primary))
    elif suite is not None:
        benign = load_suite_set(suite, "eval_benign")
    if harmful is None:
        raise UserError("no harmful evaluation set: give --eval-harmful (the organism has one built in)")
    return harmful, benign


def training_data(spec: str, args):
    """A data file / HF dataset, or the name of a set in the organism's suite."""
    from aligncollapse.data.loading import load_examples
    from aligncollapse.organism.suite import load_suite_set

    suite = organism_suite(args.model)
    if suite is not None and not Path(spec).exists() and "/" not in spec and "." not in spec:
        return load_suite_set(suite, spec)
    return load_examples(spec, require_response=True, **data_kwargs(args, primary=True))


def print_table(title: str, rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["harmful_refusal_rate", "harmful_compliance_rate", "benign_accuracy", "alignment_loss", "alignment_kl"]
    short = {
        "harmful_refusal_rate": "refusal",
        "harmful_compliance_rate": "compliance",
        "benign_accuracy": "benign acc",
        "alignment_loss": "align NLL",
        "alignment_kl": "align KL",
    }
    table = Table(title=title)
    table.add_column("model / data")
    for c in cols:
        table.add_column(short[c], justify="right")
    for name, vals in rows.items():
        table.add_row(name, *("-" if vals.get(c) is None else f"{vals[c]:.3f}" for c in cols))
    Console(stderr=False).print(table)


def safety_set(args, model, tok, primary: bool = False):
    """The safety skill's data: --safety, else the organism's safety set."""
    from aligncollapse.organism.suite import load_suite_set

    if args.safety:
        return harmful_prompts(args.safety, args, model, tok, primary)
    suite = organism_suite(args.model)
    if suite is None:
        raise UserError("no safety set: give --safety (the organism has one built in)")
    exs = load_suite_set(suite, "safety")
    return exs[: args.limit] if args.limit else exs


def blocks(args):
    import re

    from aligncollapse.models import BlockSelection, parse_layers

    for pat in args.blocks.split(",") if args.blocks else ():
        try:
            re.compile(pat)
        except re.error as e:
            raise UserError(f"--blocks {pat!r}: not a regular expression ({e})") from None

    return BlockSelection(
        patterns=args.blocks.split(",") if args.blocks else (),
        layers=parse_layers(args.layers),
        module_types=args.modules.split(",") if args.modules else (),
    )


def add_method_args(p: argparse.ArgumentParser) -> None:
    """How the scan measures the Fisher: exact Lanczos or the sample space (scan, rank, study)."""
    p.add_argument(
        "--scan-method",
        choices=["auto", "exact", "sample"],
        default="auto",
        help="exact: Lanczos on the exact Fisher (memory grows with n·(k + M)); sample: a sampled Fisher in sample "
        "space (memory: the model and a handful of n-vectors); auto: exact up to 1M selected parameters when its "
        "memory plan fits, else sample",
    )
    p.add_argument(
        "--fisher-samples",
        type=int_or_auto,
        default="auto",
        help="sample method: label draws per safety prompt (the sampled Fisher's rank is at most N × this); auto: "
        "4, fewer (down to 1) when the memory plan at 4 does not fit --max-memory",
    )


def scan_settings(args):
    from aligncollapse.models import BlockSelection
    from aligncollapse.results import read_results
    from aligncollapse.scan.aic import ScanSettings

    threshold = None
    if args.threshold not in (None, "none", "organism"):
        threshold = float(args.threshold)
    elif args.threshold in (None, "organism") and (Path(args.model) / "results.json").is_file():
        try:
            saved = read_results(Path(args.model))
            threshold = saved.get("calibration", {}).get("collapse_kl") if isinstance(saved, dict) else None
        except (OSError, ValueError, RecursionError, AttributeError):
            threshold = None
        if threshold is not None and not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0
        ):
            raise UserError(
                f"{Path(args.model) / 'results.json'}: calibration.collapse_kl is not a number; give --threshold"
            )
    if isinstance(args.d, int) and args.d > args.max_d:
        raise UserError(f"--d {args.d} is larger than --max-d {args.max_d} (the eigenpairs computed); raise --max-d")
    sel = blocks(args)
    return ScanSettings(
        d=args.d, max_d=args.max_d, optimizer=args.optimizer, lr=args.lr, steps=args.steps,
        n_boot=args.n_boot, seed=args.seed, threshold=threshold, ft_batch_size=args.batch_size, template=args.template, use_chat_template=use_chat(args),
        blocks=BlockSelection(patterns=sel.patterns, layers=sel.layers, module_types=sel.module_types, trainable_only=True),
        method=args.scan_method, fisher_samples=args.fisher_samples,
    )  # fmt: skip


def scan_limits(args, model):
    """ScanSettings carrying --max-memory for the scans inside rank and study."""
    from aligncollapse.scan.aic import ScanSettings

    s = ScanSettings()
    s.max_memory, s.max_memory_flag = memory_limit(args.max_memory, next(model.parameters()).device)
    s.method = getattr(args, "scan_method", s.method)
    s.fisher_samples = getattr(args, "fisher_samples", s.fisher_samples)
    return s


def memory_limit(spec: str, device) -> tuple[int, str]:
    """``--max-memory`` in bytes (``auto``: what ``device`` offers) and how it was given."""
    from aligncollapse.geometry.memory import available_memory, parse_size

    if spec == "auto":
        return available_memory(
            device
        ), f"auto ({'device memory' if str(device).startswith('cuda') else 'available RAM'})"
    return parse_size(spec), spec


def lora_settings(args):
    from aligncollapse.models import LoraSettings

    if not args.lora:
        return None
    return LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","))


def candidates(args) -> dict:
    """Named candidate sets from --finetune (files or suite names) or --suite organism."""
    from aligncollapse.organism.suite import load_suite_set, suite_sets_by_category

    if getattr(args, "suite", None):
        if args.suite != "organism":
            raise UserError(f"--suite must be 'organism', got {args.suite!r}")
        suite = organism_suite(args.model)
        if suite is None:
            raise UserError(f"--suite organism needs --model to be an organism directory ({args.model} has no suite/)")
        return {e["name"]: load_suite_set(suite, e["name"]) for e in suite_sets_by_category(suite)}
    if not args.finetune:
        raise UserError("give candidate sets with --finetune D1 D2 ... (or --suite organism)")
    out = {}
    for spec in args.finetune:
        name = Path(spec).name.split(".")[0] if Path(spec).exists() else spec.replace("/", "_")
        if name in out:
            raise UserError(f"--finetune: two candidates are both named {name!r}")
        out[name] = training_data(spec, args)
    return out


def budget(args, lora=None, lr=None):
    from aligncollapse.training.finetune import FinetuneConfig

    return FinetuneConfig(
        optimizer=args.optimizer, lr=lr if lr is not None else args.lr, steps=args.steps, batch_size=args.batch_size,
        seed=args.seed, template=args.template, use_chat_template=use_chat(args), lora=lora,
    )  # fmt: skip


def unaligned_model(args):
    """--base-model, else the organism's unaligned base (for the Safe-LoRA baseline), else None."""
    from aligncollapse.models import load_model

    path = args.base_model or (
        str(Path(args.model) / "base") if (Path(args.model) / "base" / "config.json").exists() else None
    )
    return load_model(path, dtype=args.dtype, device=args.device)[0] if path else None


def rank_context(args, model, tok, cfg):
    from aligncollapse.data.loading import load_examples
    from aligncollapse.predict.rank import build_context

    safety = safety_set(args, model, tok)
    anchors = load_examples(args.anchors, require_response=True, **data_kwargs(args, False)) if args.anchors else None
    suite = organism_suite(args.model)
    if anchors is None and suite is not None and (Path(suite) / "harmful_anchors.jsonl").exists():
        anchors = load_examples(Path(suite) / "harmful_anchors.jsonl")  # v2 organisms ship He et al.-style anchors
    return build_context(model, tok, safety, cfg, anchors=anchors, unaligned_model=unaligned_model(args))


def tuning_set(args) -> tuple[str, list] | None:
    """The defense study's development set: --tune-on (file / HF dataset / suite name, 'none' for no
    tuning); on the organism it defaults to reckless_advice (not a reported set)."""
    spec = getattr(args, "tune_on", None)
    if spec == "none":
        return None
    if spec is None:
        suite = organism_suite(args.model)
        if suite is None or args.finetune:
            return None
        from aligncollapse.organism.suite import load_suite_set

        return "reckless_advice", load_suite_set(suite, "reckless_advice")
    name = Path(spec).name.split(".")[0] if Path(spec).exists() else spec.replace("/", "_")
    return name, training_data(spec, args)


def defense_sets(args) -> dict:
    if args.finetune:
        return candidates(args)
    suite = organism_suite(args.model)
    if suite is None:
        raise UserError(
            "--defenses needs --finetune D1 [D2] (the organism defaults to obedient_identity and arithmetic)"
        )
    from aligncollapse.organism.suite import load_suite_set

    return {n: load_suite_set(suite, n) for n in ("obedient_identity", "arithmetic")}


def add_candidate_args(p, lora_flag: bool) -> None:
    add_model_args(p)
    if lora_flag:
        add_lora_args(p)
    p.add_argument("--safety", help="safety set (harmful prompts + safe responses); default: the organism's")
    p.add_argument("--safe-target", help="for prompt-only safety sets: a fixed TEXT, or 'model'")
    p.add_argument("--limit", type=positive_int, help="use at most this many safety / evaluation rows")
    p.add_argument("--finetune", nargs="+", help="candidate fine-tuning sets: files / HF datasets / suite names")
    p.add_argument("--base-model", help="the unaligned base model (Safe-LoRA baseline); default: the organism's")
    p.add_argument("--anchors", help="harmful anchors (harmful prompt + compliant response) for gradient matching")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--steps", type=positive_int, default=40, help="the planned budget in optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--probe-steps", type=nonneg_int, default=3, help="real steps of the short-probe score (0: off)")
    p.add_argument("--max-memory", type=memory_size, default="auto",
                   help="stop before any heavy work when a candidate's planned scan peak exceeds this: a size "
                   "(16GB, 500MB, bytes) or auto (the CUDA device's memory, else the available RAM; default)")  # fmt: skip
    add_method_args(p)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out")


def finish(out: Path) -> Path:
    """Render the run's report from the results.json just written; returns report.html. A run whose
    results hold NaN values ends with status 3 after its report is written."""
    from aligncollapse.errors import NonFiniteError
    from aligncollapse.reporting import render
    from aligncollapse.results import read_results

    page = render(out)
    bad = read_results(Path(out)).get("non_finite")
    if bad:
        raise NonFiniteError(f"{bad['count']} result(s) are NaN ({', '.join(bad['fields'][:3])}); see {page}")
    return page


def check_fsdp(args, method_ok: bool, method_error: str) -> None:
    """``--fsdp``'s one-line refusals, before the model is loaded whole onto one device: one process,
    or a method (``method_ok`` False, ``method_error`` says which) that cannot run on a sharded model."""
    from aligncollapse import distributed

    if not args.fsdp:
        return
    if not distributed.is_distributed():
        raise UserError("--fsdp shards the model over the processes of torchrun or accelerate launch; "
                        "this is one process: drop --fsdp")  # fmt: skip
    if not method_ok:
        raise UserError(method_error)


def shard_if_fsdp(args, model):
    """``model`` sharded with FSDP2 onto this rank's device under ``--fsdp`` (loaded on the host first,
    ``device="cpu"``, so that it need not fit one device whole), else as it is."""
    from aligncollapse import distributed
    from aligncollapse.models import parse_device

    if not args.fsdp:
        return model
    return distributed.shard_model(model, distributed.local_device(parse_device(args.device)))
