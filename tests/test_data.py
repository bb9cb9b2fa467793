"""Loaders, field shapes, templates and response-only masking."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.data import (
    IGNORE_INDEX,
    EncodedSet,
    Example,
    encode,
    load_examples,
    split_examples,
)
from aligncollapse.errors import DataError, UserError
from aligncollapse.evaluation import mean_token_loss, sequence_nll
from aligncollapse.models import load_model
from aligncollapse.templates import get_template, render_prompt
from conftest import SHARED_DATA, write


def test_jsonl_prompt_response(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"prompt": "hi", "response": "yo"}\n\n{"prompt": "a", "response": "b"}\n')
    ex = load_examples(p)
    assert [(e.prompt, e.response) for e in ex] == [("hi", "yo"), ("a", "b")]
    assert ex[1].source.endswith("a.jsonl:3")


def test_jsonl_bad_json_names_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"prompt": "hi", "response": "yo"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        load_examples(p)


def test_jsonl_missing_field_and_wrong_type(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "no shape"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: cannot tell which fields"):
        load_examples(p)
    p = write(tmp_path / "b.jsonl", '{"prompt": ["x"], "response": "y"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'prompt' must be a string, got list"):
        load_examples(p)
    p = write(tmp_path / "c.jsonl", '{"prompt": "x", "response": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: no response field"):
        load_examples(p, require_response=True)


def test_alpaca_shape_and_template(tmp_path, tiny_model_dir):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet", "input": "", "output": "hello"},
    ]
    p = write(tmp_path / "alpaca.json", json.dumps(rows))
    ex = load_examples(p)
    assert ex[0].fields["instruction"] == "Add" and ex[0].fields["input"] == "2 and 3"
    assert ex[0].prompt == "Add\n\n2 and 3" and ex[0].response == "5"
    _, tok = load_model(tiny_model_dir)
    text = render_prompt(ex[0], get_template("alpaca"), tok, use_chat_template=False)
    assert text.startswith("Below is an instruction")
    assert "### Instruction:\nAdd\n### Input:\n2 and 3\n### Response:" in text
    no_input = render_prompt(ex[1], get_template("alpaca"), tok, use_chat_template=False)
    assert "### Input:" not in no_input


def test_json_bad_shape(tmp_path):
    with pytest.raises(DataError, match=r"expected a JSON list"):
        load_examples(write(tmp_path / "x.json", '{"a": 1}'))
    with pytest.raises(DataError, match=r"x2\.json\[1\]: expected a JSON object"):
        load_examples(write(tmp_path / "x2.json", '[{"prompt": "a", "response": "b"}, 3]'))


def test_csv_gsm8k_advbench_samsum_shapes(tmp_path):
    p = write(tmp_path / "adv.csv", 'goal,target\n"Do harm","Sure, here is"\n')
    ex = load_examples(p)
    assert ex[0].prompt == "Do harm" and ex[0].response == "Sure, here is"
    g = write(tmp_path / "g.jsonl", json.dumps({"question": "1+1?", "answer": "It is 2.\n#### 2"}) + "\n")
    ex = load_examples(g)
    assert ex[0].response.endswith("#### 2") and ex[0].answer == "2"
    s = write(tmp_path / "s.jsonl", json.dumps({"dialogue": "A: hi\nB: yo", "summary": "They greet."}) + "\n")
    ex = load_examples(s)
    assert ex[0].prompt.startswith("A: hi") and ex[0].response == "They greet."


def test_csv_bad_row(tmp_path):
    p = write(tmp_path / "bad.csv", "prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: more values"):
        load_examples(p)


def test_prompt_only_with_safe_target(tmp_path):
    p = write(tmp_path / "h.csv", "Behavior,FunctionalCategory\nDo a bad thing,standard\n")
    ex = load_examples(p, safe_target="I cannot help with that.", require_response=True)
    assert ex[0].prompt == "Do a bad thing" and ex[0].response == "I cannot help with that."


def test_chat_messages(tmp_path, tiny_model_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "how do i bake bread"},
                {"role": "assistant", "content": "to bake bread"},
            ]
        }
    ]
    p = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_examples(p)
    assert ex[0].response == "to bake bread" and ex[0].messages == [{"role": "user", "content": "how do i bake bread"}]
    _, tok = load_model(tiny_model_dir)
    assert render_prompt(ex[0], get_template("raw"), tok) == "<bos>user : how do i bake bread assistant :"
    bad = write(tmp_path / "bad.jsonl", json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'messages'\[0\]"):
        load_examples(bad)


def test_hf_dataset_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    ds.save_to_disk(tmp_path / "ds")
    ex = load_examples(tmp_path / "ds")
    assert [e.prompt for e in ex] == ["q1", "q2"]
    with pytest.raises(UserError, match="data file not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_unknown_template():
    with pytest.raises(UserError, match="unknown prompt template"):
        get_template("vicuna")


def test_samsum_template(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    text = render_prompt(Example(prompt="A: hi"), get_template("samsum"), tok, use_chat_template=False)
    assert text.startswith("You are a helpful, respectful and honest assistant.") and text.rstrip().endswith("A: hi")


def test_split_is_deterministic_and_disjoint():
    ex = [Example(prompt=f"p{i % 30}", response="r") for i in range(60)]
    a1, b1 = split_examples(ex, 0.2, seed=3)
    a2, b2 = split_examples(ex, 0.2, seed=3)
    assert [e.prompt for e in b1] == [e.prompt for e in b2]
    assert not {e.prompt for e in a1} & {e.prompt for e in b1}
    assert len({e.prompt for e in b1}) == 6


def test_response_only_masking_and_loss(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    e = Example(prompt="how do i bake bread", response="to bake bread , mix the flour and water .")
    enc = encode(tok, e)
    n_prompt = len(tok(render_prompt(e, get_template("raw"), tok), add_special_tokens=False)["input_ids"])
    assert enc.prompt_len == n_prompt
    assert all(t == IGNORE_INDEX for t in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tok.eos_token_id
    # The loss equals the hand-computed NLL of the response tokens only.
    data = EncodedSet(tok, [e])
    batch = data.batch([0])
    logits = model(input_ids=batch["input_ids"]).logits[0]
    logp = torch.log_softmax(logits, -1)
    ids = batch["input_ids"][0]
    manual = -sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    nll, count = sequence_nll(model, batch)
    assert count.item() == len(ids) - n_prompt
    assert torch.allclose(nll[0], manual, rtol=1e-5)
    assert torch.allclose(mean_token_loss(model, batch), manual / count[0], rtol=1e-5)


def test_step_indices_pure_function():
    from aligncollapse.organism.tokenizer import build_tokenizer

    tok = build_tokenizer({"a", "b"})
    data = EncodedSet(tok, [Example(prompt="a", response="b") for _ in range(10)])
    assert data.step_indices(7, 4, seed=1) == data.step_indices(7, 4, seed=1)
    assert len(data.step_indices(2, 4, seed=1)) == 4
    epoch0 = sum((data.step_indices(s, 5, 0) for s in range(2)), [])
    assert sorted(epoch0) == list(range(10))


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_real_shared_data_loads():
    adv = load_examples(SHARED_DATA / "advbench" / "harmful_behaviors.csv")
    assert len(adv) == 520 and adv[0].response.startswith("Sure, here is")
    gsm = load_examples(SHARED_DATA / "gsm8k" / "test.jsonl")
    assert len(gsm) == 1319 and gsm[0].answer == "18"
    short = load_examples(SHARED_DATA / "wei2024_safety_short" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv")
    assert len(short) > 1000 and short[0].prompt.startswith("[INST]") and "I cannot" in short[0].response
    hb = load_examples(SHARED_DATA / "harmbench" / "harmbench_behaviors_text_val.csv", safe_target="I cannot help.")
    assert all(e.response == "I cannot help." for e in hb)
