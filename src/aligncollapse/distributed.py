"""Several processes (``torchrun``) sharing one computation through ``torch.distributed``.

The geometry operators split their batches round-robin over ranks (:func:`shard`) and sum the
accumulated products with :func:`all_reduce_sum`, so every rank ends with the same numbers. Without
an initialised process group (or with one process) every helper is the identity: single-process runs
are unchanged. ``init_from_env`` reads torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
and picks gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


_SOLO = 0  # > 0 inside solo(): this process computes alone


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (and outside :func:`solo`)."""
    return not _SOLO and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed or inside :func:`solo`)."""
    return dist.get_rank() if not _SOLO and dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed or inside :func:`solo`)."""
    return dist.get_world_size() if not _SOLO and dist.is_available() and dist.is_initialized() else 1


@contextmanager
def solo() -> Iterator[None]:
    """Within it this process computes alone, as a one-process run: every helper here is the identity
    (no sharding, no collective) and :func:`is_main` is true. For work split over ranks by whole
    units (``rank`` scores different candidates on different ranks), where the per-unit code must
    not wait in collectives the other ranks never join. Each rank then writes only its own units'
    files."""
    global _SOLO
    _SOLO += 1
    try:
        yield
    finally:
        _SOLO -= 1


def is_main() -> bool:
    """Rank 0: the process that writes outputs and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun (``torch.distributed.run``) sets WORLD_SIZE and RANK for every worker."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Backend: nccl when ``device`` is a CUDA device, gloo otherwise. On CUDA each rank is pinned to
    ``cuda:LOCAL_RANK``. Returns True when a group of more than one process is (now) active; does
    nothing outside torchrun or when a group already exists.

    Collectives time out after ``ALIGNCOLLAPSE_DIST_TIMEOUT_MINUTES`` (default 720): commands that
    deal whole units to the ranks (``rank``, ``study``) wait at a barrier for the slowest rank's
    share, which can be several fine-tuning runs, far beyond torch's default 10 minutes on nccl.
    """
    if not launched_by_torchrun() or not dist.is_available():
        return is_distributed()
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from datetime import timedelta

        minutes = os.environ.get("ALIGNCOLLAPSE_DIST_TIMEOUT_MINUTES", "720")
        try:
            timeout = timedelta(minutes=float(minutes))
        except ValueError:
            from aligncollapse.errors import UserError

            raise UserError(
                f"ALIGNCOLLAPSE_DIST_TIMEOUT_MINUTES must be a number of minutes, got {minutes!r}"
            ) from None
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
        global _FINISH
        if dist.get_world_size() > 1:  # for finish_together: gloo, so that its wait is bounded on any backend
            _FINISH = dist.new_group(backend="gloo", timeout=timedelta(minutes=FINISH_MINUTES))
    return is_distributed()


_FINISH = None
FINISH_MINUTES = 30


def finish_together() -> None:
    """Wait until every rank has finished its command (after a success), at most ``FINISH_MINUTES``:
    the other ranks return while rank 0 still writes, and one that tore its process group down
    meanwhile sometimes aborted at exit (std::terminate in gloo, about 1 in 3 sharded scans on 2 CPU
    processes). Bounded so that a rank 0 that failed while writing cannot keep them waiting; a
    failed wait is not an error of the command (its results are complete)."""
    if _FINISH is None or not is_distributed():
        return
    try:
        dist.barrier(group=_FINISH)
    except RuntimeError:
        pass


def local_device(device: str) -> str:
    """Under torchrun on CUDA, ``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``)."""
    if is_distributed() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(indices: Sequence[T]) -> list[T]:
    """This rank's round-robin share of ``indices`` (all of them when not distributed)."""
    items = list(indices)
    if not is_distributed():
        return items
    return items[rank() :: world_size()]


