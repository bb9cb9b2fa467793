"""The one tracker: records the safety trajectory of a fine-tuning run to ``trajectory.jsonl``.

Every ``every`` steps it appends the fine-tuning loss, both alignment-loss forms (per-token NLL
of safe targets, and KL to the aligned reference), the displacement ‖θ_t − θ_0‖ (for LoRA also
of the merged update) and, every ``refusal_every`` steps, the refusal rate on held-out harmful
prompts. It works inside our fine-tuning loop and as a Hugging Face ``Trainer`` callback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.distributed import full, is_main
from aligncollapse.errors import NonFiniteError
from aligncollapse.evaluation.metrics import GenerationConfig, KLReference, SequenceKL, alignment_loss, generate
from aligncollapse.evaluation.refusal import RefusalDetector, is_degenerate
from aligncollapse.results import append_line, atomic_write_text


def lora_merged_delta_norm(model) -> float | None:
    """‖Σ (α/r)·B A‖_F over all LoRA modules (None for a model without LoRA)."""
    total, found = 0.0, False
    for mod in model.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "scaling"):
            for key in mod.lora_A:
                a, b = full(mod.lora_A[key].weight), full(mod.lora_B[key].weight)  # whole under FSDP
                total += float(((b @ a) * mod.scaling[key]).pow(2).sum())
                found = True
    return math.sqrt(total) if found else None


class Tracker:
    def __init__(
        self,
        model,
        tokenizer,
        safety: Sequence[Example],
        path: str | Path | None,
        *,
        template: str = "raw",
        use_chat_template: bool | None = None,
        every: int = 5,
        refusal_every: int = 20,
        refusal_prompts: Sequence[Example] | None = None,
        kl: bool = True,
        refusal: str = "zou2023",
        max_length: int = 512,
        generation: GenerationConfig | None = None,
        time_scale: float | None = None,
        sequence_kl_samples: int = 0,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.use_chat_template = use_chat_template
        self.every = max(1, every)
        self.refusal_every = refusal_every
        self.path = Path(path) if path else None
        self.safety = EncodedSet(
            tokenizer,
            [e for e in safety if e.response],
            template,
            use_chat_template=use_chat_template,
            max_length=max_length,
        )
        self.refusal_prompts = list(refusal_prompts if refusal_prompts is not None else safety)
        self.detector = RefusalDetector.named(refusal)
        self.generation = generation or GenerationConfig(max_new_tokens=32)
        self.kl = (
            KLReference(model, tokenizer, safety, template, use_chat_template=use_chat_template, max_length=max_length)
            if kl
            else None
        )
        # Lemma 3.2's sequence-level KL by Monte Carlo (sampled once at θ*), measured at the refusal
        # schedule's steps; the greedy-path form above is measured at every tracked step.
        self.seq_kl = (
            SequenceKL(
                model, tokenizer, safety, template, samples=sequence_kl_samples, use_chat_template=use_chat_template
            )
            if sequence_kl_samples
            else None
        )
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.time_scale = time_scale  # e.g. the SGD learning rate: t = lr * step
        self.records: list[dict] = []

    def displacement(self, model) -> float:
        sq = 0.0
        for n, p in model.named_parameters():
            if n in self.theta0:
                sq += float(full((p.detach() - self.theta0[n]).pow(2).sum()))  # FSDP: sums the shards
        return math.sqrt(sq)

    def refusal_rate(self, model) -> dict[str, float]:
        resp = generate(
            model, self.tokenizer, self.refusal_prompts, self.template, self.generation, self.use_chat_template
        )
        refused = [self.detector(r) for r in resp]
        deg = [is_degenerate(r) for r in resp]
        n = len(resp)
        return {
            "refusal_rate": sum(refused) / n,
            "compliance_rate": sum((not a) and (not d) for a, d in zip(refused, deg)) / n,
        }

    @torch.no_grad()
    def measure(self, model, step: int, ft_loss: float | None = None, with_refusal: bool | None = None) -> dict:
        rec: dict = {"step": step}
        if self.time_scale is not None:
            rec["t"] = self.time_scale * step
        if ft_loss is not None:
            rec["ft_loss"] = ft_loss
        rec.update(alignment_loss(model, self.safety))
        if self.kl is not None:
            rec["alignment_kl"] = self.kl(model)
        rec["displacement"] = self.displacement(model)
        merged = lora_merged_delta_norm(model)
        if merged is not None:
            rec["merged_displacement"] = merged
        if with_refusal is None:
            with_refusal = bool(self.refusal_every) and step % self.refusal_every == 0
        if with_refusal:
            rec.update(self.refusal_rate(model))
        if self.seq_kl is not None and (with_refusal or step == 0):
            s = self.seq_kl(model)
            rec["alignment_kl_sequence"], rec["alignment_kl_sequence_stderr"] = s["value"], s["stderr"]
        return rec

    def log(self, model, step: int, ft_loss: float | None = None, force: bool = False) -> dict | None:
        """Measure and append a record if ``step`` is on the schedule (or ``force``)."""
        if not force and step % self.every != 0:
            return None
        if self.records and self.records[-1]["step"] == step:
            return self.records[-1]
        rec = self.measure(model, step, ft_loss)
        bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}", step)
        self.records.append(rec)
        if self.path is not None and is_main():  # under torchrun / accelerate (e.g. Trainer) rank 0 writes
            append_line(self.path, json.dumps(rec))
        return rec

    def resume_from(self, step: int) -> None:
        """Keep only records up to ``step`` (those after it will be measured again)."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec["step"] <= step:
                    keep.append(rec)

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.records = keep


def read_trajectory(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "trajectory.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrackerCallback:
    """Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[TrackerCallback(tracker)])``."""

    def __new__(cls, tracker: Tracker):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                tracker.log(model, 0, force=True)

            def on_step_end(self, args, state, control, model=None, **kw):
                loss = None
                for entry in reversed(state.log_history):
                    if "loss" in entry:
                        loss = float(entry["loss"])
                        break
                tracker.log(model, state.global_step, ft_loss=loss)

        return _Callback()
