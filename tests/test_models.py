"""Model loading offline, LoRA through peft, and parameter-block selection."""

from __future__ import annotations

import pytest
import torch

from aligncollapse.errors import UserError
from aligncollapse.models import BlockSelection, LoraSettings, load_model, merged_state, parse_layers


def test_tiny_model_loads_offline(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(tiny_model_dir, dtype="float64")
    assert next(model.parameters()).dtype == torch.float64
    assert model.config._attn_implementation == "eager"
    assert tok.pad_token_id is not None and not model.training


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="Hub id"):
        load_model("someone/not-a-cached-model")
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(tmp_path / "empty", dtype="float8")


def test_lora_wrap_and_merge(tiny_model_dir):
    model, _ = load_model(
        tiny_model_dir,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q", "k", "v", "o", "gate", "up", "down"]),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    merged = merged_state(model)
    base, _ = load_model(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = merged[name] - base.state_dict()[name]
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expect = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * (8 / 4)
    assert torch.allclose(delta, expect, atol=1e-6)
    with pytest.raises(UserError, match="not found in the model"):
        load_model(tiny_model_dir, lora=LoraSettings(target_modules=["c_attn"]))


def test_block_selection(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    q = BlockSelection(module_types=["q", "down"]).select(model)
    assert list(q) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    layer0 = BlockSelection(layers=(0, 0)).select(model)
    assert all(".layers.0." in n for n in layer0) and "model.embed_tokens.weight" not in layer0
    norms = BlockSelection(patterns=[r"norm\.weight$"]).select(model)
    assert all(n.endswith("norm.weight") for n in norms) and len(norms) == 3
    with pytest.raises(UserError, match="matches no parameter"):
        BlockSelection(layers=(5, 6)).select(model)
    assert parse_layers("2-5") == (2, 5) and parse_layers("3") == (3, 3) and parse_layers(None) is None
    with pytest.raises(UserError):
        parse_layers("x")


def test_lora_adapter_directory_loads_merged(tmp_path, tiny_model_dir):
    """What `finetune --lora` saves (an adapter without config.json) loads as base + adapter, merged."""
    import torch

    from aligncollapse.models import LoraSettings, apply_lora, load_model

    model, tok = load_model(tiny_model_dir)
    peft_model = apply_lora(model, LoraSettings(r=2, alpha=4.0, dropout=0.0, target_modules=["q", "v"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-zero update, so merging matters
    peft_model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    merged, _ = load_model(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_model(tiny_model_dir)[0](input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
