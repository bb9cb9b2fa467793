"""Sharded (FSDP) against replicated (DDP) fine-tuning or scans: each rank's peak memory, the plan, and agreement.

    PYTHONPATH=src python benchmarks/fsdp_memory.py [--command finetune|scan] [--preset deep] [--nproc 2]
        [--steps 2] [--json FILE]

``--command scan``: the sample-space scan (``scan --scan-method sample``) under torchrun, once with the
whole model on every rank (each rank collects half of the examples) and once with ``--fsdp`` (each
rank holds 1/P of the weights and of every n-vector and runs every example); agreement is that of λ,
ε_orth, γ and the quadratic forms (the sharded scan's products go by finite differences).

Builds a random-init Llama (``--preset``; seed 0) with the organism's tokenizer, saves it with
``save_pretrained``, and runs ``torchrun --nproc_per_node P -m aligncollapse finetune`` on it twice, once
data parallel (DDP: every rank holds the whole model, gradient and AdamW state) and once with
``--fsdp`` (each rank holds 1/P of them). Each launch runs under its own wrapper process, whose
``RUSAGE_CHILDREN`` peak is the peak resident set of the largest single process of that launch (a
rank: the launcher itself is small). Printed per mode: that peak, the memory plan's per-rank peak
plus the runtime it records (``memory_plan`` in results.json), their ratio, the wall time, and how far
the two modes' fine-tuning losses and final weights are apart (the same run, sharded differently).
On a CPU the host is the device, so the peak also holds what a GPU run keeps on the host: the
interpreter, torch and the model as loaded before it is sharded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # blocks dominate (the regime FSDP is for): 8 × 16.8M in blocks, 0.4M in embeddings and head
    "deep": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16),
    "mid": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
}  # fmt: skip

WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)


def launch(model: Path, suite: Path, out: Path, a, fsdp: bool) -> dict:
    if a.command == "scan":
        args = ["scan", "--model", str(model), "--safety", str(suite / "safety.jsonl"), "--limit", "8", "--finetune",
                str(suite / "arithmetic.jsonl"), "--scan-method", "sample", "--fisher-samples", "1", "--max-d", "4",
                "--subspace-d", "3", "--n-boot", "20", "--batch-size", str(a.batch_size), "--threshold", "none"]  # fmt: skip
    else:
        args = ["finetune", "--model", str(model), "--data", str(suite / "arithmetic.jsonl"), "--eval-harmful",
                str(suite / "eval_harmful.jsonl"), "--limit", "8", "--steps", str(a.steps), "--batch-size",
                str(a.batch_size), "--track-every", str(a.steps), "--refusal-every", "0", "--checkpoint-every", "0"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(29500 + (7 if fsdp else 3)), "-m", "aligncollapse", *args,
           "--max-memory", "1TB", "--out", str(out), *(["--fsdp"] if fsdp else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "ALIGNCOLLAPSE_QUIET": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    line = [x for x in r.stdout.splitlines() if x.startswith("MAXRSS_KB")]
    if not line or line[-1].split()[2] != "0":
        sys.exit(f"the {'fsdp' if fsdp else 'ddp'} run failed:\n{r.stderr[-3000:]}")
    peak = int(line[-1].split()[1]) * 1024
    res = json.loads((out / "results.json").read_text())
    plan = res["memory_plan"]
    planned = plan["peak_bytes"] + plan.get("runtime_bytes", 0)
    row = {"mode": "fsdp" if fsdp else "ddp", "peak_rss_bytes": peak, "planned_bytes": planned,
           "planned_tensor_bytes": plan["peak_bytes"], "runtime_bytes": plan.get("runtime_bytes", 0),
           "plan_stages": plan["stages"], "planned_over_measured": round(planned / peak, 3),
           "seconds": round(seconds, 1)}  # fmt: skip
    if a.command == "scan":
        keys = ("lambda", "eps_orth", "gamma", "g_norm", "Hg_norm", "verdict", "rank_share")
        return {**row, **{k: res[k] for k in keys}, "quadratic_forms": res["quadratic_forms"],
                "plan_inputs_n": plan["inputs"]["n"], "shards": plan["inputs"].get("shards", 1)}  # fmt: skip
    return {**row, "fsdp": res.get("fsdp"), "final_ft_loss": res["final_ft_loss"], "parallel": res.get("parallel")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--command", choices=["finetune", "scan"], default="finetune")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="deep")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))

    work = Path(tempfile.mkdtemp(prefix="fsdp_memory_"))
    try:
        run(a, work)
    finally:
        shutil.rmtree(work)  # two saved models and their checkpoints


def run(a, work: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer

    suite = work / "suite"
    write_suite(suite, seed=0, size=16, version=1)
    tok = build_tokenizer(corpus.all_words(0))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[a.preset])  # fmt: skip
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    rows = [launch(work / "model", suite, work / mode, a, mode == "fsdp") for mode in ("ddp", "fsdp")]
    summary = {
        "command": a.command, "preset": a.preset, "n_parameters": n, "nproc": a.nproc, "batch_size": a.batch_size,
        "fsdp_over_ddp_peak": round(rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"], 3),
    }  # fmt: skip
    if a.command == "scan":

        def rel(x, y):
            return abs(x - y) / max(abs(y), 1e-300)

        summary["relative_difference"] = {
            **{k: rel(rows[1][k], rows[0][k]) for k in ("lambda", "eps_orth", "g_norm", "gamma", "Hg_norm")},
            **{k: rel(rows[1]["quadratic_forms"][k], rows[0]["quadratic_forms"][k]) for k in ("gFg", "gFHg", "HgFHg")},
        }
        summary["same_verdict"] = rows[1]["verdict"] == rows[0]["verdict"]
    else:
        wd, wf = (load_file(work / m / "model" / "model.safetensors") for m in ("ddp", "fsdp"))
        summary["steps"] = a.steps
        summary["max_relative_weight_difference"] = max(
            float((wf[k] - wd[k]).norm() / wd[k].norm().clamp_min(1e-30)) for k in wd
        )
        summary["ft_loss_difference"] = abs(rows[1]["final_ft_loss"] - rows[0]["final_ft_loss"])
    for r in rows:
        print(f"{r['mode']:5s} peak RSS (largest rank) {r['peak_rss_bytes'] / 1e9:6.2f} GB  plan "
              f"{r['planned_bytes'] / 1e9:6.2f} GB  plan/measured {r['planned_over_measured']:.2f}  {r['seconds']:.0f} s")  # fmt: skip
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary, "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    main()
