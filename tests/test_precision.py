"""Half-precision models: the curvature operators agree with float32 and accumulate in float32.

Both models carry the same (bfloat16-representable) weights, so the difference is arithmetic only.
bfloat16 keeps 8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3); a product passes through two layers'
forward, forward-mode and backward passes, a few dozen roundings in series, so we allow a relative
norm error of 5e-2 (≈ 13 roundoffs). float16 keeps 11 bits (roundoff 4.9e-4): 1e-2. Measured on
CPU: 3.9e-3 to 5.4e-3 in bfloat16, 4.3e-4 to 8.8e-4 in float16 (about one roundoff); the bounds leave
room for other kernels (GPU). Accumulation in float32 is checked by the returned dtype, not by the
tolerance (3 batches summed in bfloat16 would stay inside it).
"""

from __future__ import annotations

import pytest
import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.geometry.curvature import FinetuneLoss, FisherOperator, GGNOperator, HessianOperator
from aligncollapse.models import BlockSelection
from conftest import micro_examples

BF16_RTOL = 5e-2
FP16_RTOL = 1e-2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these products are tiny, and two OpenMP threads on two busy cores spin-wait
    (100× slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_and_data():
    """A random 2-layer Llama (hidden 32, vocabulary of ~20 words) with bfloat16-exact weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncollapse.organism.tokenizer import build_tokenizer

    words = "how do i rob a store bake bread I cannot help with that . sure here is step one".split()
    tok = build_tokenizer(set(words))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # representable in bf16 (and fp16): same weights
    data = EncodedSet(tok, micro_examples()[:12])
    return model, data


def _copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _products(model, data):
    params = BlockSelection().select(model)
    n = sum(p.numel() for p in params.values())
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # any dtype is accepted
    _, g = FinetuneLoss(model, params, data, batch_size=5).value_and_grad()
    return {
        "gradient": g,
        "ggn": GGNOperator(model, params, data, batch_size=5).matvec(v),
        "fisher": FisherOperator(model, params, data, batch_size=5).matvec(v),
        "hessian": HessianOperator(model, params, data, batch_size=5).matvec(v),
    }


def test_bfloat16_products_match_float32(llama_and_data):
    model, data = llama_and_data
    ref = _products(model, data)
    half = _products(_copy(model, torch.bfloat16), data)
    for name, out in half.items():
        assert out.dtype == torch.float32, f"{name}: accumulated in {out.dtype}"
        assert out.device == next(model.parameters()).device
        err = _rel(out, ref[name])
        assert err < BF16_RTOL, f"{name}: relative error {err:.3g} in bfloat16"
        assert err > 0, f"{name}: identical to float32, so the bfloat16 path was not exercised"


def test_float16_products_match_float32(llama_and_data):
    model, data = llama_and_data
    ref = _products(model, data)
    half = _products(_copy(model, torch.float16), data)
    for name, out in half.items():
        assert out.dtype == torch.float32
        err = _rel(out, ref[name])
        assert err < FP16_RTOL, f"{name}: relative error {err:.3g} in float16"


def test_float64_model_accumulates_in_float64(llama_and_data):
    model, data = llama_and_data
    m64 = _copy(model, torch.float64)
    params = BlockSelection().select(m64)
    op = GGNOperator(m64, params, data, batch_size=5)
    v = torch.ones(op.n, dtype=torch.bfloat16)  # a low-precision input is upcast, not the other way round
    out = op.matvec(v)
    assert op.acc_dtype == torch.float64 and out.dtype == torch.float64
    assert torch.equal(out, op.matvec(v.double()))  # ±1 entries are exact in bfloat16
