"""Several processes (``torchrun``) sharing one computation through ``torch.distributed``.

The geometry operators split their batches round-robin over ranks (:func:`shard`) and sum the
accumulated products with :func:`all_reduce_sum`, so every rank ends with the same numbers. Without
an initialised process group (or with one process) every helper is the identity: single-process runs
are unchanged. ``init_from_env`` reads torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
and picks gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
    """
    if not launched_by_torchrun() or not dist.is_available():
        return is_distributed()
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    return is_distributed()


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
    if is_distributed():
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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: a decision (stop, checkpoint now) taken by
    all ranks together, so that none waits in a collective the others skipped."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
