"""What handing freed heap back between passes costs: the scan with and without ``malloc_trim``.

The curvature passes and factor collections call
:func:`aligncollapse.geometry.memory.release_freed_host_memory` (glibc ``malloc_trim(0)``) when they
start and end, so that one stage's freed heap does not stay resident beside the next stage's
vectors. Each trim walks the heap, and the next pass faults its working set back in. This runs the
same scan alternately with the trims and with them replaced by a no-op, in one process, and prints
the median time ratio (and each run's peak-RSS growth, which the trims exist to cut).

    PYTHONPATH=src python benchmarks/trim_overhead.py [--method exact|sample] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary rows (default: the organism tokenizer's)")
    ap.add_argument("--safety", type=int, default=24)
    ap.add_argument("--finetune", type=int, default=48)
    ap.add_argument("--method", choices=["exact", "sample"], default="exact")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.geometry import curvature, ghost
    from aligncollapse.geometry.memory import _malloc_fns, release_freed_host_memory
    from aligncollapse.models import BlockSelection
    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import load_suite_set, write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer
    from aligncollapse.scan import sample_space
    from aligncollapse.scan.aic import ScanSettings, measure_aic

    if _malloc_fns() is None:
        print("no malloc_trim here (not glibc): the trims are no-ops, nothing to compare")
        return
    suite = tempfile.mkdtemp()
    write_suite(suite, seed=0, size=max(a.safety, a.finetune), version=1)
    safety = load_suite_set(suite, "safety")[: a.safety]
    finetune = load_suite_set(suite, "affirmative_steps")[: a.finetune]
    tok = build_tokenizer(corpus.all_words(0))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=max(a.vocab, len(tok)), hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875),
        num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    s = ScanSettings(max_d=8, n_boot=20, hutchinson=4, method=a.method, blocks=BlockSelection(trainable_only=True))
    modules = (curvature, ghost, sample_space)

    def run(trim: bool) -> tuple[float, dict]:
        for m in modules:
            m.release_freed_host_memory = release_freed_host_memory if trim else (lambda: None)
        t0 = time.perf_counter()
        res = measure_aic(model, tok, safety, finetune, s)
        return time.perf_counter() - t0, res

    run(True)  # warm-up (allocator, caches, lazy imports)
    times: dict[bool, list[float]] = {True: [], False: []}
    numbers = {}
    for i in range(a.repeats):
        for trim in (False, True) if i % 2 == 0 else (True, False):  # alternate which goes first
            dt, res = run(trim)
            times[trim].append(dt)
            numbers[trim] = (res["lambda"], res["gamma"])
    for m in modules:
        m.release_freed_host_memory = release_freed_host_memory
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"model {n / 1e6:.2f}M, {a.method} scan, N={len(safety)}, M={len(finetune)}, {a.repeats} runs each")
    print(f"  without trims: median {off:.2f} s  {[round(t, 2) for t in times[False]]}")
    print(f"  with trims:    median {on:.2f} s  {[round(t, 2) for t in times[True]]}")
    print(f"  with / without = {on / off:.3f}")
    print(f"  same numbers: {numbers[True] == numbers[False]} (lambda, gamma = {numbers[True]})")


if __name__ == "__main__":
    main()
