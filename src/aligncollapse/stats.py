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


def rank_correlations(x: Sequence[float], y: Sequence[float], log_x: bool | None = None) -> dict[str, float | None]:
    """Spearman, Kendall and Pearson between x and y (None when either is constant).

    Pearson is taken on log10 x when every x is positive (``log_x`` None) — harm predictors span
    orders of magnitude and a raw Pearson would be one outlier's.
    """
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": None, "kendall": None, "pearson": None}
    use_log = bool(np.all(x > 0)) if log_x is None else log_x
    xp = np.log10(x) if use_log else x
    return {
        "spearman": float(stats.spearmanr(x, y).statistic),
        "kendall": float(stats.kendalltau(x, y).statistic),
        "pearson": float(stats.pearsonr(xp, y).statistic) if np.ptp(xp) > 0 else None,
        "pearson_on": "log10 predictor" if use_log else "predictor",
    }
