"""How the scan scales: time ÷ its floor and peak memory on random-init Llamas, measured in one run.

    python benchmarks/scale_benchmark.py --sizes 0.4M,1M,4M [--json FILE]       # (a) CPU sizes
    python benchmarks/scale_benchmark.py --llama1b-2layer [--json FILE]          # (b) plan (and run if it fits)
    python benchmarks/scale_benchmark.py --llama1b-2layer --plan-draws           # (b) the sample plan at S = 1..4
    python benchmarks/scale_benchmark.py --llama3b --device cuda --dtype bfloat16  # (c) a GPU machine

Each size runs in its own subprocess (so peak RSS is that model's). Per model:

* ``floor_seconds``: what any scan must do at least — one forward+backward per safety prompt (the
  per-example gradients of the Fisher) plus one Hessian-vector product over the fine-tuning set,
  timed here on the same model, data and threads;
* ``scan_seconds``: ``measure_aic`` with the default settings (``--n-boot`` resamples);
* ``peak_rss_gb``: the process's peak resident memory (``resource.getrusage``) minus its RSS before
  the model existed; ``planned_peak_gb``: the scan's own memory plan (``geometry/memory.py``);
* on CUDA, ``peak_gpu_gb`` from ``torch.cuda.max_memory_allocated``.

A model whose plan exceeds the available memory is not run: its row says so (``fits: false``) with
the plan, which is the honest answer for the exact scan at that size. The growth exponents of
scan time and peak memory in n are least-squares slopes in log-log over the rows that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time


def parse_size(text: str) -> float:
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9}.get(t[-1], 1.0)
    return float(t[:-1] if t[-1] in "KMB" else t) * mult


def shape_for(n_target: float, vocab: int) -> tuple[int, int]:
    """(hidden, layers) of a Llama with about ``n_target`` parameters (MLP = 2.6875 × hidden)."""
    layers = 2 if n_target < 1e6 else 4
    per_layer = 4 + 3 * 2.6875  # attention (4h²) + MLP (3·h·2.6875h)
    a, b = layers * per_layer, vocab  # a h² + b h = n
    h = (-b + math.sqrt(b * b + 4 * a * n_target)) / (2 * a)
    return max(16, int(round(h / 16)) * 16), layers


def run_one(a) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.geometry.curvature import FinetuneLoss, HessianOperator
    from aligncollapse.models import BlockSelection
    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import load_suite_set, write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer
    from aligncollapse.scan.aic import ScanSettings, measure_aic

    rss0 = _rss_gb()
    suite = tempfile.mkdtemp()
    write_suite(suite, seed=0, size=max(a.finetune, 8), version=1)  # the data its committed rows used
    safety = load_suite_set(suite, "safety")[: a.safety]
    finetune = load_suite_set(suite, "affirmative_steps")[: a.finetune]
    tok = build_tokenizer(corpus.all_words(0))
    if a.preset == "llama1b-2layer":
        kw = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    elif a.preset == "llama3b":
        kw = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    else:
        h, layers = shape_for(parse_size(a.one), len(tok))
        kw = dict(vocab_size=len(tok), hidden_size=h, intermediate_size=int(h * 2.6875), num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      attn_implementation="eager",  # double backward (H·v) needs it, as load_model sets
                      pad_token_id=tok.pad_token_id, **kw)  # fmt: skip
    dtype = getattr(torch, a.dtype)
    model = LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    s = ScanSettings(n_boot=a.n_boot, max_d=a.max_d, hutchinson=8, batch_size=8, method=a.method,
                     fisher_samples=a.fisher_samples, blocks=BlockSelection(trainable_only=True))  # fmt: skip
    row = {"n_parameters": n, "config": kw, "device": a.device, "dtype": a.dtype, "N": len(safety), "M": len(finetune)}
    if a.plan_draws:  # the sample scan's planned peak (tensors only) at S = 1..4 draws, nothing run
        from dataclasses import replace

        from aligncollapse.scan.sample_space import plan_memory_sample, planning_ghost

        params = s.blocks.select(model)
        ft = EncodedSet(tok, finetune, s.template, max_length=s.max_length)
        ghost = planning_ghost(model, params, ft)
        row["planned_peak_bytes_by_draws"] = {
            S: plan_memory_sample(model, tok, params, ghost, safety, ft, replace(s, fisher_samples=S), quiet=True)["peak_bytes"]
            for S in (1, 2, 3, 4)
        }  # fmt: skip
        return row
    from aligncollapse.geometry.memory import available_memory
    from aligncollapse.scan.aic import resolve_method

    s.max_memory = available_memory(a.device)
    method = resolve_method(model, tok, safety, finetune, s)
    row["scan_method"] = method
    if method == "sample":
        s.method = "sample"  # its own plan is checked inside the scan (a UserError when it does not fit)
    try:
        if method == "sample":
            raise LookupError  # the exact plan below does not apply
        from aligncollapse.geometry.memory import available_memory, model_shape, scan_memory_plan

        plan = scan_memory_plan(model_shape(model, s.blocks.select(model)), n_safety=len(safety),
                                n_finetune=len(finetune), seq_len=64, batch_size=s.batch_size, k=s.max_d + 1,
                                optimizer=s.optimizer)  # fmt: skip
        row["planned_peak_gb"] = plan["peak_bytes"] / 2**30
        limit = available_memory(a.device)
        row["available_gb"] = limit / 2**30
        row["fits"] = plan["peak_bytes"] <= limit
    except LookupError:
        row["fits"] = True
    except Exception as e:  # the plan is informative only here; a failure to plan is reported
        row["plan_error"] = f"{type(e).__name__}: {e}"
        row["fits"] = True
    if not row["fits"]:
        row["note"] = "the exact scan's plan exceeds the available memory: not run"
        return row
    params = s.blocks.select(model)
    # The floor: N per-example forward+backward passes (safety) and one HVP over the fine-tuning set.
    ref = EncodedSet(tok, safety, "raw")
    ft = EncodedSet(tok, finetune, "raw")
    if not a.skip_floor:
        t0 = time.perf_counter()
        for i in range(len(ref)):
            FinetuneLoss(model, params, ref.subset([i]), 1).value_and_grad()
        _, g = FinetuneLoss(model, params, ft, 8).value_and_grad()
        HessianOperator(model, params, ft, 8).matvec(g)
        row["floor_seconds"] = time.perf_counter() - t0
        del g
    if a.cli:
        row |= run_cli(a, model, tok, suite)
        if "floor_seconds" in row and "error" not in row:
            row["ratio_scan_to_floor"] = row["scan_seconds"] / row["floor_seconds"]
        return row
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    from aligncollapse.errors import UserError

    try:
        m = measure_aic(model, tok, safety, finetune, s)
    except UserError as e:  # the sample plan does not fit either
        row["fits"], row["note"] = False, str(e)
        return row
    row["scan_seconds"] = time.perf_counter() - t0
    row |= _scan_fields(m)
    if "floor_seconds" in row:
        row["ratio_scan_to_floor"] = row["scan_seconds"] / row["floor_seconds"]
    row["peak_rss_gb"] = _rss_gb() - rss0
    if a.device.startswith("cuda"):
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def run_cli(a, model, tok, suite: str) -> dict:
    """The same scan through ``aligncollapse scan`` in a child process: the model and tokenizer saved by
    ``save_pretrained``, the suite's JSONL files as ``--safety`` and ``--finetune``. Peak RSS is the
    child's (``RUSAGE_CHILDREN``), so it includes loading the model and the CLI's own work."""
    import shutil
    from pathlib import Path

    import torch

    work = Path(tempfile.mkdtemp())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    with torch.no_grad():  # this process no longer needs the weights: the child's memory is its own
        for p in model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    lines = lambda name: Path(suite, f"{name}.jsonl").read_text().splitlines()  # noqa: E731
    (work / "safety.jsonl").write_text("\n".join(lines("safety")[: a.safety]) + "\n")
    (work / "finetune.jsonl").write_text("\n".join(lines("affirmative_steps")[: a.finetune]) + "\n")
    cmd = [sys.executable, "-m", "aligncollapse", "scan", "--model", str(work / "model"), "--dtype", a.dtype,
           "--device", a.device, "--safety", str(work / "safety.jsonl"), "--finetune", str(work / "finetune.jsonl"),
           "--scan-method", a.method, "--fisher-samples", str(a.fisher_samples), "--max-d", str(a.max_d),
           "--max-memory", a.max_memory, "--out", str(work / "out")]  # fmt: skip
    log = work / "scan.log"
    print(f"aligncollapse scan: its output goes to {log}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"command": "aligncollapse " + " ".join(cmd[3:]), "scan_seconds": time.perf_counter() - t0}
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if rc != 0:
        row["error"] = (log.read_text().strip().splitlines() or ["failed"])[-1]
        return row
    m = json.loads((work / "out" / "results.json").read_text())
    m = m.get("results", m)
    row |= _scan_fields(m)
    shutil.rmtree(work)  # the saved model and the scan's outputs (the row keeps what it reports)
    return row


def _scan_fields(m: dict) -> dict:
    """What a row reports from a scan's results: its memory plan and the AIC headline numbers."""
    plan = m["memory_plan"]
    return {
        "planned_peak_gb": plan["peak_bytes"] / 2**30,
        "planned_runtime_gb": plan.get("runtime_bytes", 0) / 2**30,  # interpreter, libraries
        "plan_method": plan.get("method"),
        "fisher_samples": m.get("fisher_samples"),  # label draws per prompt the scan used (sample method)
        "memory_plan_stages_gb": {k: v / 2**30 for k, v in plan["stages"].items()},
        "max_memory": plan.get("limit_bytes"),
        "lambda": m["lambda"], "gamma": m["gamma"], "d": m["d"], "per_example_hvp": m.get("per_example_hvp"),
        "tail_fraction": m["tail_fraction"], "verdict": m["verdict"],
    }  # fmt: skip


