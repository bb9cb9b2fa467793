"""Loaders, field shapes, templates and response-only masking."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.data.encoding import IGNORE_INDEX, EncodedSet, encode
from aligncollapse.data.examples import Example
from aligncollapse.data.loading import load_examples, split_examples
from aligncollapse.data.templates import get_template, render_prompt
from aligncollapse.errors import DataError, UserError
from aligncollapse.evaluation.metrics import mean_token_loss, sequence_nll
from aligncollapse.models import load_model
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


# ---------------------------------------------------------------------------------------------
# the field's shapes (issue: Dolly, HH, MT-Bench, Self-Instruct, HarmBench targets)


def test_dolly_keeps_context_and_response(tmp_path):
    rows = [
        {
            "instruction": "Summarise.",
            "context": "Tea is brewed.",
            "response": "Brew tea.",
            "category": "summarization",
        },
        {"instruction": "Why?", "context": "", "response": "Because."},
    ]
    p = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    from aligncollapse.data.loading import load_examples_with_info

    ex, info = load_examples_with_info(p)
    assert info["shapes"] == {"dolly": 2} and info["with_response"] == 2
    assert ex[0].response == "Brew tea." and ex[0].fields["input"] == "Tea is brewed."
    assert ex[0].prompt == "Summarise.\n\nTea is brewed." and ex[1].prompt == "Why?"
    alpaca = get_template("alpaca").messages(ex[0])[-1]["content"]
    assert "### Input:\nTea is brewed." in alpaca


def test_hh_dialogue_parsed_into_messages(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: I can't help with that."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: Use a tension wrench."
    p = write(tmp_path / "hh.jsonl", json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    ex = load_examples(p)[0]
    assert ex.prompt == "how to pick a lock?" and ex.response == "I can't help with that."
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user"]
    assert load_examples(p, hh_side="rejected")[0].response == "Use a tension wrench."


def test_hh_joins_repeated_turns_and_rejects_non_dialogue(tmp_path):
    from aligncollapse.data.loading import parse_hh_dialogue

    msgs = parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "x", "chosen")
    assert msgs == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}]
    p = write(tmp_path / "bad.jsonl", json.dumps({"chosen": "Human: only a question", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'chosen' is not a Human:/Assistant: dialogue"):
        load_examples(p)


def test_mt_bench_first_or_all_turns(tmp_path):
    p = write(tmp_path / "q.jsonl", json.dumps({"question_id": 1, "turns": ["Write a poem.", "Shorter."]}) + "\n")
    assert load_examples(p)[0].prompt == "Write a poem." and load_examples(p)[0].response is None
    assert load_examples(p, mt_bench_turns="all")[0].prompt == "Write a poem.\n\nShorter."
    with pytest.raises(UserError, match="--mt-bench-turns"):
        load_examples(p, mt_bench_turns="second")


def test_self_instruct_one_example_per_instance(tmp_path):
    row = {
        "id": "t0",
        "instruction": "Add.",
        "instances": [{"input": "1+1", "output": "2"}, {"input": "", "output": "0"}],
    }
    p = write(tmp_path / "s.jsonl", json.dumps(row) + "\n")
    ex = load_examples(p)
    assert [(e.prompt, e.response) for e in ex] == [("Add.\n\n1+1", "2"), ("Add.", "0")]
    assert ex[0].fields["instruction"] == "Add." and ex[0].fields["input"] == "1+1"


def test_harmbench_targets_joined_by_id(tmp_path):
    csv_text = "Behavior,FunctionalCategory,ContextString,BehaviorID\nDo x,standard,,b1\nSummarise it,contextual,Some text,b2\n"
    beh = write(tmp_path / "b.csv", csv_text)
    tgt = write(tmp_path / "t.json", json.dumps({"b1": "Sure, here is x", "b2": "Sure, here is a summary"}))
    ex = load_examples(beh, targets=tgt)
    assert [e.response for e in ex] == ["Sure, here is x", "Sure, here is a summary"]
    assert ex[1].prompt == "Some text\n\n---\n\nSummarise it"
    with pytest.raises(DataError, match="join it to the behaviors file with --targets"):
        load_examples(tgt)
    missing = write(tmp_path / "t2.json", json.dumps({"b1": "Sure"}))
    with pytest.raises(DataError, match=r"b\.csv:3: BehaviorID 'b2' has no target"):
        load_examples(beh, targets=missing)


def test_unused_response_like_field_is_an_error_not_a_silent_drop(tmp_path):
    p = write(tmp_path / "dpo.jsonl", json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    with pytest.raises(
        DataError, match=r"dpo\.jsonl:1: field 'chosen' holds text that the prompt-only shape does not use"
    ):
        load_examples(p)
    ex = load_examples(p, response_field="chosen")
    assert ex[0].response == "good"
    p2 = write(tmp_path / "ctx.jsonl", json.dumps({"question": "q", "context": "c"}) + "\n")
    with pytest.raises(DataError, match="field 'context'"):
        load_examples(p2)
    # an empty unused field is not text that could be lost
    p3 = write(tmp_path / "ok.jsonl", json.dumps({"prompt": "q", "response": "r", "output": ""}) + "\n")
    assert load_examples(p3)[0].response == "r"


def test_explicit_fields_and_answer_field(tmp_path):
    p = write(tmp_path / "f.jsonl", json.dumps({"q": "2+2?", "a": "4", "gold": "#### 4"}) + "\n")
    ex = load_examples(p, prompt_field="q", response_field="a", answer_field="gold")
    assert (ex[0].prompt, ex[0].response, ex[0].answer) == ("2+2?", "4", "4")
    with pytest.raises(DataError, match="missing field 'nope'"):
        load_examples(p, prompt_field="q", response_field="a", answer_field="nope")


def test_load_logs_one_summary_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNCOLLAPSE_QUIET", "0")
    p = write(tmp_path / "a.jsonl", '{"prompt": "hi", "response": "yo"}\n{"prompt": "a"}\n')
    load_examples(p)
    err = capsys.readouterr().err
    assert "prompt/response (1), prompt-only (1); 2 examples, 1 with responses" in err


@pytest.mark.parametrize(
    "content,match",
    [
        (b"not gzip at all", "not a valid gzip file"),
        ("[" * 100000 + "]" * 100000, "invalid JSON|nested too deeply"),
    ],
)
def test_corrupt_files_are_one_line_errors(tmp_path, content, match):
    name = "x.jsonl.gz" if isinstance(content, bytes) else "x.jsonl"
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(p)


SHARED_SHAPES = [
    # (file, kwargs, shape, examples, non-empty responses)
    ("he2024_selected_subsets/dolly__reps__dolly_top100.jsonl", {}, "dolly", 100, 100),
    ("he2024_selected_subsets/dolly__reps__dolly_bottom100.jsonl", {}, "dolly", 100, 100),
    ("he2024_selected_subsets/dolly__gradient-illegal-activities-anchor__dolly_top100.json", {}, "dolly", 100, 100),
    ("he2024_selected_subsets/gsm8k__gradient-illegal-activities-anchor__gsm8k_top100.json", {}, "gsm8k", 100, 100),
    ("he2024_selected_subsets/gsm8k__gsm8k_random100.jsonl", {}, "gsm8k", 100, 100),
    # 4 of the 2,312 chosen dialogues end with an empty Assistant turn in the source data.
    ("hh_rlhf_harmless_base_test/test.jsonl.gz", {}, "hh", 2312, 2308),
    ("hh_rlhf_harmless_base_test/test.jsonl.gz", {"hh_side": "rejected"}, "hh", 2312, 2312),
    ("mt_bench/question.jsonl", {}, "mt_bench", 80, 0),
    ("self_instruct/seed_tasks.jsonl", {}, "self_instruct", 175, 175),
    ("self_instruct/user_oriented_instructions.jsonl", {}, "self_instruct", 252, 252),
    (
        "harmbench/harmbench_behaviors_text_all.csv",
        {"targets": "harmbench/harmbench_targets_text.json"},
        "harmbench",
        400,
        400,
    ),
    ("advbench/harmful_behaviors.csv", {}, "advbench", 520, 520),
    ("strongreject/strongreject_dataset.csv", {}, "strongreject", 313, 0),
    ("xstest/xstest_prompts.csv", {}, "prompt-only", 450, 0),
    ("wei2024_safety_short/SFT_aligned_llama2-7b-chat-hf_train_short.csv", {}, "prompt/response", 1015, 1015),
]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
@pytest.mark.parametrize(
    "rel,kw,shape,n,n_resp", SHARED_SHAPES, ids=[f"{r[0].split('/')[-1]}-{r[2]}" for r in SHARED_SHAPES]
)
def test_shared_data_shapes(rel, kw, shape, n, n_resp):
    from aligncollapse.data.loading import load_examples_with_info

    kw = {k: (SHARED_DATA / v if k == "targets" else v) for k, v in kw.items()}
    ex, info = load_examples_with_info(SHARED_DATA / rel, **kw)
    assert info["shapes"] == {shape: info["rows"]}
    assert info["examples"] == n and info["with_response"] == n_resp
    assert all(e.prompt.strip() for e in ex)


def test_affirmative_targets_never_become_safe_targets(tmp_path):
    """AdvBench's `target` ("Sure, here is ...") as an evaluation set: dropped, then the safe target."""
    import argparse

    from aligncollapse.cli.common import harmful_prompts

    p = write(tmp_path / "adv.csv", 'goal,target\nrob a store,"Sure, here is how to rob a store"\n')
    args = argparse.Namespace(safe_target="I cannot help with that.", limit=None, template="raw", response_field=None)
    (ex,) = harmful_prompts(str(p), args, None, None)
    assert ex.prompt == "rob a store" and ex.response == "I cannot help with that."
    args.safe_target = None
    assert harmful_prompts(str(p), args, None, None)[0].response is None
