"""The one interface every defense implements, and what the defenses share.

A defense hooks into :func:`aligncollapse.training.finetune.finetune` at five points, each optional:

* ``prepare_data(train)``: change the fine-tuning data (data-level defenses);
* ``setup(model)``: once, at θ* before the first step (estimate subspaces, keep θ*);
* ``on_gradients(model, step)``: after the backward pass, before the optimiser step;
* ``on_update(model, step, before)``: after the optimiser step, with the trainable weights from
  before it (update-level defenses rewrite θ_new = θ_old + Π(θ_new − θ_old));
* ``finalize(model)``: after the last step (post-hoc defenses); returns the model.

Time spent inside the hooks is recorded per hook, so overhead is measured, not estimated.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example


@dataclass
class DefenseContext:
    """What a defense may use: the safety (training-side) data, never the evaluation prompts."""

    tokenizer: object
    safety: Sequence[Example]
    template: str = "raw"
    use_chat_template: bool | None = None
    max_length: int = 512
    unaligned_state: dict | None = None  # the pre-alignment weights (Safe-LoRA)
    seed: int = 0
    batch_size: int = 32


class Defense:
    name = "none"

    def __init__(self, ctx: DefenseContext, **options):
        self.ctx = ctx
        self.options = options
        self.timing: dict[str, float] = {}
        self.counters: dict[str, float] = {}

    # hooks ------------------------------------------------------------------------------------
    def prepare_data(self, train: Sequence[Example]) -> list[Example]:
        return list(train)

    def setup(self, model) -> None:
        pass

    def on_gradients(self, model, step: int) -> None:
        pass

    def on_update(self, model, step: int, before: OrderedDict[str, torch.Tensor]) -> None:
        pass

    def finalize(self, model):
        return model

    wants_update = False  # whether finetune() must snapshot weights before each step
    post_hoc = False  # whether finalize() changes the weights

    # helpers ----------------------------------------------------------------------------------
    def timed(self, key: str):
        defense = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                defense.timing[key] = defense.timing.get(key, 0.0) + time.perf_counter() - self.t

        return _T()

    def memory_terms(self, model, shape, seq_len: int) -> dict:
        """Bytes this defense adds to fine-tuning (:func:`aligncollapse.geometry.memory.finetune_memory_plan`):
        ``setup`` (its peak while ``setup`` runs, beyond the weights), ``held`` (what it keeps through
        the steps) and ``transient`` (a step's own work, after the backward pass). ``shape`` is the
        model's :class:`~aligncollapse.geometry.memory.ModelShape` over the trainable parameters;
        ``seq_len`` the longest fine-tuning sequence. A defense without a formula adds nothing."""
        return {"setup": 0, "held": 0, "transient": 0, "inputs": {}}

    def safety_sizes(self) -> dict:
        """The safety reference's sizes before it is generated: N prompts, T (the longest prompt plus
        its 32 generated tokens), the tokens that will carry a loss (at most 33 per prompt)."""
        from aligncollapse.data.encoding import encode

        c = self.ctx
        lens = [len(encode(c.tokenizer, e, c.template, use_chat_template=c.use_chat_template, max_length=c.max_length,
                           response="").input_ids) for e in c.safety]  # fmt: skip
        N = len(lens)
        return {"N": N, "T": max((min(p + 32, c.max_length) for p in lens), default=1),
                "tokens": sum(min(p + 32, c.max_length) for p in lens), "loss_tokens": 33 * N}  # fmt: skip

    def info(self) -> dict:
        return {"name": self.name, "options": self.options, "seconds": dict(self.timing),
                "seconds_total": sum(self.timing.values()), **self.counters}  # fmt: skip


def trainable(model) -> OrderedDict[str, torch.nn.Parameter]:
    return OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assign(params: OrderedDict[str, torch.nn.Parameter], vec: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for p in params.values():
            p.copy_(vec[off : off + p.numel()].reshape(p.shape).to(p.dtype))
            off += p.numel()


@dataclass
class SafetyReference:
    """The safety prompts with θ*'s own greedy responses: the alignment KL's reference (as in the
    scan). Only the encoded set is kept: no reference log-probabilities and no copy of the model."""

    data: EncodedSet

    @classmethod
    def build(cls, model, ctx: DefenseContext) -> SafetyReference:
        from aligncollapse.evaluation.metrics import reference_data

        return cls(reference_data(model, ctx.tokenizer, ctx.safety, ctx.template, use_chat_template=ctx.use_chat_template,
                                  max_length=ctx.max_length)[1])  # fmt: skip


def safety_subspace(model, params, data: EncodedSet, d: int, seed: int, batch_size: int = 32):
    """Top-d eigenpairs of the alignment-KL Fisher (exact GGN, Lanczos) at the model's current θ."""
    from aligncollapse.geometry.curvature import GGNOperator, top_eigenpairs

    was = model.training
    F = GGNOperator(model, params, data, batch_size, per="sequence")
    lam, B = top_eigenpairs(F, k=d, seed=seed)
    model.train(was)
    return lam.clamp_min(0.0).to(torch.float64), B.to(torch.float64)
