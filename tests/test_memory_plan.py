"""The memory plan: its formulas, --max-memory parsing, and the scan stopping before any heavy work."""

from __future__ import annotations

import time

import pytest

from aligncollapse.cli.main import main
from aligncollapse.geometry.memory import ModelShape, fisher_memory_plan, format_size, parse_size, scan_memory_plan

SHAPE = ModelShape(n=10**6, n_total=10**7, hidden=256, intermediate=1024, layers=4, heads=4, vocab=32000, dtype_bytes=4)


def _plan(**over):
    kw = {"n_safety": 32, "n_finetune": 64, "seq_len": 128, "batch_size": 16, "k": 17}
    kw.update(over)
    return scan_memory_plan(SHAPE, **kw)


def test_plan_terms_follow_the_formulas():
    base = _plan()
    assert base["peak_bytes"] == max(base["stages"].values()) == base["stages"][base["peak_stage"]]
    # per_sample holds G twice (model dtype + float64): 12 bytes per entry of M×n
    assert _plan(n_finetune=128)["stages"]["per_sample"] - base["stages"]["per_sample"] == 64 * 10**6 * 12
    # AdamW adds the residuals r and r² to the statistics stage: 2·M·n·8
    assert _plan(optimizer="adamw")["stages"]["statistics"] - base["stages"]["statistics"] == 2 * 64 * 10**6 * 8
    # ARPACK: one more eigenpair adds 3 vectors (2 basis + 1 Ritz) to Lanczos; ncv stays ≥ 20
    assert _plan(k=18)["stages"]["lanczos"] - base["stages"]["lanczos"] == 3 * 10**6 * 8
    # bfloat16 weights halve the weight term
    half = scan_memory_plan(
        ModelShape(**{**SHAPE.__dict__, "dtype_bytes": 2}), n_safety=32, n_finetune=64, seq_len=128, batch_size=16, k=17
    )
    assert half["stages"]["generate"] < base["stages"]["generate"]


