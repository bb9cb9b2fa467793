"""Bootstrap confidence intervals and rank correlations used by every report."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float | None]:
    """Percentile bootstrap: ``{"value", "ci_low", "ci_high", "n"}`` (CI is None for n < 2)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    value = float(statistic(x))
    if n < 2:
        return {"value": value, "ci_low": None, "ci_high": None, "n": n}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = np.array([statistic(x[i]) for i in idx])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "n": n}


def rate_with_ci(flags: Sequence[bool], seed: int = 0) -> dict[str, float | None]:
    """A rate (fraction of True) with its bootstrap 95% CI."""
    return bootstrap_ci([float(f) for f in flags], seed=seed)
