"""Worker for tests/test_distributed.py: the curvature products of the micro model, one process or
under torchrun (``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_products.py MODEL OUT``).

Rank 0 saves the products to OUT/products.pt; every rank saves the batch starts it handled to
OUT/shard{rank}.pt, so the test can check that the work really was split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from aligncollapse import distributed
from aligncollapse.data.encoding import EncodedSet
from aligncollapse.geometry.curvature import FinetuneLoss, FisherOperator, GGNOperator, HessianOperator, top_eigenpairs
from aligncollapse.models import BlockSelection, load_model
from conftest import micro_examples  # the tests directory is on PYTHONPATH (test_distributed sets it)


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    model, tok = load_model(model_dir, dtype="float64")
    data = EncodedSet(tok, micro_examples())
    params = BlockSelection(patterns=[r"layers\.0\.(self_attn|mlp)\."]).select(model)
    ggn = GGNOperator(model, params, data, batch_size=4, per="sequence")
    v = torch.randn(ggn.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, g = FinetuneLoss(model, params, data, batch_size=4).value_and_grad()
    out = {
        "world_size": distributed.world_size(),
        "loss": loss,
        "g": g,
        "Hg": HessianOperator(model, params, data, batch_size=4).matvec(g),
        "ggn_v": ggn.matvec(v),
        "fisher_v": FisherOperator(model, params, data, batch_size=4).matvec(v),
        "expansion": ggn.expansion_forms(g, v),
    }
    out["eigenvalues"], out["eigenvectors"] = top_eigenpairs(ggn, k=3, seed=0)
    starts = distributed.shard(list(range(0, len(data), 4)))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(starts, Path(out_dir) / f"shard{distributed.rank()}.pt")
    if distributed.is_main():
        torch.save(out, Path(out_dir) / "products.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
