"""`aligncollapse finetune`: fine-tuning with the trajectory tracker, checkpoints, resume and defenses."""

from __future__ import annotations

from aligncollapse.cli.args import defense_spec, memory_size, nonneg_int, positive_float, positive_int, seed
from aligncollapse.cli.common import (
    add_data_args,
    add_eval_data_args,
    add_lora_args,
    add_model_args,
    config,
    eval_sets,
    finish,
    memory_limit,
    out_dir,
    print_table,
    safety_set,
    training_data,
    unaligned_model,
    use_chat,
)
from aligncollapse.errors import UserError


def register(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune with trajectory tracking, checkpoints and resume")
    add_model_args(f)
    add_eval_data_args(f)
    add_lora_args(f)
    f.add_argument("--data", required=True, help="training data file / HF dataset, or an organism suite set name")
    f.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    f.add_argument("--lr", type=positive_float, default=5e-4)
    budget = f.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimiser steps (default 40)")
    budget.add_argument("--epochs", type=positive_float, help="epochs instead of steps")
    f.add_argument("--batch-size", type=positive_int, default=16)
    f.add_argument("--seed", type=seed, default=0)
    f.add_argument("--track-every", type=positive_int, default=5, help="record alignment losses every K steps")
    f.add_argument("--refusal-every", type=nonneg_int, default=20, help="record refusal rate every M steps")
    f.add_argument("--track-sequence-kl", type=nonneg_int, default=0, metavar="S",
                   help="also track Lemma 3.2's sequence-level KL with S sampled responses per prompt (0: off)")  # fmt: skip
    f.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=25,
        help="save a checkpoint every C steps (default 25; 0: only at the end)",
    )
    f.add_argument("--no-resume", action="store_true", help="start over even if --out has a checkpoint")
    f.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard weights, gradients and optimiser state over the "
                   "processes (FSDP2, one unit per transformer block) instead of replicating them (DDP)")  # fmt: skip
    f.add_argument("--defense", type=defense_spec, help="project-static, project-tracking, curvature, ogd, ogd-lookahead, fisher-penalty, "
                   "safe-lora or mix-safety; options as NAME:key=value,... (e.g. curvature:memory=4)")  # fmt: skip
    f.add_argument("--safety", help="safety set the defense uses (harmful prompts + refusals); default: the organism's")
    f.add_argument("--base-model", help="the unaligned base model (safe-lora); default: the organism's")
    f.add_argument("--max-memory", type=memory_size, default="auto",
                   help="stop before training when the memory plan exceeds this (e.g. 16GB; auto: what the device "
                   "offers)")  # fmt: skip
    f.add_argument("--out")
    add_data_args(f, "--data")
    f.set_defaults(func=run)


def run(args) -> int:
    from aligncollapse import distributed
    from aligncollapse.models import LoraSettings, load_model
    from aligncollapse.training.finetune import FinetuneConfig, finetune

    if args.fsdp and not distributed.is_distributed():  # before the model is loaded whole onto one device
        raise UserError("--fsdp shards the model over the processes of torchrun or accelerate launch; "
                        "this is one process: drop --fsdp")  # fmt: skip
    if args.defense and args.fsdp:
        raise UserError("--defense does not run with --fsdp yet: drop --fsdp (data parallel) or run in one process")
    # --fsdp: the model is loaded on the host and moves to the device one shard at a time (it need not
    # fit one device whole)
    sharded = args.fsdp and distributed.is_distributed()
    model, tok = load_model(args.model, dtype=args.dtype, device="cpu" if sharded else args.device)
    train = training_data(args.data, args)
    harmful, benign = eval_sets(args, model, tok)
    lora = None
    if args.lora:
        lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","))
    cfg = FinetuneConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        steps=None if args.epochs is not None and args.steps is None else (args.steps or 40),
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        template=args.template,
        use_chat_template=use_chat(args),
        track_every=args.track_every,
        refusal_every=args.refusal_every,
        checkpoint_every=args.checkpoint_every,
        track_sequence_kl=args.track_sequence_kl,
        lora=lora,
        fsdp=args.fsdp,
    )
    out = out_dir(args, "finetune")
    defense = None
    if args.defense:
        from aligncollapse.defenses import DefenseContext, make_defense
        from aligncollapse.predict.overlap import state_of

        unaligned = unaligned_model(args)
        dctx = DefenseContext(tok, safety_set(args, model, tok), args.template, use_chat(args), seed=args.seed,
                              unaligned_state=state_of(unaligned, [n for n, _ in unaligned.named_parameters()]) if unaligned else None)  # fmt: skip
        defense = make_defense(args.defense, dctx)
    res = finetune(
        model,
        tok,
        train,
        out,
        cfg,
        eval_harmful=harmful,
        eval_benign=benign,
        resume=not args.no_resume,
        command_config={"args": config(args), "finetune": cfg.to_json()},
        defense=defense,
        memory_plan=memory_planner(
            cfg,
            defense,
            harmful,
            *memory_limit(args.max_memory, args.device if sharded else next(model.parameters()).device),
            device=args.device if sharded else None,
        ),
        shard_device=args.device if sharded else None,
    )
    if not distributed.is_main():  # under torchrun the other ranks only compute
        return 0
    page = finish(out)
    print_table(f"fine-tuned {res['steps_done']} steps -> {page}", {args.data: res.get("summary", {})})
    return 0


def memory_planner(cfg, defense, eval_harmful, limit: int | None, flag: str | None = None, device: str | None = None):
    """``finetune``'s ``memory_plan`` hook: the plan of :func:`aligncollapse.geometry.memory.finetune_memory_plan`
    with the defense's terms, logged one line per stage and checked against ``limit`` bytes. ``device``:
    where the model will run when it is not there yet (``--fsdp`` loads it on the host first)."""

    def plan(model, data) -> dict:
        from collections import OrderedDict

        import torch

        from aligncollapse import distributed
        from aligncollapse.geometry.memory import finetune_memory_plan, log_and_check, model_shape, runtime_bytes

        params = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        shape = model_shape(model, params)
        seq = max(len(it.input_ids) for it in data.items)
        terms = defense.memory_terms(model, shape, seq) if defense is not None else None
        accelerator = torch.device(device or next(model.parameters()).device).type != "cpu"
        shards, block, root = 1, 0, 0
        if cfg.fsdp and distributed.world_size() > 1:
            blocks = distributed.fsdp_blocks(model)
            shards, block = distributed.world_size(), max(sum(p.numel() for p in m.parameters()) for m in blocks)
            root = shape.n_total - sum(p.numel() for m in blocks for p in m.parameters())
        p = finetune_memory_plan(
            shape, batch_size=min(cfg.batch_size, len(data)), seq_len=seq, optimizer=cfg.optimizer,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, snapshot=bool(defense and defense.wants_update),
            eval_tokens=33 * len(eval_harmful or []), defense=terms,
            accelerator=accelerator, shards=shards, block_numel=block, root_numel=root,
            ddp=distributed.world_size() > 1 and shards == 1,
        )  # fmt: skip
        p["runtime_bytes"] = 0 if accelerator else runtime_bytes(model)  # host memory is not the device's
        return log_and_check(p, limit, flag, hint="--lora, a smaller --batch-size, or the defense's samples=, "
                             "first_layer=, last_layer= or modules= options")  # fmt: skip

    return plan