@pytest.mark.parametrize(
    "text,want", [("16GB", 16 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", 3 * 2**29), ("123", 123), ("2e9", 2 * 10**9)]
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "x", "-1", "0", "1PB", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(1.5e9) == "1.5 GB" and format_size(999) == "999 B"


def test_scan_over_max_memory_stops_before_heavy_work(tmp_path, tiny_model_dir, small_suite, capsys):
    out = tmp_path / "scan"
    t0 = time.perf_counter()
    code = main(["scan", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--finetune", str(small_suite / "affirmative_steps.jsonl"), "--max-d", "4", "--n-boot", "20",
                 "--max-memory", "1MB", "--out", str(out)])  # fmt: skip
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --max-memory 1MB = 1 MB: the planned peak is ") and "largest stage: " in err
    assert not (out / "results.json").exists()
    assert seconds < 10  # stopped before generation and Lanczos (a full tiny scan takes far longer)


def test_scan_rejects_a_bad_max_memory(capsys, tiny_model_dir):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--model", str(tiny_model_dir), "--finetune", "x", "--max-memory", "lots"])
    assert e.value.code == 2 and "--max-memory" in capsys.readouterr().err


def test_runtime_is_counted_against_the_limit():
    """On the CPU the plan records the process's own memory outside the model (interpreter,
    libraries); the limit check adds it to the planned peak."""
    import resource

    import torch

    from aligncollapse.errors import UserError
    from aligncollapse.geometry.memory import check_fits, planned_total, runtime_bytes

    model = torch.nn.Linear(1000, 1000)
    rt = runtime_bytes(model)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 50 * 2**20 < rt < peak_rss  # torch alone takes more than 50 MB; the weights are not in it
    assert runtime_bytes(torch.nn.Linear(1000, 1000, device="meta")) == 0  # not on the CPU
    plan = {"peak_bytes": 100, "runtime_bytes": 50, "peak_stage": "s", "stages": {"s": 100}}
    assert planned_total(plan) == 150
    check_fits(plan, 150)
    with pytest.raises(UserError, match="50 B of runtime"):
        check_fits(plan, 149)


def _fisher(**over):
    kw = {"method": "exact", "n_examples": 32, "seq_len": 64, "top_k": 8, "group_bytes": 32 * 10**6 * 4, "groups": 1,
          "n_blocks": 10, "linear_shapes": [(256, 256)] * 4 + [(1024, 256), (256, 1024)]}  # fmt: skip
    kw.update(over)
    return fisher_memory_plan(SHAPE, **kw)


def test_fisher_plan_terms_follow_the_formulas():
    base = _fisher()
    assert set(base["stages"]) == {"exact"} and base["peak_bytes"] == base["stages"]["exact"]
    # k Ritz/lifted vectors: one more eigenpair adds n·8 to the exact stage
    assert _fisher(top_k=9)["stages"]["exact"] - base["stages"]["exact"] == 10**6 * 8
    # a second parameter group adds the second (lifting) pass, holding G_max again beside the basis
    assert set(_fisher(groups=2)["stages"]) == {"exact", "lift"}
    # the sampled Fisher generates its responses first; the representation analysis keeps float64 factors
    assert "generate" in _fisher(sampled=True)["stages"]
    r1, r2 = (_fisher(representation_tokens=t)["stages"]["representation"] for t in (1000, 2000))
    assert r2 - r1 >= 8 * 1000 * (4 * 512 + 2 * 1280)
    # on an accelerator the representation factors are host memory, kept out of the device's stage
    dev = _fisher(representation_tokens=1000, representation_on_host=True)
    assert dev["stages"]["representation"] < r1 and dev["host_bytes"]["representation"] >= 8 * 1000 * 6 * 1280
    # projected: the rows P·N·K·b grow with K; the Kronecker path never holds a K × d block
    k1, k2 = (
        _fisher(method="projected", projection="kronecker", projection_dim=k)["stages"]["projected"]
        for k in (1024, 2048)
    )
    assert k2 - k1 >= 6 * 32 * 1024 * 4
    ra = _fisher(method="projected", projection="rademacher")["stages"]["projected"]
    assert ra < 4096 * 1024 * 256 * 4  # a 64 MB block of the projector at a time, never the 4096 × d matrix
    with pytest.raises(Exception, match="--method"):
        _fisher(method="svd")


def test_fisher_over_max_memory_stops_before_heavy_work(tmp_path, tiny_model_dir, small_suite, capsys):
    out = tmp_path / "fisher"
    code = main(["fisher", "--model", str(tiny_model_dir), "--safety", str(small_suite / "safety.jsonl"), "--limit", "8",
                 "--max-memory", "1MB", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --max-memory 1MB = 1 MB: the planned peak is ") and "largest stage: " in err
    assert not (out / "results.json").exists()


def test_finetune_plan_shards_and_buckets():
    """FSDP over w ranks divides the weights, gradients, AdamW state and θ* by w and adds the
    unsharded units; a checkpoint adds rank 0's gathered copy (host memory on a GPU); DDP adds its
    gradient buckets, n·b. The input on which this fails: a plan that ignores ``shards``."""
    import dataclasses

    from aligncollapse.geometry.memory import finetune_memory_plan

    kw = dict(batch_size=8, seq_len=64, optimizer="adamw", eval_tokens=330)
    one = finetune_memory_plan(SHAPE, **kw)
    ddp = finetune_memory_plan(SHAPE, ddp=True, **kw)
    assert ddp["stages"]["train"] - one["stages"]["train"] == SHAPE.n * 4
    units = dict(block_numel=2 * 10**6, root_numel=10**6)
    W, n, cache = SHAPE.n_total * 4, SHAPE.n * 4, 330 * SHAPE.vocab * 4

    def resident(w: int, shape=SHAPE, state: int = 2) -> int:
        return (shape.n_total * 4 + (2 + state) * shape.n * 4) // w + cache

    f2 = finetune_memory_plan(SHAPE, shards=2, **units, **kw)
    f4 = finetune_memory_plan(SHAPE, shards=4, **units, **kw)
    # LoRA-like (n < n_total): a checkpoint gathers 3·n·b (adapter + AdamW), the final save n·b
    assert f2["stages"]["checkpoint"] - resident(2) == 3 * n
    assert f2["stages"]["train"] - f4["stages"]["train"] > 0.9 * (resident(2) - resident(4))
    assert f2["stages"]["train"] < one["stages"]["train"] and f2["inputs"]["shards"] == 2
    # full fine-tuning with plain SGD: the final save's W outweighs a checkpoint's n·b
    full = dataclasses.replace(SHAPE, n=SHAPE.n_total)
    sgd = finetune_memory_plan(full, shards=2, **units, **{**kw, "optimizer": "sgd"})
    assert sgd["stages"]["checkpoint"] - resident(2, full, 0) == full.n_total * 4
    # on a GPU the gathered copy and the KL reference's cached log-probabilities are host memory
    gpu = finetune_memory_plan(SHAPE, shards=2, accelerator=True, **units, **kw)
    assert gpu["stages"]["checkpoint"] == resident(2) - cache and gpu["host_bytes"] == 3 * n + cache
    assert W > 3 * n  # (the shape the LoRA-like case needs)


def _llama(tied: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_model_shape_counts_a_selected_tied_embedding():
    from aligncollapse.geometry.memory import model_shape

    tied, untied = _llama(True), _llama(False)
    assert model_shape(tied, dict(tied.named_parameters())).tied == 96 * 16
    assert model_shape(untied, dict(untied.named_parameters())).tied == 0
    no_embedding = {k: p for k, p in tied.named_parameters() if "embed" not in k}
    assert model_shape(tied, no_embedding).tied == 0  # not differentiated: no transient
    # ... except by passes that call backward() on the whole model, while the weight requires grad
    assert model_shape(tied, no_embedding).tied_trainable == 96 * 16
    assert model_shape(untied, dict(untied.named_parameters())).tied_trainable == 0
    tied.get_input_embeddings().weight.requires_grad_(False)  # a frozen base (LoRA): never differentiated
    assert model_shape(tied, no_embedding).tied_trainable == 0


def test_tied_gradient_transient_is_in_the_gradient_stages_only():
    from aligncollapse.geometry.memory import sample_scan_memory_plan

    tied = ModelShape(**{**SHAPE.__dict__, "tied": 32000 * 256})
    extra = 2 * 32000 * 256 * 4
    a, b = (
        scan_memory_plan(tied, **{"n_safety": 32, "n_finetune": 64, "seq_len": 128, "batch_size": 16, "k": 17}),
        _plan(),
    )
    assert {k: a["stages"][k] - b["stages"][k] for k in a["stages"]} == {
        "generate": 0, "lanczos": extra, "per_sample": 16 * extra, "hessian": extra, "statistics": extra}  # fmt: skip
    kw = dict(n_safety=8, n_finetune=16, seq_len=64, batch_size=2, samples=2, tokens_safety=400, tokens_finetune=800,
              floats_per_token=5000, explicit_numel=1000)  # fmt: skip
    a, b = sample_scan_memory_plan(tied, **kw), sample_scan_memory_plan(SHAPE, **kw)
    moved = {k for k in a["stages"] if a["stages"][k] != b["stages"][k]}
    assert moved == {"hessian", "fisher_products", "expansion", "null"}
    assert all(a["stages"][k] - b["stages"][k] == extra for k in moved)


def test_sample_plan_null_and_concatenation_terms():
    """The shuffled null runs before the fine-tuning side (4 n-vectors, whatever the optimiser), and
    the factor stages hold their largest factor tensor twice while concatenating its pieces."""
    from aligncollapse.geometry.memory import activation_bytes, factor_bytes, sample_scan_memory_plan

    kw = dict(n_safety=8, n_finetune=16, seq_len=64, batch_size=2, samples=2, tokens_safety=400, tokens_finetune=800,
              floats_per_token=5000, explicit_numel=1000, head_floats_per_token=1000, loss_tokens_safety=100,
              loss_tokens_finetune=300)  # fmt: skip
    sgd, adam = (sample_scan_memory_plan(SHAPE, optimizer=o, **kw)["stages"] for o in ("sgd", "adamw"))
    n = SHAPE.n
    assert sgd["null"] == adam["null"]
    fac_s = factor_bytes(5000, 1000, 1000, 400, 100, 8, 2)
    assert sgd["null"] == SHAPE.n_total * 4 + fac_s + 4 * n * 4 + activation_bytes(SHAPE, 2, 64)
    wide = sample_scan_memory_plan(SHAPE, largest_floats_per_token=10**6, **kw)["stages"]
    # the scores stage: max(the draws' probabilities, 4·max(f_h·R'_S, f_max·R_S)·S)
    assert wide["scores"] - sgd["scores"] == 4 * 10**6 * 400 * 2 - max(2 * 2 * 64 * SHAPE.vocab * 8, 4 * 1000 * 100 * 2)
    # the fine-tuning factors: max(4·max(f_h·R'_M, f_max·R_M), g + the Gram workspace and tables)
    assert wide["finetune_factors"] - sgd["finetune_factors"] == 4 * 10**6 * 800 - (
        n * 4 + 36 * 2**25 + 1 * 32 * 16 * 8
    )
    head = sample_scan_memory_plan(SHAPE, **{**kw, "head_floats_per_token": 4 * 10**6})["stages"]
    fac_m = factor_bytes(5000, 4 * 10**6, 1000, 800, 300, 16)
    assert head["finetune_factors"] == (SHAPE.n_total * 4 + factor_bytes(5000, 4 * 10**6, 1000, 400, 100, 8, 2) + fac_m
                                        + activation_bytes(SHAPE, 2, 64) + 4 * 4 * 10**6 * 300)  # fmt: skip
    half = ModelShape(**{**SHAPE.__dict__, "dtype_bytes": 2})
    hs = sample_scan_memory_plan(half, **kw)["stages"]
    assert hs["null"] - hs["hessian"] == n * 4  # the exact H g' (no differences in half): g' beside its 5


def test_whole_model_backward_passes_plan_the_tied_transient_unselected():
    """The Kronecker projection and the representation capture call backward() on the whole model:
    a tied embedding that requires grad is differentiated there even when it is not selected."""
    from aligncollapse.geometry.memory import fisher_memory_plan

    extra = 2 * 32000 * 256 * 4
    kw = {"n_examples": 32, "seq_len": 64, "top_k": 8, "group_bytes": 32 * 10**6 * 4, "groups": 1, "n_blocks": 10,
          "linear_shapes": [(256, 256)] * 4, "representation_tokens": 500}  # fmt: skip
    for method, projection, moved in (("projected", "kronecker", {"projected", "representation"}),
                                      ("projected", "rademacher", {"representation"}),
                                      ("exact", "rademacher", {"representation"})):  # fmt: skip
        shapes = (ModelShape(**{**SHAPE.__dict__, "tied_trainable": 32000 * 256}), SHAPE)
        a, b = (fisher_memory_plan(sh, method=method, projection=projection, **kw) for sh in shapes)
        diff = {k: a["stages"][k] - b["stages"][k] for k in a["stages"]}
        assert {k for k, v in diff.items() if v} == moved and all(diff[k] == extra for k in moved), (method, diff)


def test_gradient_passes_free_each_batch_before_the_next(monkeypatch, micro_model_dir):
    """A batch's gradients (an n-vector) must be gone before the next batch's backward: kept, they
    were one n-vector above the plan at every gradient stage (measured on a 384M model)."""
    import gc
    import weakref

    import torch

    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.data.examples import Example
    from aligncollapse.geometry import curvature
    from aligncollapse.models import load_model

    model, tok = load_model(str(micro_model_dir), device="cpu", dtype="float32")
    params = dict(model.named_parameters())
    data = EncodedSet(
        tok,
        [
            Example(prompt=p, response="sure here is step one")
            for p in ("how do i rob a store", "bake bread", "how do i bake", "rob a store")
        ],
        "raw",
    )
    alive: list[list[weakref.ref]] = []
    real = torch.autograd.grad

    def grad(*a, **k):
        gc.collect()
        if alive:
            assert all(r() is None for r in alive[-1]), "the previous batch's gradients are still alive"
        out = real(*a, **k)
        if not k.get("create_graph"):
            alive.append([weakref.ref(t) for t in out if t is not None])
        return out

    monkeypatch.setattr(curvature.torch.autograd, "grad", grad)
    op = curvature.FinetuneLoss(model, params, data, batch_size=1)
    _, g = op.value_and_grad()
    assert len(alive) == 4
    curvature.HessianOperator(model, params, data, batch_size=1).matvec_by_differences(g)


def _glibc() -> bool:
    from aligncollapse.geometry.memory import _malloc_fns

    return _malloc_fns() is not None


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_freed_heap_pieces_leave_the_rss():
    """Tensors below glibc's (raised) mmap threshold come from the heap; freed below a live chunk they
    stay resident until ``release_freed_host_memory``. The collected factors' per-batch pieces were
    1.3 GB of such memory on a 384M model (M = 128, V = 128,256), above the plan for the whole scan."""
    import torch

    from aligncollapse.geometry.memory import _rss, release_freed_host_memory

    mib = 2**20
    x = torch.ones(30 * mib // 4)
    del x  # freeing a 30 MiB mmapped chunk raises glibc's mmap threshold to it
    release_freed_host_memory(min_free=0)  # no resident free heap left for the pieces to reuse
    base = _rss()
    pieces = [torch.ones(mib) for _ in range(64)]  # 256 MiB in 4 MiB pieces, from the heap
    pin = torch.ones(mib)  # a live chunk above them: the heap cannot shrink from the top
    del pieces
    kept = _rss() - base
    if kept < 200 * mib:
        pytest.skip(f"this allocator returned the freed pieces by itself ({kept / mib:.0f} MiB kept)")
    release_freed_host_memory(min_free=2**40)  # less free heap than asked for: skipped, nothing handed back
    assert _rss() - base > kept - 50 * mib
    release_freed_host_memory(min_free=0)
    assert _rss() - base < kept - 200 * mib
    del pin


def test_collecting_several_batches_releases_their_pieces(monkeypatch, micro_model_dir):
    """GhostGradients.collect concatenates its batches' factors and frees the pieces: it must hand
    them back after a multi-batch collect; a whole set's collect (``count`` given) also starts from a
    trimmed heap; a one-batch collect without ``count`` (the per-example loops) does neither."""
    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.data.examples import Example
    from aligncollapse.geometry import ghost as ghost_mod
    from aligncollapse.models import load_model
    from aligncollapse.scan.sample_space import _nll_batches

    model, tok = load_model(str(micro_model_dir), device="cpu", dtype="float32")
    params = dict(model.named_parameters())
    data = EncodedSet(tok, [Example(prompt=p, response="sure here is step one") for p in ("rob a store", "bake bread")],
                      "raw")  # fmt: skip
    calls = []
    monkeypatch.setattr(ghost_mod, "release_freed_host_memory", lambda: calls.append(1))
    gg = ghost_mod.GhostGradients(model, params)
    gg.collect(_nll_batches(data, 1, "cpu"), count=2)
    assert len(calls) == 2
    gg.collect(_nll_batches(data, 2, "cpu"), count=2)
    assert len(calls) == 3
    gg.collect(_nll_batches(data, 2, "cpu"))
    assert len(calls) == 3


def test_every_curvature_pass_ends_with_the_heap_handed_back(monkeypatch, micro_model_dir):
    """A pass's freed heap must not sit beside the next stage's vectors: each pass over the data
    (a gradient, a Hessian or GGN product) trims when it starts and when it ends."""
    from aligncollapse.data.encoding import EncodedSet
    from aligncollapse.data.examples import Example
    from aligncollapse.geometry import curvature
    from aligncollapse.models import load_model

    model, tok = load_model(str(micro_model_dir), device="cpu", dtype="float32")
    params = dict(model.named_parameters())
    data = EncodedSet(tok, [Example(prompt=p, response="sure") for p in ("rob a store", "bake bread", "bake")], "raw")
    calls = []
    monkeypatch.setattr(curvature, "release_freed_host_memory", lambda: calls.append(1))
    op = curvature.FinetuneLoss(model, params, data, batch_size=2)
    _, g = op.value_and_grad()
    assert len(calls) == 2
    curvature.HessianOperator(model, params, data, batch_size=2).matvec_by_differences(g)  # two passes
    assert len(calls) == 6