def contiguous_shard(count: int) -> range:
    """This rank's contiguous block of ``range(count)`` (ranks in order cover it; all of it when not
    distributed). Gathering per-rank results in rank order then restores the original order."""
    r, w = rank(), world_size()
    return range(count * r // w, count * (r + 1) // w)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (row counts may differ; the
    trailing shape and dtype must agree). Memory: world_size × the largest block, transiently."""
    if not is_distributed():
        return tensor
    home, dev = tensor.device, _comm_device(tensor.device)
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    rows = [int(x) for x in sizes]
    padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    del padded
    return torch.cat([p[:k] for p, k in zip(parts, rows)]).to(home)


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, in place (the identity when not distributed): for results
    that feed a discrete choice (a rank cut, d), which must not differ between ranks by rounding."""
    return _broadcast(tensor) if is_distributed() else tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank of the default group, in place (through the backend's device)."""
    dev = _comm_device(tensor.device)
    work = tensor if dev == tensor.device else tensor.to(dev)
    dist.broadcast(work, src=0)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def _comm_device(device: torch.device) -> torch.device:
    """Where a collective can run: nccl needs CUDA tensors (this rank's GPU); gloo takes CPU ones."""
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (the identity when not distributed).

    Every rank must call it the same number of times, in the same order, with the same shape."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    """Destroy the default process group, if any (the end of a torchrun worker)."""
    global _FINISH
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the finish group too
    _FINISH = None


def barrier() -> None:
    """Wait for every rank (nothing when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's picklable ``obj`` on every rank (the identity when not distributed): e.g. the output
    directory rank 0 resolved, so that every rank reads the same checkpoints."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: a decision (stop, checkpoint now) taken by
    all ranks together, so that none waits in a collective the others skipped."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --- FSDP (fully sharded data parallel): models whose weights, gradients and optimiser state do not
# fit one device. Each rank holds 1/W of every parameter (a DTensor shard); a decoder layer's full
# weights exist only while that layer runs (an all-gather before, freed after).


def shard_model(model, device: str | torch.device | None = None):
    """``model`` sharded in place with FSDP2 (:func:`torch.distributed.fsdp.fully_shard`): one FSDP unit
    per transformer block (the classes the model names in ``_no_split_modules``, as transformers and
    accelerate wrap them), then the root (embeddings, final norm, head). Gradients are reduce-scattered
    as the average over ranks, as DDP averages them. Returns the model (a peft wrapper stays a plain module around the sharded one).

    Memory per rank: (W + n·b + optimiser state)/world + the largest block's full weights twice (the
    block that runs and the next one, prefetched) + the activations of this rank's share of a batch.

    ``device``: where the shards live (this rank's GPU for ``cuda``); default the model's device. A
    model loaded on the host moves there one unit at a time, so it need not fit the device whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (world_size(),))
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh)
    # The root unit is the transformers model itself, also inside a peft wrapper: peft's generate calls
    # the inner model directly, past the wrapper's own forward (and an FSDP root's hooks there). It
    # reshards after every forward: FSDP2 keeps a root whole after a forward with no backward (the
    # tracker's and the evaluation's), and its parameters would then not be the optimiser's shards.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    return model


def shard_counts(model) -> dict:
    """How a sharded model is spread: its FSDP units, its parameters, and those this rank holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "parameters": sum(p.numel() for p in params),
        "parameters_on_this_rank": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
    }


def fsdp_blocks(model) -> list:
    """The modules :func:`shard_model` makes FSDP units of: the transformer blocks, by the class names
    in the model's (or a wrapped model's) ``_no_split_modules``."""
    names: set[str] = set()
    for mod in model.modules():
        names |= set(getattr(mod, "_no_split_modules", None) or [])
    # (a block already sharded is of class FSDP<name>, which FSDP2 derives from the block's own)
    blocks = [m for m in model.modules() if type(m).__name__.removeprefix("FSDP") in names]
    if not blocks:
        from aligncollapse.errors import UserError

        raise UserError(
            f"--fsdp: {type(model).__name__} names no transformer block class (_no_split_modules) to shard by"
        )
    return blocks


def is_sharded(model) -> bool:
    """True for a model sharded by :func:`shard_model` (its forward is a collective: every rank runs it)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full(tensor):
    """A DTensor's full value (a collective on sharded or partial placements); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model, opt=None, trainable_only: bool = False) -> tuple[dict, dict | None]:
    """(parameters, optimiser state) of a sharded model as full tensors on rank 0's host, keyed by
    parameter name; other ranks get empty dicts. A collective: every rank must call it.
    ``trainable_only``: the frozen parameters (a LoRA base model) are not gathered. Memory on rank 0:
    the full tensors gathered, in host memory."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if state:  # tied parameters (a tied LM head) come back as copies: share them again, as the model does
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name in state and first[id(p)] in state:
                state[name] = state[first[id(p)]]
            first.setdefault(id(p), name)
    optim = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    return state, optim


def set_full_state(model, params: dict, opt=None, optim: dict | None = None) -> None:
    """Load full tensors (every rank passes the same ones, e.g. memory-mapped from one checkpoint)
    into a sharded model and its optimiser; each rank keeps its own shard (sliced locally, no
    communication). ``params`` may name only some parameters (the trainable ones); ``optim`` is
    :func:`full_state`'s optimiser state (keyed by parameter name). Raises KeyError, ValueError or
    RuntimeError when they do not fit the model."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(_shard_like(value, named[name]))
    if opt is None or optim is None:
        return
    name_of = {id(p): n for n, p in named.items()}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    current = opt.state_dict()
    state = {}
    for i, name in enumerate(order):
        if name in optim["state"]:
            state[i] = {k: _shard_like(v, named[name]) if _is_param_shaped(v, named[name]) else v
                        for k, v in optim["state"][name].items()}  # fmt: skip
    if len(optim["param_groups"]) != len(current["param_groups"]):
        raise ValueError("the optimiser has another number of parameter groups")
    groups = [{**saved, "params": now["params"]} for saved, now in zip(optim["param_groups"], current["param_groups"])]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _is_param_shaped(value, param) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape)


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) placed as ``like`` is: this rank's shard of it for a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        local = value.to(like.to_local().device, like.dtype)
        return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
    return value.to(like.device, like.dtype)


