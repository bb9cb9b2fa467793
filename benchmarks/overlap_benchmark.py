"""The overlap score's Fisher at scale: time ÷ floor and memory on a random Llama (CPU or GPU).

    PYTHONPATH=src python benchmarks/overlap_benchmark.py [--preset llama1b|llama1b-2layer|small] [--safety 60] [--json FILE]

In one process, on one model, all linear modules selected:

* floor: one forward+backward over the N safety examples (batches of 16), the least any Fisher costs;
* ``BlockFisher.compute``: the exact block-wise Fisher behind ``rank``'s OS, held as factored
  per-example gradients (4·R·Σ_m(d_in + d_out) bytes), and one OS of a random ΔW over every module;
* ``projected_fisher(..., method="kronecker")``: the paper's projected Fisher (k = 4096) over every
  module with the Kronecker projector.

Prints the seconds, each ÷ the floor, the factors' bytes against the N × (linear weights) rows the
previous BlockFisher held, and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

PRESETS = {
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama1b-2layer": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--safety", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the row here")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.geometry.projection import linear_weights, projected_fisher
    from aligncollapse.losses import nll_from_logits
    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import load_suite_set, write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer
    from aligncollapse.predict.overlap import BlockFisher

    suite = tempfile.mkdtemp()
    write_suite(suite, seed=0, size=max(a.safety, 8), version=1)
    safety = load_suite_set(suite, "safety")[: a.safety]
    tok = build_tokenizer(corpus.all_words(0))
    kw = {"vocab_size": len(tok), **PRESETS[a.preset]}
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, attn_implementation="eager", **kw)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(a.device).eval()
    weights = linear_weights(model)
    n_linear = sum(w.numel() for w in weights.values())
    data = EncodedSet(tok, safety)
    tokens = sum(len(it.input_ids) for it in data.items)

    def timed(fn):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def floor():
        for start in range(0, len(data), 16):
            b = {k: v.to(a.device) for k, v in data.batch(range(start, min(start + 16, len(data)))).items()}
            nll_from_logits(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                            b["labels"]).sum().backward()  # fmt: skip
            model.zero_grad(set_to_none=True)

    _, t_floor = timed(floor)
    bf, t_bf = timed(lambda: BlockFisher.compute(model, tok, safety))
    g = torch.Generator().manual_seed(1)
    delta = {n: 1e-3 * torch.randn(w.shape, generator=g).to(w) for n, w in weights.items()}
    os_, t_os = timed(lambda: bf.overlap_score(delta))
    factor_bytes = bf.nbytes()
    bf = None  # free the factors before the projected pass
    pf, t_kron = timed(lambda: projected_fisher(model, tok, safety, k=4096, method="kronecker"))
    _, t_kos = timed(lambda: pf.overlap_score(delta))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {
        "preset": a.preset, "config": kw, "n_parameters": sum(p.numel() for p in model.parameters()),
        "linear_weights": n_linear, "linear_modules": len(weights), "N": len(data), "tokens": tokens,
        "device": a.device, "floor_seconds": t_floor, "block_fisher_seconds": t_bf, "os_seconds": t_os,
        "os_total": sum(os_.values()), "kronecker_fisher_seconds": t_kron, "kronecker_os_seconds": t_kos,
        "factor_bytes": factor_bytes, "rows_bytes_before": 4 * len(data) * n_linear, "peak_rss_bytes": peak,
    }  # fmt: skip
    print(f"{a.preset}: {row['n_parameters'] / 1e6:.1f}M parameters, {len(weights)} linear modules "
          f"({n_linear / 1e6:.1f}M weights), N = {len(data)}, R = {tokens} tokens, {a.device}")  # fmt: skip
    print(f"  floor (N fwd+bwd)          {t_floor:8.1f} s")
    print(f"  BlockFisher.compute        {t_bf:8.1f} s  = {t_bf / t_floor:.2f}× floor")
    print(f"  one OS (every module)      {t_os:8.1f} s  = {t_os / t_floor:.2f}× floor")
    print(f"  Kronecker Fisher, k = 4096 {t_kron:8.1f} s  = {t_kron / t_floor:.2f}× floor")
    print(f"  one projected OS           {t_kos:8.1f} s  = {t_kos / t_floor:.2f}× floor")
    print(f"  factors {factor_bytes / 1e9:.2f} GB vs the N × n rows held before {row['rows_bytes_before'] / 1e9:.2f} GB; "
          f"peak RSS {peak / 1e9:.2f} GB")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [row]}, f, indent=1)


if __name__ == "__main__":
    main()
