"""aligncollapse: predict, explain and defend against safety collapse under fine-tuning.

The pipeline, one subpackage per stage (imports point one way, left to right)::

    data -> models -> evaluation -> training -> organism -> geometry -> scan -> predict -> defenses -> reporting -> cli

The names most users need are importable from the top level (loaded on first use, so
``import aligncollapse`` stays cheap)::

    from aligncollapse import load_model, load_examples, ScanSettings, run_scan
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "Example": "aligncollapse.data",
    "load_examples": "aligncollapse.data",
    "load_model": "aligncollapse.models",
    "BlockSelection": "aligncollapse.models",
    "LoraSettings": "aligncollapse.models",
    "evaluate_safety": "aligncollapse.evaluation",
    "KLReference": "aligncollapse.evaluation",
    "FinetuneConfig": "aligncollapse.training",
    "finetune": "aligncollapse.training",
    "build_organism": "aligncollapse.organism",
    "OrganismConfig": "aligncollapse.organism",
    "exact_fisher": "aligncollapse.geometry",
    "SafetySubspace": "aligncollapse.geometry",
    "ScanSettings": "aligncollapse.scan",
    "measure_aic": "aligncollapse.scan",
    "run_scan": "aligncollapse.scan",
    "run_validate": "aligncollapse.scan",
    "run_rank": "aligncollapse.predict",
    "build_context": "aligncollapse.predict",
    "make_defense": "aligncollapse.defenses",
    "render": "aligncollapse.reporting",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'aligncollapse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
