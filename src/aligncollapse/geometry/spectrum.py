"""Spectrum diagnostics: effective rank, energy counts, tail mass, eigengap, and null references.

All fractions are measured against the *total* trace of the matrix (every eigenvalue, not only the
kept ones), so "90% of the energy" means 90% of tr F.
"""

from __future__ import annotations

import math

import torch

from aligncollapse.errors import UserError


def _sorted(eigs) -> torch.Tensor:
    e = torch.as_tensor(eigs, dtype=torch.float64).flatten().clamp_min(0.0)
    return torch.sort(e, descending=True).values


def energy_count(eigs, level: float, total: float | None = None) -> int:
    """Smallest k with Σ_{j≤k} λ_j ≥ level · total (total defaults to Σ λ)."""
    e = _sorted(eigs)
    tot = float(e.sum()) if total is None else total
    if tot <= 0:
        return 0
    c = torch.cumsum(e, 0) / tot
    hit = torch.nonzero(c >= level - 1e-12)
    return int(hit[0]) + 1 if len(hit) else len(e)


def effective_rank(eigs) -> float:
    """exp of the Shannon entropy of λ/Σλ (Roy & Vetterli 2007)."""
    e = _sorted(eigs)
    s = float(e.sum())
    if s <= 0:
        return 0.0
    p = e[e > 0] / s
    return float(math.exp(-(p * p.log()).sum()))


def choose_d(eigs, rule: str | int = "energy:0.9") -> int:
    """The subspace dimension: an int, ``energy:F`` (fraction F of the trace) or ``eigengap``
    (the largest relative gap λ_j/λ_{j+1} among the leading half of the non-zero spectrum)."""
    e = _sorted(eigs)
    if isinstance(rule, int) or (isinstance(rule, str) and rule.isdigit()):
        return max(1, min(int(rule), len(e)))
    if rule.startswith("energy:"):
        return max(1, energy_count(e, float(rule.split(":", 1)[1])))
    if rule == "eigengap":
        nz = e[e > e[0] * 1e-12]
        m = max(2, len(nz) // 2)
        ratios = nz[: m - 1] / nz[1:m]
        return int(torch.argmax(ratios)) + 1 if len(ratios) else 1
    raise UserError(f"subspace dimension rule must be an integer, 'energy:F' or 'eigengap', got {rule!r}")


def spectrum_stats(
    eigs, d: int | None = None, rank_ceiling: int | None = None, total: float | None = None, keep: int = 256
) -> dict:
    """Sorted eigenvalues (first ``keep``) and the diagnostics the reports use."""
    e = _sorted(eigs)
    tot = float(e.sum()) if total is None else float(total)
    out = {
        "eigenvalues": e[:keep].tolist(),
        "trace": tot,
        "effective_rank": effective_rank(e),
        "energy_90": energy_count(e, 0.90, tot),
        "energy_95": energy_count(e, 0.95, tot),
        "energy_99": energy_count(e, 0.99, tot),
        "n_nonzero": int((e > (e[0] * 1e-10 if len(e) else 0)).sum()) if len(e) else 0,
        "rank_ceiling": rank_ceiling,
    }
    if d is not None and len(e):
        d = min(d, len(e))
        out["d"] = d
        out["lambda_d"] = float(e[d - 1])
        out["tail_mass"] = max(0.0, tot - float(e[:d].sum()))
        out["tail_fraction"] = out["tail_mass"] / tot if tot > 0 else 0.0
        out["eigengap"] = float(e[d - 1] - e[d]) if d < len(e) else float(e[d - 1])
    return out


def wishart_null_gram(norms: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Gram matrix (1/N)·G Gᵀ of N random directions in ℝⁿ with the given norms (the flat-geometry
    null model of Thm 4.1): an exact Wishart draw by the Bartlett decomposition, O(N²)."""
    N = len(norms)
    g = torch.Generator().manual_seed(seed)
    L = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        dof = max(n - i, 1)
        L[i, i] = _chi(dof, g)
        L[i, :i] = torch.randn(i, generator=g, dtype=torch.float64)
    W = L @ L.T  # ~ Wishart(n, I_N): rows are Gaussian vectors in ℝⁿ (rotation-invariant)
    dn = W.diagonal().sqrt()
    S = W / dn[:, None] / dn[None, :]  # unit directions
    nr = norms.to(torch.float64)
    return nr[:, None] * S * nr[None, :] / N


def _chi(dof: int, g: torch.Generator) -> torch.Tensor:
    """A χ_dof draw (square root of a χ² draw) from a seeded generator (sum of squares when small,
    Wilson-Hilferty normal approximation when large)."""
    if dof <= 200:
        return torch.randn(dof, generator=g, dtype=torch.float64).pow(2).sum().sqrt()
    z = torch.randn(1, generator=g, dtype=torch.float64)[0]
    a = 2.0 / (9.0 * dof)
    return (dof * (1 - a + z * math.sqrt(a)) ** 3).clamp_min(0).sqrt()
