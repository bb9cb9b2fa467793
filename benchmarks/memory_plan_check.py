"""Planned vs measured peak memory of a scan, or of ``fisher``, on a ~4M-parameter random Llama (CPU).

    PYTHONPATH=src python benchmarks/memory_plan_check.py [--finetune 16] [--safety 8] [--hidden 256]
    PYTHONPATH=src python benchmarks/memory_plan_check.py --method sample [--vocab 128256 --tied --layers 1 ...]
    PYTHONPATH=src python benchmarks/memory_plan_check.py --fisher exact|factored|lanczos|kronecker|rademacher [--safety 32]
    PYTHONPATH=src python benchmarks/memory_plan_check.py --defense project-static:d=16,samples=1 [--safety 32]

Measured = peak RSS during the scan (sampled every 2 ms) minus the RSS before the model was built,
so the Python/torch runtime is left out and the weights are counted, as the plan counts them; per
stage, the peak while the scan's functions for that stage run (wrapped here, the statistics stage
being the noise trace, the bootstrap and AdamW's second moment; the Hessian stage every H·v product,
including the bootstrap's per-example ones).
RSS keeps freed heap pages, so the measured value is the high-water mark of the process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

os.environ.setdefault("ALIGNCOLLAPSE_QUIET", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--finetune", type=int, default=16)
    ap.add_argument("--safety", type=int, default=8)
    ap.add_argument("--max-d", type=int, default=4)
    ap.add_argument("--method", choices=["exact", "sample"], default="exact", help="the scan's method")
    ap.add_argument("--vocab", type=int, help="vocabulary rows (default: the organism tokenizer's)")
    ap.add_argument("--tied", action="store_true", help="tie the input embedding and the LM head")
    ap.add_argument("--intermediate", type=int, help="MLP width (default 2.6875 x hidden)")
    ap.add_argument("--fisher-samples", type=int, default=1, help="--method sample: label draws per prompt")
    ap.add_argument("--batch-size", type=int, default=8, help="the scan's compute batch")
    ap.add_argument("--fisher", choices=["exact", "factored", "lanczos", "kronecker", "rademacher"],
                    help="measure `fisher --method ...` (kronecker/rademacher: projected) instead of the scan")  # fmt: skip
    ap.add_argument("--memory-budget", type=float, default=1.0, help="--fisher exact: the grouping budget in GiB")
    ap.add_argument(
        "--defense",
        help="measure `finetune --defense SPEC` (full fine-tuning, AdamW, 4 steps; none: undefended) instead",
    )
    a = ap.parse_args()

    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.models import BlockSelection
    from aligncollapse.organism import corpus
    from aligncollapse.organism.suite import load_suite_set, write_suite
    from aligncollapse.organism.tokenizer import build_tokenizer
    from aligncollapse.scan.aic import ScanSettings, measure_aic

    proc = psutil.Process()
    suite = tempfile.mkdtemp()
    write_suite(suite, seed=0, size=max(a.finetune, a.safety), version=1)  # the data its committed rows used
    safety = load_suite_set(suite, "safety")[: a.safety]
    finetune = load_suite_set(suite, "affirmative_steps")[: a.finetune]
    tok = build_tokenizer(corpus.all_words(0))
    base_rss = proc.memory_info().rss

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=max(a.vocab or 0, len(tok)), hidden_size=a.hidden, intermediate_size=a.intermediate or int(a.hidden * 2.6875),
        num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attn_implementation="eager", tie_word_embeddings=a.tied,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    n_total = sum(p.numel() for p in model.parameters())

    peak = [proc.memory_info().rss]
    done = threading.Event()
    stage = ["other"]
    stage_peak: dict[str, int] = {}

    def sample() -> None:
        while not done.is_set():
            rss = proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            stage_peak[stage[0]] = max(stage_peak.get(stage[0], 0), rss)
            time.sleep(0.002)

    def tracked(name: str, fn, outermost: bool = False):
        """``fn`` with the sampler's peaks attributed to stage ``name`` while it runs (``outermost``:
        only when no other tracked stage is running, for functions several stages call)."""

        def wrapper(*args, **kwargs):
            before = stage[0]
            if not outermost or before == "other":
                stage[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                stage[0] = before

        return wrapper

    def measured(run, sizes: str) -> None:
        """``run()`` (results with a ``memory_plan``) under the sampler, then the per-stage report."""
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        res = run()
        done.set()
        th.join()
        _report(res["memory_plan"], stage_peak, peak[0], base_rss, n_total, sizes, t0)

    if a.defense:
        from aligncollapse.cli.finetune import memory_planner
        from aligncollapse.defenses import DefenseContext, make_defense
        from aligncollapse.training.finetune import FinetuneConfig
        from aligncollapse.training.finetune import finetune as run_finetune

        defense = None if a.defense == "none" else make_defense(a.defense, DefenseContext(tok, safety))
        if defense is not None:
            defense.setup = tracked("defense_setup", defense.setup)
        cfg = FinetuneConfig(steps=4, batch_size=min(8, len(finetune)), track_every=100)

        def train():
            with tempfile.TemporaryDirectory() as run_dir:  # its final checkpoint holds the whole model: not kept
                return tracked("train", run_finetune)(model.train(), tok, finetune, run_dir, cfg, resume=False,
                                                     save_model=False, final_eval=False, defense=defense,
                                                     memory_plan=memory_planner(cfg, defense, None, None))  # fmt: skip

        measured(train, f"N={len(safety)} safety prompts, M={len(finetune)} examples, {a.defense}")
        return

    if a.fisher:
        from aligncollapse.geometry import analysis
        from aligncollapse.geometry.analysis import FisherSettings, run_fisher

        analysis.fisher_examples = tracked("generate", analysis.fisher_examples)
        analysis.exact_fisher = tracked("exact", analysis.exact_fisher)
        analysis.factored_fisher = tracked("factored", analysis.factored_fisher)
        analysis.implicit_fisher = tracked("lanczos", analysis.implicit_fisher)
        analysis.projected_fisher = tracked("projected", analysis.projected_fisher)
        import aligncollapse.geometry.representation as rep

        rep.representation_structure = tracked("representation", rep.representation_structure)
        method = "projected" if a.fisher in ("kronecker", "rademacher") else a.fisher
        fs = FisherSettings(kinds=("sampled", "empirical"), method=method, projection=a.fisher if method == "projected" else "rademacher",
                            top_k=8, memory_budget=int(a.memory_budget * 2**30))  # fmt: skip

        def fisher():
            with tempfile.TemporaryDirectory() as run_dir:
                return run_fisher(model, tok, safety, run_dir, fs)

        measured(fisher, f"N={len(safety)} safety examples")
        return

    from aligncollapse.geometry.curvature import GGNOperator, HessianOperator
    from aligncollapse.geometry.per_sample import PerSampleGradients
    from aligncollapse.scan import aic

    if a.method == "sample":
        from aligncollapse.geometry.ghost import GhostGradients
        from aligncollapse.scan import sample_space as ss

        aic.reference_data = tracked("generate", aic.reference_data)
        ss.SampledFisher.__init__ = tracked("scores", ss.SampledFisher.__init__)
        GhostGradients.collect = tracked("finetune_factors", GhostGradients.collect, outermost=True)
        for name in ("matvec", "matvecs_many", "matvec_by_differences"):
            setattr(HessianOperator, name, tracked("hessian", getattr(HessianOperator, name), outermost=True))
        for name in ("matvec", "matvecs_many"):
            setattr(GGNOperator, name, tracked("fisher_products", getattr(GGNOperator, name), outermost=True))
        GGNOperator.products_and_forms = tracked("expansion", GGNOperator.products_and_forms)
        ss._per_example = tracked("differences", ss._per_example)
        aic.shuffled_null = tracked("null", aic.shuffled_null)
        s = ScanSettings(max_d=a.max_d, n_boot=20, hutchinson=4, method="sample", fisher_samples=a.fisher_samples,
                         batch_size=a.batch_size, blocks=BlockSelection(trainable_only=True))  # fmt: skip
        measured(lambda: measure_aic(model, tok, safety, finetune, s),
                 f"N={len(safety)} safety prompts (S={a.fisher_samples}), M={len(finetune)} examples")  # fmt: skip
        return

    aic.reference_data = tracked("generate", aic.reference_data)
    aic.top_eigenpairs = tracked("lanczos", aic.top_eigenpairs)
    PerSampleGradients.matrix = tracked("per_sample", PerSampleGradients.matrix)
    HessianOperator.matvec = tracked("hessian", HessianOperator.matvec)
    aic._noise_trace = tracked("statistics", aic._noise_trace)
    aic._bootstrap = tracked("statistics", aic._bootstrap)
    aic.adam_second_moment = tracked("statistics", aic.adam_second_moment)

    s = ScanSettings(
        max_d=a.max_d, d=2, n_boot=20, hutchinson=4, method="exact", blocks=BlockSelection(trainable_only=True)
    )
    measured(
        lambda: measure_aic(model, tok, safety, finetune, s),
        f"N={len(safety)} safety prompts, M={len(finetune)} examples",
    )


def _report(plan: dict, stage_peak: dict, peak: int, base_rss: int, n_total: int, sizes: str, t0: float) -> None:
    """Each stage's planned and measured peak (RSS above the pre-model baseline), and the overall ratio."""
    from aligncollapse.geometry.memory import format_size

    measured = peak - base_rss
    i = plan["inputs"]
    print(f"model: {n_total / 1e6:.2f}M parameters (all selected), {sizes}, T={i['T']}, V={i['vocab']}"
          + (f", k={i['k']}" if "k" in i else ""))  # fmt: skip
    for name, nbytes in plan["stages"].items():
        if name not in stage_peak:  # e.g. the sample scan's F g and F Hg, computed inside the expansion's pass
            print(f"  {name:<14} planned {format_size(nbytes):>9}  not run as a stage of its own")
            continue
        got = stage_peak[name] - base_rss
        print(
            f"  {name:<14} planned {format_size(nbytes):>9}  measured {format_size(got):>9}  ratio {nbytes / got:.2f}"
        )
    print(f"  (outside the tracked stages: measured {format_size(stage_peak.get('other', base_rss) - base_rss)})")
    print(f"planned peak  {format_size(plan['peak_bytes'])} ({plan['peak_stage']})")
    print(f"measured peak {format_size(measured)} (peak RSS {format_size(peak)} - RSS before the model "
          f"{format_size(base_rss)})")  # fmt: skip
    print(f"planned / measured = {plan['peak_bytes'] / measured:.2f}   took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
