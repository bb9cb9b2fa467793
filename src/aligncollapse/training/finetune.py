"""The fine-tuning engine: full or LoRA fine-tuning with fixed budgets, tracking, checkpoints.

The batch at each step is a pure function of (seed, step) (:meth:`EncodedSet.step_indices`), and
checkpoints hold the trainable weights, optimiser state and RNG states, so a resumed run
reproduces the uninterrupted one exactly on CPU. Ctrl-C saves a checkpoint before exiting.

Under ``torchrun`` / ``accelerate launch`` (data parallel, :class:`~torch.nn.parallel.DistributedDataParallel`):
every rank builds the same global batch of step t, takes a contiguous share of it and scales its
summed token NLL by W / (the global batch's token count), so DDP's gradient average is exactly the
one-process mean-token gradient; every rank steps the same optimiser on the same gradient, so the
weights stay identical. Each rank's RNG is reseeded from (seed, step, rank) before its step (dropout),
which makes a resumed run exact without per-rank RNG states. The tracker measures on every rank
(identical models: the same numbers, and no rank waits in a collective for another's evaluation);
rank 0 alone writes the trajectory, checkpoints, the model and ``results.json``, and runs the final
evaluation. Memory per rank: the model, its gradient and the optimiser state (as one process), plus
DDP's gradient buckets (about n·b). The output directory must be shared by all ranks (one node, or a
shared file system).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aligncollapse import distributed
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.data.examples import Example
from aligncollapse.errors import NonFiniteError, RunDiverged, UserError
from aligncollapse.evaluation.metrics import (
    SafetyEvalConfig,
    evaluate_safety,
    headline,
    mean_token_loss,
    sequence_nll,
)
from aligncollapse.models import LoraSettings, apply_lora, count_parameters, is_peft
from aligncollapse.progress import log, progress
from aligncollapse.results import write_results
from aligncollapse.training.tracking import Tracker


@dataclass
class FinetuneConfig:
    """One fine-tuning budget. ``steps`` wins over ``epochs`` when both are given."""

    optimizer: str = "adamw"
    lr: float = 5e-4
    steps: int | None = 40
    epochs: float | None = None
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.0
    grad_clip: float | None = None
    template: str = "raw"
    use_chat_template: bool | None = None
    max_length: int = 512
    track_every: int = 5
    refusal_every: int = 20
    checkpoint_every: int = 25  # steps between checkpoints (0: only at the end and on Ctrl-C)
    checkpoint_minutes: float = 10.0  # ... and at most this many minutes between them (0: off)
    lora: LoraSettings | None = None
    track_kl: bool = True
    track_sequence_kl: int = 0  # responses sampled per prompt for the sequence-level KL (0: off)
    fsdp: bool = False  # shard weights, gradients and optimiser state over the ranks (FSDP2)
    extra: dict = field(default_factory=dict)

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise UserError("give a budget: --steps or --epochs")
        steps = self.epochs * n_examples / self.batch_size
        if not math.isfinite(steps) or steps > 1e9:
            raise UserError(f"--epochs {self.epochs} gives {steps:.3g} steps; give a smaller budget")
        return max(1, round(steps))

    def to_json(self) -> dict:
        d = asdict(self)
        d["lora"] = asdict(self.lora) if self.lora else None
        if not self.fsdp:  # unsharded runs keep the configuration (and checkpoints) they had before --fsdp
            del d["fsdp"]
        return d


def make_optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"--optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def _checkpoint_path(out_dir: Path) -> Path:
    return out_dir / "checkpoint" / "state.pt"


def save_checkpoint(out_dir: Path, step: int, model, opt, cfg: FinetuneConfig, data_digest: str = "") -> None:
    """Write the trainable weights, optimiser and RNG state atomically. For a sharded (FSDP) model this
    is a collective that every rank calls: the full tensors are gathered to rank 0, which writes them
    (the optimiser state keyed by parameter name), so any number of ranks can resume it."""
    if distributed.is_sharded(model):
        params, optim = distributed.full_state(model, opt, trainable_only=True)
        names = {n for n, p in model.named_parameters() if p.requires_grad}  # a tied head once, as the model has it
        params = {k: v for k, v in params.items() if k in names}
        if not distributed.is_main():
            return
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optim = opt.state_dict()
    state = {
        "step": step,
        "data_digest": data_digest,
        "params": params,
        "optimizer": optim,
        "torch_rng": torch.get_rng_state(),
        "config": cfg.to_json(),
        "world_size": distributed.world_size(),
    }
    path = _checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    out_dir: Path, model, opt, cfg: FinetuneConfig, data_digest: str = "", total: int | None = None
) -> int:
    """Restore a checkpoint if one exists and matches the configuration and the data; returns the step
    to start at. A checkpoint that is not a dict of the expected parts, names other parameters or other
    shapes, or was made with other data is refused with one line."""
    path = _checkpoint_path(out_dir)
    if not path.exists():
        return 0
    sharded = distributed.is_sharded(model)
    state = _load_tensors(path, mmap=sharded)  # FSDP: every rank maps the one file and keeps its shard
    bad = f"{path}: not a checkpoint of this run"
    if not isinstance(state, dict) or not {"step", "params", "optimizer", "torch_rng", "config"} <= set(state):
        raise UserError(f"{bad} (missing parts); use a new --out or --no-resume")
    if (
        not isinstance(state["config"], dict)
        or not isinstance(state["params"], dict)
        or not isinstance(state["step"], int)
    ):
        raise UserError(f"{bad} (malformed); use a new --out or --no-resume")
    skip = ("steps", "epochs", "checkpoint_every", "checkpoint_minutes")
    saved = {k: v for k, v in state["config"].items() if k not in skip}
    now = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k not in skip}
    if saved != now:
        raise UserError(f"{path}: checkpoint was made with a different configuration ({_differing(saved, now)}); "
                        "use a new --out or --no-resume")  # fmt: skip
    if state.get("data_digest", "") != data_digest:
        raise UserError(
            f"{path}: checkpoint was made with other training or evaluation data; use a new --out or --no-resume"
        )
    params = dict(model.named_parameters())
    for n, v in state["params"].items():
        if n not in params or not isinstance(v, torch.Tensor) or v.shape != params[n].shape:
            raise UserError(f"{bad} (parameter {n!r} is not in this model or has another shape); use a new --out")
    if total is not None and not 0 <= state["step"] <= total:
        raise UserError(f"{path}: checkpoint is at step {state['step']}, beyond the budget of {total}; use a new --out")
    was_world = state.get("world_size", 1)
    if was_world != distributed.world_size() and distributed.is_main():
        log(f"resuming a checkpoint of {was_world} process(es) with {distributed.world_size()}: the batches are the "
            "same, but dropout draws (if any) differ from the uninterrupted run")  # fmt: skip
    try:
        if sharded:
            distributed.set_full_state(model, state["params"], opt, state["optimizer"])
        else:
            with torch.no_grad():
                for n, v in state["params"].items():
                    params[n].copy_(v)
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(
            f"{bad} (weights, optimiser or RNG state: {type(e).__name__}); use a new --out or --no-resume"
        ) from None
    return int(state["step"])


def _load_tensors(path: Path, mmap: bool = False):
    """``torch.load`` restricted to tensors and plain containers (no pickled code runs); ``mmap``: the
    tensors stay in the file's pages until read."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line naming it
        raise UserError(f"{path}: not a checkpoint this tool can read safely ({type(e).__name__}); "
                        "use a new --out or --no-resume") from None  # fmt: skip


