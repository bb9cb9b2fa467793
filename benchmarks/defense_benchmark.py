"""Defenses at scale: defended fine-tuning's time and memory against the undefended run (CPU or GPU).

    PYTHONPATH=src python benchmarks/defense_benchmark.py --preset llama1b --lora 64 \
        --defenses project-static:d=16,samples=1 curvature:d=16,samples=1 [--safety 32] [--steps 3] [--json FILE]

In one process, on a random-init Llama (the presets of ``overlap_benchmark.py``, rebuilt from seed 0 for
every run), each defense and then the undefended run fine-tune ``--steps`` AdamW steps (batch 8, full
fine-tuning or ``--lora R`` on the seven projections). The first run's memory is measured in a clean
process (``clean_memory``); later runs inherit the heap the earlier ones left, so compare their
memory only across processes (give one defense per process). For each run it prints and writes:

* ``setup_seconds``: the defense's setup (the safety reference's greedy responses, then the basis),
  and ÷ the floor (one forward+backward over the safety prompts, batches of 16, measured first);
* ``seconds_per_step`` and ÷ the undefended run's (the defense's hooks included);
* ``planned_bytes``: the fine-tuning memory plan's peak plus the runtime it records, and
  ``peak_rss_bytes``, the process's peak RSS during the run (sampled every 10 ms); the plan assumes
  32 generated tokens per safety prompt (``planned_reference_tokens``) where the run generated
  ``reference_tokens``. With the organism's 407-word tokenizer on a 128,256-token model, the random
  model's responses decode to almost nothing, so the plan is an upper bound there, and
  ``planned_bytes_actual_tokens`` is the same plan computed afterwards with the reference's actual sizes;
* for a sampled basis, ``dense_plan_bytes``: what the same defense with the exact dense Lanczos basis
  (``samples=0``) plans, computed and not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import tempfile
import threading
import time

from overlap_benchmark import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--defenses", nargs="+", default=["project-static:d=16,samples=1"])
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--safety", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="append the rows here")
    ap.add_argument("--table", metavar="FILE", help="print FILE's rows as the markdown table of docs/results.md")
    a = ap.parse_args()
    if a.table:
        return print_table(a.table)

    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.cli.finetune import memory_planner
    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.defenses import DefenseContext, make_defense
    from aligncollapse.losses import nll_from_logits
    from aligncollapse.models import LoraSettings
    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import load_suite_set, write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer
    from aligncollapse.training.finetune import FinetuneConfig, finetune

    suite = tempfile.mkdtemp()
    write_suite(suite, seed=0, size=max(a.safety, 32), version=1)
    safety = load_suite_set(suite, "safety")[: a.safety]
    train = load_suite_set(suite, "affirmative_steps")[:32]
    tok = build_tokenizer(corpus.all_words(0))
    cfg_model = LlamaConfig(max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, attn_implementation="eager",
                            **{"vocab_size": len(tok), **PRESETS[a.preset]})  # fmt: skip
    cfg = FinetuneConfig(steps=a.steps, batch_size=8, track_every=10**6, checkpoint_every=0, checkpoint_minutes=0,
                         lora=LoraSettings(r=a.lora, alpha=2.0 * a.lora, dropout=0.0) if a.lora else None)  # fmt: skip
    proc = psutil.Process()

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg_model).to(a.device)

    model = build()
    n_total = sum(p.numel() for p in model.parameters())
    data = EncodedSet(tok, safety)
    t0 = time.perf_counter()
    for start in range(0, len(data), 16):
        b = {k: v.to(a.device) for k, v in data.batch(range(start, min(start + 16, len(data)))).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll_from_logits(logits, b["labels"]).sum().backward()
    floor = time.perf_counter() - t0
    del model, logits, b
    gc.collect()
    print(f"{a.preset}: {n_total / 1e9:.3f}B parameters, N = {len(safety)} safety prompts, floor {floor:.1f} s")

    rows = []
    for i, spec in enumerate([*a.defenses, "none"]):
        model = build()
        defense = None if spec == "none" else make_defense(spec, DefenseContext(tok, safety))
        peak, done = [proc.memory_info().rss], threading.Event()

        def sample(peak=peak, done=done):
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.01)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:  # its final checkpoint holds the whole model: not kept
            res = finetune(model, tok, train, run_dir, cfg, resume=False, save_model=False, final_eval=False,
                           defense=defense, memory_plan=memory_planner(cfg, defense, None, None))  # fmt: skip
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        plan = res["memory_plan"]
        info = res.get("defense", {})
        step = res["seconds"] / a.steps
        row = {
            "preset": a.preset, "n_parameters": n_total, "trainable": res["trainable_parameters"],
            "lora_r": a.lora, "N": len(safety), "steps": a.steps, "defense": spec, "floor_seconds": round(floor, 2),
            "wall_seconds": round(wall, 1), "setup_seconds": round(info.get("seconds", {}).get("setup", 0.0), 1),
            "seconds_per_step": round(step, 2), "clean_memory": i == 0,
            "planned_bytes": plan["peak_bytes"] + plan.get("runtime_bytes", 0), "peak_rss_bytes": peak[0],
            "basis_storage": info.get("basis_storage"), "basis_bytes": info.get("basis_bytes"),
            "removed_norm": info.get("removed_norm"), "device": a.device, "threads": torch.get_num_threads(),
        }  # fmt: skip
        row["setup_floor_ratio"] = round(row["setup_seconds"] / floor, 2)
        if getattr(defense, "ref", None) is not None:  # the plan assumes 32 generated tokens per prompt
            items = defense.ref.data.items
            actual = {"N": len(items), "T": max(len(it.input_ids) for it in items),
                      "tokens": sum(len(it.input_ids) for it in items),
                      "loss_tokens": sum(sum(1 for t in it.labels if t != -100) for it in items)}  # fmt: skip
            row["reference_tokens"] = actual["tokens"]
            row["planned_reference_tokens"] = defense.safety_sizes()["tokens"]
            defense.safety_sizes = lambda actual=actual: actual  # the same plan with the sizes the run had
            replan = memory_planner(cfg, defense, None, None)(res["model"], EncodedSet(tok, train))
            row["planned_bytes_actual_tokens"] = replan["peak_bytes"] + plan.get("runtime_bytes", 0)
            row["planned_actual_over_measured"] = round(row["planned_bytes_actual_tokens"] / row["peak_rss_bytes"], 2)
        row["planned_over_measured"] = round(row["planned_bytes"] / row["peak_rss_bytes"], 2)
        if defense is not None and getattr(defense, "samples", 0):
            dense_spec = re.sub(r",?samples=\d+|,?storage=\w+", "", spec).replace(":,", ":")
            dense = make_defense(dense_spec, DefenseContext(tok, safety))
            enc = EncodedSet(tok, train)
            row["dense_plan_bytes"] = memory_planner(cfg, dense, None, None)(res["model"], enc)["peak_bytes"]
        rows.append(row)
        print(json.dumps(row))
        del model, res, defense
        gc.collect()
    for row in rows:  # ÷ the undefended run of this process
        row["step_ratio"] = round(row["seconds_per_step"] / rows[-1]["seconds_per_step"], 2)
        print(row["defense"], "step ratio", row["step_ratio"])
    if a.json:
        try:
            with open(a.json) as f:
                old = json.load(f)
        except FileNotFoundError:
            old = []
        with open(a.json, "w") as f:
            json.dump(old + rows, f, indent=1)


def print_table(path: str) -> None:
    """One markdown row per defended run (the undefended runs give the step ratio's denominator)."""
    with open(path) as f:
        rows = json.load(f)
    for r in rows:
        if r["defense"] == "none":
            continue
        size = f"{r['n_parameters'] / 1e9:.2f}B" if r["n_parameters"] >= 1e9 else f"{r['n_parameters'] / 1e6:.0f}M"
        ft = f"LoRA r = {r['lora_r']} ({r['trainable'] / 1e6:.0f}M)" if r["lora_r"] else "full"
        actual = r.get("planned_bytes_actual_tokens")
        plan = f"{r['planned_bytes'] / 1e9:.1f} GB" + (f" ({actual / 1e9:.1f} GB)" if actual else "")
        dense = f"{r['dense_plan_bytes'] / 1e9:.0f} GB" if r.get("dense_plan_bytes") else "-"
        print(
            f"| {size} | {ft} | `{r['defense']}` | {r['setup_seconds']:.0f} s ({r['setup_floor_ratio']:.1f}×) | "
            f"{r['step_ratio']:.2f}× | {r['peak_rss_bytes'] / 1e9:.1f} GB | {plan} | {dense} |"
        )


if __name__ == "__main__":
    main()
