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


def _avg_ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def permutation_test_spearman(
    x: Sequence[float], y: Sequence[float], *, exact_max_n: int = 9, n_perm: int = 100_000, seed: int = 0
) -> dict:
    """Permutation p-values of Spearman's ρ between x and y (ties by average ranks).

    The null: y's ranks are exchangeable across the units (sets). For n ≤ ``exact_max_n`` every
    one of the n! permutations is enumerated (exact p); beyond, ``n_perm`` seeded random
    permutations give p = (1 + #{ρ_π ≥ ρ}) / (1 + n_perm) (a valid p-value, resolution 1/n_perm).
    Returns ρ, the two-sided p (|ρ_π| ≥ |ρ|), the one-sided p for a positive association
    (ρ_π ≥ ρ), the method and the number of permutations.
    """
    import itertools
    import math

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": None, "p_two_sided": None, "p_greater": None, "method": None, "n": int(n)}
    rx, ry = _avg_ranks(x), _avg_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    rho = float(rx @ ry) / denom
    eps = 1e-12  # ρ_π equal to ρ up to rounding counts as "at least as extreme"
    if n <= exact_max_n:
        ge = ge_abs = total = 0
        for chunk in _chunks(itertools.permutations(range(n)), 50_000):
            vals = (ry[np.array(chunk)] @ rx) / denom
            ge += int((vals >= rho - eps).sum())
            ge_abs += int((np.abs(vals) >= abs(rho) - eps).sum())
            total += len(chunk)
        assert total == math.factorial(n)
        return {"spearman": rho, "p_two_sided": ge_abs / total, "p_greater": ge / total, "method": "exact",
                "n_permutations": total, "n": int(n)}  # fmt: skip
    rng = np.random.default_rng(seed)
    ge = ge_abs = 0
    for s in range(0, n_perm, 20_000):
        k = min(20_000, n_perm - s)
        perms = np.argsort(rng.random((k, n)), axis=1)
        vals = (ry[perms] @ rx) / denom
        ge += int((vals >= rho - eps).sum())
        ge_abs += int((np.abs(vals) >= abs(rho) - eps).sum())
    return {"spearman": rho, "p_two_sided": (1 + ge_abs) / (1 + n_perm), "p_greater": (1 + ge) / (1 + n_perm),
            "method": "monte_carlo", "n_permutations": n_perm, "n": int(n)}  # fmt: skip


def _chunks(it, size: int):
    buf = []
    for item in it:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); None stays None and
    does not count toward the number of tests."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m = len(items)
    out: dict[str, float | None] = {k: None for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def leave_one_out_spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman ρ with each unit (set) left out in turn: the values, their min and max."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    vals = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        xi, yi = x[keep], y[keep]
        ok = np.isfinite(xi) & np.isfinite(yi)
        if ok.sum() < 3 or np.ptp(xi[ok]) == 0 or np.ptp(yi[ok]) == 0:
            vals.append(None)
        else:
            vals.append(float(stats.spearmanr(xi[ok], yi[ok]).statistic))
    real = [v for v in vals if v is not None]
    return {"values": vals, "min": min(real) if real else None, "max": max(real) if real else None}


def rank_correlations_batch(X: np.ndarray, Y: np.ndarray, log_x: bool = False) -> dict[str, np.ndarray]:
    """Spearman, Kendall (τ-b) and Pearson for every row pair of X, Y ([B, n] each), vectorised.

    The same values as :func:`rank_correlations` row by row (ties by average ranks; τ-b from the
    signs of all pairs), NaN where a row is constant. Pearson is on log10 X when ``log_x``."""
    from scipy.stats import rankdata

    X, Y = np.atleast_2d(np.asarray(X, float)), np.atleast_2d(np.asarray(Y, float))

    def pearson(a, b):
        a = a - a.mean(1, keepdims=True)
        b = b - b.mean(1, keepdims=True)
        den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)

    sp = pearson(rankdata(X, axis=1), rankdata(Y, axis=1))
    i, j = np.triu_indices(X.shape[1], 1)
    sx, sy = np.sign(X[:, i] - X[:, j]), np.sign(Y[:, i] - Y[:, j])
    den = np.sqrt((sx * sx).sum(1) * (sy * sy).sum(1))
    kt = np.where(den > 0, (sx * sy).sum(1) / np.where(den > 0, den, 1.0), np.nan)
    pe = pearson(np.log10(X) if log_x else X, Y)
    return {"spearman": sp, "kendall": kt, "pearson": pe}