def _finished(out: Path, cfg: FinetuneConfig, data_digest: str) -> dict | None:
    """The results of a run that already finished in ``out`` with the same configuration and data."""
    from aligncollapse.results import read_results

    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        saved = read_results(path)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(saved, dict) or saved.get("command") != "finetune" or saved.get("status") != "completed":
        return None
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    was = config.get("finetune") if isinstance(config.get("finetune"), dict) else {}
    now = json.loads(json.dumps(cfg.to_json()))
    budget = ("steps", "epochs", "checkpoint_every", "checkpoint_minutes")
    if {k: v for k, v in was.items() if k not in budget} != {k: v for k, v in now.items() if k not in budget}:
        diff = _differing(
            {k: v for k, v in was.items() if k not in budget}, {k: v for k, v in now.items() if k not in budget}
        )
        raise UserError(
            f"{out} holds a finished run with another configuration ({diff}); use a new --out or --no-resume"
        )
    if saved.get("data_digest") != data_digest:
        raise UserError(f"{out} holds a finished run on other data; use a new --out or --no-resume")
    if (was.get("steps"), was.get("epochs")) != (now.get("steps"), now.get("epochs")):
        return None  # another budget: continue from the checkpoint (a shorter one is refused there)
    return saved


def _differing(a: dict, b: dict) -> str:
    """The settings two configurations disagree on, for an error message (e.g. ``fsdp, lr``)."""
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def data_digest(train: Sequence[Example], eval_harmful: Sequence[Example] | None) -> str:
    """A short digest of the training and evaluation texts: a resumed run must see the same data."""
    import hashlib

    h = hashlib.sha256()
    for part in (train, eval_harmful or []):
        for e in part:
            h.update(json.dumps([e.prompt, e.response, e.messages], ensure_ascii=False).encode() + b"\n")
        h.update(b"|")
    return h.hexdigest()[:16]


