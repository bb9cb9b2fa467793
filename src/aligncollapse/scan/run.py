"""The pre-flight scan: AIC, forecast and verdict, with the safety subspace saved under ``out_dir/subspace``.

Never modifies the model. The report is rendered from the results by :mod:`aligncollapse.reporting`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligncollapse.distributed import is_main, world_size
from aligncollapse.geometry.subspace import SafetySubspace
from aligncollapse.scan.aic import ScanSettings, measure_aic


def run_scan(model, tokenizer, safety, finetune, out_dir: str | Path, s: ScanSettings, label: str = "") -> dict:
    """Measure and save the subspace. Under torchrun every rank measures (the operators split their
    batches and all-reduce); only rank 0 writes."""
    out = Path(out_dir)
    res = measure_aic(model, tokenizer, safety, finetune, s)
    basis = res.pop("basis")
    res.pop("update_vectors", None)
    res["label"] = label
    res["world_size"] = world_size()
    if not is_main():
        return res
    if basis is None:  # the sample-space scan holds no n × d basis
        res["subspace_path"] = None
        res["subspace_note"] = (
            "not saved by the sample-space scan (no n × d basis is formed); `aligncollapse fisher` saves one"
        )
        return res
    params = s.blocks.select(model)
    SafetySubspace(
        torch.tensor(res["eigenvalues"][: res["d"]], dtype=torch.float64), basis, list(params), [tuple(p.shape) for p in params.values()],
        "sampled", res["trace"], res["n_safety"], {"source": "scan", "fisher": res["fisher"]},
    ).save(out / "subspace")  # fmt: skip
    res["subspace_path"] = "subspace"
    return res
