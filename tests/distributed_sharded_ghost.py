"""Worker for tests/test_distributed.py: factored per-example gradients of a model sharded with FSDP2
(``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_sharded_ghost.py MODEL OUT``).

Every rank loads the model twice, shards one copy over the ranks (one FSDP unit per decoder layer and
the root) and keeps the other whole, and collects the same examples' factors on both: the Gram of the
per-example gradients (every selected parameter: embeddings, attention, MLP, norm gains, head) from the
sharded copy must equal the whole copy's. Each rank saves both Grams to OUT/gram{rank}.pt.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch

from aligncollapse import distributed
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.geometry.ghost import GhostGradients
from aligncollapse.models import load_model
from aligncollapse.scan.sample_space import _nll_batches
from conftest import micro_examples  # the tests directory is on PYTHONPATH (test_distributed sets it)


def gram(model, data: EncodedSet) -> torch.Tensor:
    params = OrderedDict(model.named_parameters())
    ghost = GhostGradients(model, params)
    f = ghost.collect(_nll_batches(data, 4, "cpu"), count=len(data))  # the scan's own per-example NLL batches
    return ghost.gram(f, f)


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    whole, tok = load_model(model_dir, dtype="float64")
    sharded, _ = load_model(model_dir, dtype="float64")
    distributed.shard_model(sharded)
    data = EncodedSet(tok, micro_examples())
    out = {"world_size": distributed.world_size(), "units": distributed.shard_counts(sharded)["units"],
           "local": distributed.shard_counts(sharded)["parameters_on_this_rank"],
           "whole": gram(whole, data), "sharded": gram(sharded, data)}  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(out_dir) / f"gram{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
