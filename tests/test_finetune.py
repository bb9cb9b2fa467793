"""The fine-tuning engine: it learns, resumes exactly, survives Ctrl-C, tracks, and plugs into Trainer."""

from __future__ import annotations

import json

import pytest
import torch

from aligncollapse.models import LoraSettings, load_model
from aligncollapse.organism.suite import load_suite_set
from aligncollapse.training.finetune import FinetuneConfig, finetune
from aligncollapse.training.tracking import Tracker, TrackerCallback, read_trajectory


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sets(small_suite):
    return (
        load_suite_set(small_suite, "arithmetic"),
        load_suite_set(small_suite, "eval_harmful")[:6],
        load_suite_set(small_suite, "eval_benign")[:6],
    )


def test_finetuning_lowers_the_loss(tiny_model_dir, small_suite, tmp_path):
    model, tok = load_model(tiny_model_dir)
    train, harmful, benign = _sets(small_suite)
    cfg = FinetuneConfig(lr=3e-3, steps=30, batch_size=8, track_every=10, refusal_every=30)
    res = finetune(model, tok, train, tmp_path / "run", cfg, eval_harmful=harmful, eval_benign=benign)
    traj = read_trajectory(tmp_path / "run")
    assert traj[0]["step"] == 0 and traj[-1]["step"] == 30
    assert traj[-1]["ft_loss"] < traj[1]["ft_loss"] * 0.8
    assert traj[0]["alignment_kl"] == pytest.approx(0.0, abs=1e-6) and traj[0]["displacement"] == 0.0
    assert "refusal_rate" in traj[0] and "refusal_rate" in traj[-1]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["schema_version"] and saved["command"] == "finetune" and saved["status"] == "completed"
    assert set(saved["summary"]) >= {"harmful_refusal_rate", "alignment_loss", "alignment_kl"}
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert res["steps_done"] == 30


def test_resume_equals_uninterrupted_run(tiny_model_dir, small_suite, tmp_path):
    train, harmful, _ = _sets(small_suite)
    base = dict(lr=1e-3, batch_size=4, track_every=2, refusal_every=0, lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    m1, tok = load_model(tiny_model_dir)
    r1 = finetune(
        m1, tok, train, tmp_path / "straight", FinetuneConfig(steps=8, **base), eval_harmful=harmful, final_eval=False
    )

    m2, _ = load_model(tiny_model_dir)
    finetune(
        m2, tok, train, tmp_path / "split", FinetuneConfig(steps=4, **base), eval_harmful=harmful, final_eval=False
    )
    m3, _ = load_model(tiny_model_dir)  # a fresh process would start from the saved checkpoint
    r3 = finetune(
        m3, tok, train, tmp_path / "split", FinetuneConfig(steps=8, **base), eval_harmful=harmful, final_eval=False
    )

    p1, p3 = _params(r1["model"]), _params(r3["model"])
    assert p1.keys() == p3.keys()
    for n in p1:
        assert torch.equal(p1[n], p3[n]), n
    t1 = [(r["step"], r["ft_loss"] if "ft_loss" in r else None) for r in read_trajectory(tmp_path / "straight")]
    t3 = [(r["step"], r["ft_loss"] if "ft_loss" in r else None) for r in read_trajectory(tmp_path / "split")]
    assert t1 == t3


def test_ctrl_c_saves_checkpoint_and_resumes(tiny_model_dir, small_suite, tmp_path):
    train, harmful, _ = _sets(small_suite)
    cfg = FinetuneConfig(lr=1e-3, steps=6, batch_size=4, track_every=1, refusal_every=0)

    def interrupt(model, step):
        if step == 3:
            raise KeyboardInterrupt

    m, tok = load_model(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        finetune(m, tok, train, tmp_path / "run", cfg, eval_harmful=harmful, step_hook=interrupt, final_eval=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "interrupted" and saved["steps_done"] == 3
    assert (tmp_path / "run" / "checkpoint" / "state.pt").exists()
    m2, _ = load_model(tiny_model_dir)
    res = finetune(m2, tok, train, tmp_path / "run", cfg, eval_harmful=harmful, final_eval=False)
    assert res["status"] == "completed" and res["steps_done"] == 6
    ref, _ = load_model(tiny_model_dir)
    straight = finetune(ref, tok, train, tmp_path / "ref", cfg, eval_harmful=harmful, final_eval=False)
    for (n, a), (_, b) in zip(res["model"].named_parameters(), straight["model"].named_parameters()):
        assert torch.equal(a, b), n


def test_sgd_time_scale_and_lora_merged_displacement(tiny_model_dir, small_suite, tmp_path):
    train, harmful, _ = _sets(small_suite)
    m, tok = load_model(tiny_model_dir)
    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q", "v"])
    cfg = FinetuneConfig(optimizer="sgd", lr=0.5, steps=4, batch_size=4, track_every=2, refusal_every=0, lora=lora)
    res = finetune(m, tok, train, tmp_path / "run", cfg, eval_harmful=harmful, final_eval=False)
    traj = res["trajectory"]
    assert [r["t"] for r in traj] == [0.0, 1.0, 2.0]
    assert traj[-1]["merged_displacement"] > 0 and traj[0]["merged_displacement"] == 0.0
    assert res["trainable_parameters"] < sum(p.numel() for p in res["model"].parameters())


def test_trainer_callback_records_trajectory(tiny_model_dir, small_suite, tmp_path):
    from transformers import Trainer, TrainingArguments

    from aligncollapse.data.encoding import EncodedSet

    model, tok = load_model(tiny_model_dir)
    train, harmful, _ = _sets(small_suite)
    data = EncodedSet(tok, train)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data.items[i]

    tracker = Tracker(model, tok, harmful, tmp_path / "trajectory.jsonl", every=2, refusal_every=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=DS(), data_collator=lambda b: data_collate(b, data.pad_id),
        callbacks=[TrackerCallback(tracker)],
    )  # fmt: skip
    trainer.train()
    steps = [r["step"] for r in read_trajectory(tmp_path / "trajectory.jsonl")]
    assert steps == [0, 2, 4]
    assert tracker.records[-1]["displacement"] > 0


def data_collate(batch, pad_id):
    from aligncollapse.data.encoding import collate

    return collate(batch, pad_id)


def test_tracker_records_the_sequence_level_kl(tiny_model_dir, small_suite, tmp_path):
    train, harmful, _ = _sets(small_suite)
    m, tok = load_model(tiny_model_dir)
    cfg = FinetuneConfig(lr=1e-2, steps=4, batch_size=4, track_every=2, refusal_every=2, track_sequence_kl=2)
    res = finetune(m, tok, train, tmp_path / "ft", cfg, eval_harmful=harmful[:3], final_eval=False, save_model=False)
    recs = {r["step"]: r for r in res["trajectory"]}
    assert recs[0]["alignment_kl_sequence"] == pytest.approx(0.0, abs=1e-9)  # at θ* both forms vanish
    assert recs[4]["alignment_kl_sequence"] > 0 and recs[4]["alignment_kl_sequence_stderr"] is not None