def _check_out_layout(out: Path) -> None:
    """What the run will write must have the right kind, before any work."""
    for name, want_dir in (("trajectory.jsonl", False), ("results.json", False), ("checkpoint", True), ("model", True)):
        p = out / name
        if p.exists() and p.is_dir() != want_dir:
            kind = "a directory" if p.is_dir() else "a file"
            raise UserError(f"{p}: is {kind}; the run writes {'a directory' if want_dir else 'a file'} there")


def finetune(
    model,
    tokenizer,
    train: Sequence[Example],
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    eval_harmful: Sequence[Example] | None = None,
    eval_benign: Sequence[Example] | None = None,
    resume: bool = True,
    final_eval: bool = True,
    save_model: bool = True,
    command_config: dict | None = None,
    step_hook=None,
    defense=None,
    memory_plan=None,
    shard_device: str | None = None,
) -> dict:
    """Fine-tune ``model`` on ``train`` and write ``trajectory.jsonl``, checkpoints and ``results.json``.

    ``eval_harmful`` (harmful prompts with safe targets) feeds the tracker's alignment losses
    and refusal rate and the final evaluation; ``eval_benign`` the final benign metrics.
    ``step_hook(model, step)`` runs after each optimiser step; ``defense`` (an
    :class:`aligncollapse.defenses.Defense`) hooks into data, gradients, updates and the end of
    training. ``memory_plan(model, data)`` (optional) returns the run's memory plan, after LoRA is
    applied and the data encoded and before any heavy work; it may stop the run with a
    :class:`UserError`, and its plan is written to results.json. With ``config.fsdp`` (under torchrun)
    the model is sharded onto ``shard_device`` (default: its own device; a host-loaded model moves
    there one transformer block at a time). Returns the results payload.
    """
    cfg = config or FinetuneConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_out_layout(out)
    digest = data_digest(train, eval_harmful)
    if resume:
        done_before = _finished(out, cfg, digest)
        if done_before is not None:
            log(f"finetune: {out} already holds this finished run; its results are kept (use --no-resume to redo it)")
            done_before["already_finished"] = True
            done_before["model"] = model
            return done_before
    torch.manual_seed(cfg.seed)
    if cfg.lora is not None and not is_peft(model):
        model = apply_lora(model, cfg.lora)
    if defense is not None:
        train = defense.prepare_data(train)
    data = EncodedSet(
        tokenizer, train, cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length
    )
    total = cfg.total_steps(len(data))
    if total > 10**9:
        raise UserError(f"the budget is {total:,} steps; give --steps or a smaller --epochs")
    world, main = distributed.world_size(), distributed.is_main()
    if cfg.fsdp and defense is not None:
        raise UserError("--defense does not run with --fsdp yet: drop --fsdp (data parallel) or run in one process")
    if cfg.fsdp and world == 1:
        raise UserError("--fsdp shards the model over the processes of torchrun or accelerate launch; "
                        "this is one process: drop --fsdp")  # fmt: skip
    if world > 1 and min(cfg.batch_size, len(data)) < world:
        raise UserError(f"a step's batch holds {min(cfg.batch_size, len(data))} examples (--batch-size {cfg.batch_size}, "
                        f"{len(data)} in the data), fewer than the {world} processes: each needs one")  # fmt: skip
    if main:
        _warn_if_unteachable(data, tokenizer)
    plan = memory_plan(model, data) if memory_plan is not None else None
    if main:
        if not resume and (out / "checkpoint").exists():
            # only the files this tool writes (or wrote: initial.pt, before the tracker was built
            # ahead of the restore) there
            for name in ("state.pt", "initial.pt", "state.tmp"):
                (out / "checkpoint" / name).unlink(missing_ok=True)
    distributed.barrier()  # the other ranks read what rank 0 kept
    sharded = cfg.fsdp
    if sharded:
        model = distributed.shard_model(model, shard_device)  # each rank now holds 1/world of every parameter
        fsdp_info = {**distributed.shard_counts(model), "rank": distributed.rank()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    if defense is not None:
        defense.setup(model)  # at θ*, before any checkpoint is restored
    tracker = None
    traj = out / "trajectory.jsonl"
    if eval_harmful:
        time_scale = cfg.lr if cfg.optimizer == "sgd" else None
        # The tracker's references (θ*, the KL reference) are the model before any step: it is built
        # before a checkpoint is restored.
        tracker = Tracker(
            model,
            tokenizer,
            eval_harmful,
            traj if main else None,  # every rank measures (identical models); rank 0 writes
            template=cfg.template,
            use_chat_template=cfg.use_chat_template,
            every=cfg.track_every,
            refusal_every=cfg.refusal_every,
            kl=cfg.track_kl,
            max_length=cfg.max_length,
            time_scale=time_scale,
            sequence_kl_samples=cfg.track_sequence_kl,
        )
    start = load_checkpoint(out, model, opt, cfg, digest, total) if resume else 0
    if start == 0 and traj.exists() and main:  # a run that died before its first checkpoint starts over
        traj.unlink()
    distributed.barrier()
    if tracker is not None:
        if start:
            tracker.resume_from(start)
        else:
            tracker.log(model, 0, force=True)
    t0 = time.perf_counter()
    t_track = 0.0
    post_hoc = defense is not None and defense.post_hoc
    done = start  # optimiser steps applied to the weights
    status = "completed"
    diverged: str | None = None
    losses: list[float] = []
    last_ckpt = time.monotonic()
    ddp = _data_parallel(model) if world > 1 and not sharded else None
    try:
        model.train()
        for step in progress(range(start, total), desc="finetune", total=total - start):
            indices = data.step_indices(step, cfg.batch_size, cfg.seed)
            if world == 1:
                loss = value = mean_token_loss(model, data.batch(indices))
            else:  # DDP or FSDP: this rank's share; both average the gradients over the ranks
                loss, value = _shard_loss(ddp or model, data, indices, cfg.seed, step)
            if not torch.isfinite(value):
                raise NonFiniteError(f"non-finite fine-tuning loss at step {step}", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP (FSDP): the gradient is averaged (and sharded) over the ranks here
            if cfg.grad_clip:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:  # the norm only (no rescaling pass): the finiteness check below needs it
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not torch.isfinite(distributed.full(gnorm)):
                raise NonFiniteError(f"non-finite gradient at step {step}", step)
            if defense is not None:
                defense.on_gradients(model, step)
                before = _snapshot(model) if defense.wants_update else None
            opt.step()
            done = step + 1
            if defense is not None and defense.wants_update:
                defense.on_update(model, done, before)
            if step_hook is not None:
                step_hook(model, done)
            losses.append(value.item())
            if tracker is not None and not (post_hoc and done == total):
                tt = time.perf_counter()
                tracker.log(model, done, ft_loss=losses[-1], force=done == total)
                t_track += time.perf_counter() - tt
            due = bool(cfg.checkpoint_minutes) and time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes
            if cfg.checkpoint_minutes:
                due = distributed.any_rank(due)  # the ranks' clocks differ: they decide together
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or due:
                if main or sharded:  # FSDP: a collective; rank 0 writes
                    save_checkpoint(out, done, model, opt, cfg, digest)
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:
        status = "interrupted"
        if sharded:  # no collective after an interrupt: the ranks may have stopped at different points
            if main:
                log(f"interrupted: the sharded run resumes from its last checkpoint (step {_checkpoint_step(out)})")
        elif main:
            save_checkpoint(out, done, model, opt, cfg, digest)
    except NonFiniteError as e:
        # The weights may already be non-finite: keep the last good checkpoint on disk as it is.
        status, diverged = "diverged", str(e)
    model.eval()
    if status == "completed" and defense is not None:
        model = defense.finalize(model)
        if tracker is not None and post_hoc:  # the final record is of the post-hoc projected model
            tt = time.perf_counter()
            tracker.log(model, done, ft_loss=losses[-1] if losses else None, force=True)
            t_track += time.perf_counter() - tt
    seconds = time.perf_counter() - t0
    if status == "completed" and (main or sharded):
        save_checkpoint(out, done, model, opt, cfg, digest)
    payload: dict = {
        "status": status,
        **({"diverged": diverged, "resume_from_step": _checkpoint_step(out)} if diverged else {}),
        "steps_done": done,
        "steps_total": total,
        "seconds": round(seconds, 3),
        "seconds_tracking": round(t_track, 3),
        "seconds_training": round(seconds - t_track, 3),
        "n_train": len(data),
        "data_digest": digest,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "final_ft_loss": losses[-1] if losses else None,  # the last finite loss
        "trajectory": tracker.records if tracker else [],
    }
    if world > 1:
        payload["world_size"] = world
        payload["parallel"] = "fsdp" if sharded else "ddp"
        if sharded:
            payload["fsdp"] = fsdp_info
    if plan is not None:
        payload["memory_plan"] = plan
    if defense is not None:
        payload["defense"] = defense.info()
    full_weights, ev = None, None
    if status == "completed" and sharded:  # collectives: every rank gathers and evaluates, rank 0 writes
        if save_model:  # a peft model saves its adapter only: the frozen base is not gathered
            full_weights = distributed.full_state(model, trainable_only=is_peft(model))[0]
        if final_eval and eval_harmful:
            ev = _final_evaluation(model, tokenizer, eval_harmful, eval_benign, cfg, tracker)
    if not main:  # the other ranks only computed; rank 0 saves, evaluates and writes
        if status == "interrupted":
            raise KeyboardInterrupt
        if status == "diverged":
            distributed.barrier()  # rank 0 writes results.json first: torchrun stops every worker once one fails
            raise RunDiverged(f"fine-tuning diverged ({diverged})")
        payload["model"] = model
        return payload
    if status == "completed" and save_model:
        _save_model(model, tokenizer, out / "model", full_weights)
        payload["model_path"] = "model"
    if status == "completed" and final_eval and eval_harmful:
        if ev is None:
            ev = _final_evaluation(model, tokenizer, eval_harmful, eval_benign, cfg, tracker)
        payload["evaluation"] = ev
        payload["summary"] = headline(ev)
    write_results(out, "finetune", payload, command_config or {"finetune": cfg.to_json()})
    if status == "diverged":
        distributed.barrier()  # the other ranks wait for this results.json before they fail
    if status == "interrupted":
        raise KeyboardInterrupt
    if status == "diverged":
        raise RunDiverged(f"fine-tuning diverged ({diverged}); results.json has status 'diverged', the last good "
                          f"checkpoint (step {payload['resume_from_step']}) is kept in {out / 'checkpoint'}")  # fmt: skip
    payload["model"] = model
    return payload


def _final_evaluation(model, tokenizer, eval_harmful, eval_benign, cfg: FinetuneConfig, tracker) -> dict:
    return evaluate_safety(
        model,
        tokenizer,
        eval_harmful,
        eval_benign,
        SafetyEvalConfig(template=cfg.template, use_chat_template=cfg.use_chat_template, max_length=cfg.max_length),
        kl_reference=tracker.kl if tracker else None,
    )


def _data_parallel(model):
    """``model`` under DistributedDataParallel on its own device (this rank's GPU, or the CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _shard_loss(ddp, data: EncodedSet, indices: list[int], seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss to backpropagate, the global batch's mean token NLL) for one data-parallel step.

    The rank's share of the step's batch gives Σ NLL_r over n_r tokens; one all-reduce gives Σ NLL and
    n = Σ n_r. Backpropagating W·Σ NLL_r / n makes DDP's average (1/W)·Σ_r of the gradients equal the
    gradient of Σ NLL / n, the one-process loss."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + distributed.rank())  # dropout: (seed, step, rank)
    share = [indices[i] for i in distributed.contiguous_shard(len(indices))]
    nll, n = sequence_nll(ddp, data.batch(share))
    total = distributed.all_reduce_sum(torch.stack([nll.sum().detach().double(), n.sum().double()]))
    count = total[1].clamp_min(1)
    return nll.sum() * distributed.world_size() / count.to(nll.dtype), total[0] / count


def _checkpoint_step(out: Path) -> int:
    path = _checkpoint_path(out)
    return int(_load_tensors(path)["step"]) if path.exists() else 0


def _warn_if_unteachable(data: EncodedSet, tokenizer) -> None:
    """Warn when most response tokens are the tokenizer's unknown token (nothing to learn from)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    labels = [t for it in data.items for t in it.labels if t != -100]
    if unk is None or not labels:
        return
    frac = sum(1 for t in labels if t == unk) / len(labels)
    if frac > 0.5:
        log(f"warning: {frac:.0%} of the response tokens are the unknown token {tokenizer.unk_token!r}: "
            "the data is mostly outside the tokenizer's vocabulary and teaches little")  # fmt: skip


def _snapshot(model) -> dict[str, torch.Tensor]:
    from collections import OrderedDict

    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad)


def _save_model(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained``; ``state_dict``: the full weights of a sharded model (gathered to rank 0)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(path)