def _rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.4M,1M,4M", help="comma-separated parameter counts (random-init Llamas)")
    ap.add_argument(
        "--llama1b-2layer", action="store_true", help="(b) a Llama-3.2-1B-shaped model truncated to 2 layers"
    )
    ap.add_argument("--llama3b", action="store_true", help="(c) a Llama-3.2-3B-shaped model (for a GPU machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--safety", type=int, default=60)
    ap.add_argument("--finetune", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--max-d", type=int, default=16)
    ap.add_argument("--method", default="auto", choices=["auto", "exact", "sample"], help="the scan method")
    from aligncollapse.cli.args import int_or_auto

    ap.add_argument("--fisher-samples", type=int_or_auto, default="auto", help="sample method: label draws per prompt")
    ap.add_argument("--plan-draws", action="store_true", help="only plan the sample scan at 1-4 label draws")
    ap.add_argument("--skip-floor", action="store_true", help="do not time the floor (saves its time on big models)")
    ap.add_argument("--cli", action="store_true", help="run `aligncollapse scan` on the saved model (a child process)")
    ap.add_argument("--max-memory", default="auto", help="--cli: the scan's --max-memory")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one or a.preset:
        print(json.dumps(run_one(a)))
        return
    jobs = [("--preset", "llama1b-2layer")] if a.llama1b_2layer else [("--preset", "llama3b")] if a.llama3b else []
    jobs = jobs or [("--one", x) for x in a.sizes.split(",")]
    rows = []
    for flag, val in jobs:
        cmd = [sys.executable, __file__, flag, val, "--device", a.device, "--dtype", a.dtype, "--safety", str(a.safety),
               "--finetune", str(a.finetune), "--n-boot", str(a.n_boot), "--max-d", str(a.max_d),
               "--method", a.method, "--fisher-samples", str(a.fisher_samples)]  # fmt: skip
        cmd += ["--skip-floor"] if a.skip_floor else []
        cmd += ["--plan-draws"] if a.plan_draws else []
        cmd += ["--cli", "--max-memory", a.max_memory] if a.cli else []
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ALIGNCOLLAPSE_QUIET": "1"})
        if out.returncode != 0:
            rows.append({"size": val, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"})
        else:
            rows.append({"size": val, **json.loads(out.stdout.strip().splitlines()[-1])})
        r = rows[-1]
        if "planned_peak_bytes_by_draws" in r:
            print(f"{val}: sample plan (tensors) " + ", ".join(f"S = {S}: {b / 1e9:.2f} GB" for S, b in
                                                            r["planned_peak_bytes_by_draws"].items()), flush=True)  # fmt: skip
            continue
        print(f"{val:>14s}  n = {r.get('n_parameters', 0):>12,}  scan {r.get('scan_seconds', float('nan')):8.1f} s  "
              f"floor {r.get('floor_seconds', float('nan')):7.1f} s  ratio {r.get('ratio_scan_to_floor', float('nan')):6.1f}  "
              f"peak RSS {r.get('peak_rss_gb', float('nan')):6.2f} GB  plan {r.get('planned_peak_gb', float('nan')):8.2f} GB"
              + (f"  {r.get('note') or r.get('error')}" if (r.get("note") or r.get("error")) else ""), flush=True)  # fmt: skip
    ran = [r for r in rows if "scan_seconds" in r]
    summary = {}
    if len(ran) >= 2:
        import numpy as np

        ln = np.log([r["n_parameters"] for r in ran])
        summary["time_exponent"] = float(np.polyfit(ln, np.log([r["scan_seconds"] for r in ran]), 1)[0])
        summary["memory_exponent"] = float(np.polyfit(ln, np.log([max(r["peak_rss_gb"], 1e-3) for r in ran]), 1)[0])
        print(
            f"growth in n: scan time ∝ n^{summary['time_exponent']:.2f}, peak memory ∝ n^{summary['memory_exponent']:.2f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