class ShardLayout:
    """Where this rank's part of each selected parameter of an FSDP2-sharded model sits.

    FSDP2 shards every parameter along dim 0 (``Shard(0)``, torch.chunk's split: rank r holds rows
    [r·c, min((r + 1)·c, d₀)) with c = ⌈d₀/W⌉), so this rank's part of a parameter is a contiguous range
    of its flattened full value. An n-vector over the selection is held as the concatenation of
    these local parts (``numel`` numbers, about n/W); every inner product is the local one summed over
    the ranks (:meth:`sum`). Used by the curvature operators and the factored gradients of a sharded
    model (:func:`layout_of` gives ``None`` for a whole one). Collectives here go to the default
    process group even inside :func:`solo`: the sharded scan runs every batch on every rank (an FSDP
    forward is itself a collective) and communicates only through FSDP and these sums."""

    def __init__(self, params):
        self.rows: dict[str, tuple[int, int]] = {}
        self.local: dict[str, torch.Tensor] = {}
        self.full_shape: dict[str, torch.Size] = {}
        from torch.distributed.tensor import DTensor, Shard

        for name, p in params.items():
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                raise RuntimeError(f"parameter {name} is not sharded along dim 0 over one mesh dimension (FSDP2)")
            loc = p.to_local()
            d0 = p.shape[0]
            mesh = p.device_mesh
            r0 = min(_chunk_start(d0, mesh.get_local_rank(), mesh.size()), d0)
            r1 = r0 + loc.shape[0]
            if tuple(loc.shape[1:]) != tuple(p.shape[1:]) or r1 > d0:
                raise RuntimeError(
                    f"parameter {name}: local shard {tuple(loc.shape)} is not a dim-0 slice of {tuple(p.shape)}"
                )
            self.rows[name], self.local[name], self.full_shape[name] = (r0, r1), loc, p.shape
        self.numel = sum(t.numel() for t in self.local.values())

    def cols(self, name: str) -> tuple[int, int]:
        """This rank's range of the parameter's flattened full value."""
        r0, r1 = self.rows[name]
        per_row = max(1, int(torch.Size(self.full_shape[name][1:]).numel()))
        return r0 * per_row, r1 * per_row

    @staticmethod
    def sum(t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (the default group, also inside :func:`solo`)."""
        if _grouped():
            dev = _comm_device(t.device)
            work = t if dev == t.device else t.to(dev)
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            if work is not t:
                t.copy_(work)
        return t

    @staticmethod
    def broadcast(t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank, in place (for results that feed a discrete choice)."""
        return _broadcast(t) if _grouped() else t

    @staticmethod
    def broadcast_object(obj):
        """Rank 0's picklable ``obj`` on every rank (the default group, also inside :func:`solo`)."""
        if _grouped():
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return obj


def _grouped() -> bool:
    """A default group of more than one process exists (whether or not inside :func:`solo`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _chunk_start(d0: int, r: int, w: int) -> int:
    return r * -(-d0 // w)


def layout_of(params) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``params`` when any of them is an FSDP2 shard (a DTensor), else None."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params.values()):
        return None
    return ShardLayout(params)
