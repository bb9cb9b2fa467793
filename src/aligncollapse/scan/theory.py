"""Exact checks of the theory on synthetic problems where F, g and H are known (``aligncollapse theory``).

Problem: θ ∈ ℝⁿ, θ* = 0. Alignment loss Δu(θ) = ½ θᵀ F θ with F = Q diag(λ) Qᵀ (d sharp
eigenvalues, an optional small tail). Fine-tuning loss L(θ) = ½ (θ − θ_ft)ᵀ A (θ − θ_ft), so
g = ∇L(θ*) = −A θ_ft and H = A. Gradient flow θ̇ = −∇L has the exact solution
θ(t) = −t φ(tA) g with φ(x) = (1 − e^{−x})/x (computed in A's eigenbasis), and its expansion
θ(t) = −t g + (t²/2) H g − … (paper §5.1). We build g with a chosen initial overlap ε = ‖P g‖ and
A with a chosen coupling γ = ‖F^{1/2} P H g‖, then check:

* the early-time log-log exponent of Δu(t): → 4 when ε = 0, → 2 when the first-order term dominates;
* the early-time coefficient Δu/t⁴ against γ²/8 (Cor 6.3 with ε = 0) — within 5%;
* Thm 6.2's drift bound ‖F^{1/2}PΔθ(t)‖ ≥ (γ/2)t² − √λ_max ε t − C′t³ with the explicit constant
  C′ = √λ_max ‖A‖² ‖g‖ e^{‖A‖t₀}/6 for this problem, at every simulated time t ≤ t₀;
* App B: with a rotating Fisher F(θ) = R(θ) F R(θ)ᵀ, the Davis–Kahan bound
  ‖P(θ) − P(θ*)‖ ≤ 2 L_F ‖θ − θ*‖/Λ (L_F measured along the path) and eq 13's drift bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.linalg import expm


@dataclass
class Regime:
    name: str
    eps: float  # ‖P g‖ (initial overlap with M)
    gamma_scale: float = 1.0  # coupling strength
    tail: float = 0.0  # tail eigenvalue of F (AIC property 1's tail mass / (n − d))
    rotation: float = 0.0  # App B: rotation rate of F's eigenbasis along θ
    n: int = 40
    d: int = 4
    seed: int = 0


def _orthonormal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def build_problem(r: Regime) -> dict:
    rng = np.random.default_rng(r.seed)
    Q = _orthonormal(r.n, rng)
    lam = np.concatenate([np.linspace(10.0, 5.0, r.d), np.full(r.n - r.d, r.tail)])
    F = Q @ np.diag(lam) @ Q.T
    B, Bp = Q[:, : r.d], Q[:, r.d :]
    # g: unit-norm component outside M plus ε inside M.
    g_perp = Bp @ rng.standard_normal(r.n - r.d)
    g_perp /= np.linalg.norm(g_perp)
    g_in = B @ rng.standard_normal(r.d)
    g_in /= np.linalg.norm(g_in)
    g = g_perp + r.eps * g_in
    # A = A0 + coupling: symmetric PSD with an off-diagonal block that sends g_perp into M.
    A0 = Bp @ np.diag(rng.uniform(0.5, 1.5, r.n - r.d)) @ Bp.T + B @ np.diag(rng.uniform(0.5, 1.5, r.d)) @ B.T
    u = B @ rng.standard_normal(r.d)
    u /= np.linalg.norm(u)
    C = r.gamma_scale * (np.outer(u, g_perp) + np.outer(g_perp, u))
    A = A0 + C
    shift = max(0.0, -np.linalg.eigvalsh(A).min()) + 0.1
    A = A + shift * np.eye(r.n)
    return {"F": F, "lam": lam, "Q": Q, "B": B, "g": g, "A": A, "P": B @ B.T}


def flow(A: np.ndarray, g: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Exact gradient-flow displacement θ(t) − θ* = −t φ(tA) g for each t (rows)."""
    w, V = np.linalg.eigh(A)
    c = V.T @ g
    out = []
    for t in ts:
        x = t * w
        phi = np.where(np.abs(x) < 1e-8, 1 - x / 2, -np.expm1(-x) / np.where(x == 0, 1, x))
        out.append(-(V @ (t * phi * c)))
    return np.array(out)


def fit_exponent(ts: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of log y against log t."""
    lt, ly = np.log(ts), np.log(ys)
    slope, icpt = np.polyfit(lt, ly, 1)
    return float(slope), float(icpt)


def sqrt_psd(M: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(M)
    return V @ np.diag(np.sqrt(np.clip(w, 0, None))) @ V.T


def simulate(r: Regime, n_t: int = 60) -> dict:
    p = build_problem(r)
    F, A, g, P, lam = p["F"], p["A"], p["g"], p["P"], p["lam"]
    Fh = sqrt_psd(F)
    Hg = A @ g
    gamma = float(np.linalg.norm(Fh @ P @ Hg))
    eps = float(np.linalg.norm(P @ g))
    eps_f = float(np.linalg.norm(Fh @ P @ g))
    lam_max = float(lam.max())
    normA = float(np.linalg.norm(A, 2))
    # Early window, well inside the convergence radius of the expansion.
    t_hi = 1e-2 / normA
    ts = np.geomspace(t_hi / 100, t_hi, n_t)
    dth = flow(A, g, ts)
    du = 0.5 * np.einsum("ti,ij,tj->t", dth, F, dth)
    exponent, icpt = fit_exponent(ts, du)
    # Leading-order prediction: first-order ½ gᵀFg t² (when ε or the tail dominates) or γ²t⁴/8.
    first = 0.5 * float(g @ F @ g)
    second = gamma**2 / 8
    t_cross = math.sqrt(first / second) if second > 0 else math.inf
    if first > 0 and ts[0] < t_cross:
        predicted_exponent, coefficient = 2.0, first
    else:
        predicted_exponent, coefficient = 4.0, second
    coefficient_ratio = float(du[0] / ts[0] ** predicted_exponent / coefficient)
    # The scan's forecast: the second-order expansion Δθ ≈ −t g + (t²/2) H g in the quadratic form.
    approx = -np.outer(ts, g) + 0.5 * np.outer(ts**2, Hg)
    forecast = 0.5 * np.einsum("ti,ij,tj->t", approx, F, approx)
    forecast_ratio = du / forecast
    # Thm 6.2 along a longer path (t ≤ t0), with this problem's explicit remainder constant.
    t0 = 0.5 / normA
    tp = np.linspace(t0 / 200, t0, 200)
    dp = flow(A, g, tp)
    drift = np.linalg.norm((Fh @ P @ dp.T).T, axis=1)
    Cp = math.sqrt(lam_max) * normA**2 * np.linalg.norm(g) * math.exp(normA * t0) / 6
    bound = gamma / 2 * tp**2 - math.sqrt(lam_max) * eps * tp - Cp * tp**3
    out = {
        **{k: v for k, v in asdict(r).items() if k != "name"},
        "regime": r.name,
        "gamma": gamma,
        "eps_orth": eps,
        "eps_fisher": eps_f,
        "lambda_max": lam_max,
        "exponent": exponent,
        "predicted_exponent": predicted_exponent,
        "coefficient_ratio": coefficient_ratio,
        "coefficient_predicted": coefficient,
        "forecast_ratio_range": [float(forecast_ratio.min()), float(forecast_ratio.max())],
        "t_crossover": t_cross,
        "window": [float(ts[0]), float(ts[-1])],
        "drift_bound_holds": bool(np.all(drift >= bound - 1e-12)),
        "drift_bound_min_margin": float((drift - bound).min()),
        # A lower bound ≤ 0 on a norm holds trivially; the check means something only where it is > 0.
        "drift_bound_non_vacuous_fraction": float(np.mean(bound > 0)),
        "drift_bound_vacuous": bool(np.all(bound <= 0)),
        "curves": {
            "t": ts.tolist(),
            "delta_u": du.tolist(),
            "t_path": tp.tolist(),
            "drift": drift.tolist(),
            "drift_bound": bound.tolist(),
        },
    }
    if r.rotation:
        out.update(_moving_subspace(r, p, tp, dp, gamma, eps, lam_max, Cp))
    return out


def _moving_subspace(r: Regime, p: dict, tp, dp, gamma, eps, lam_max, Cp) -> dict:
    """App B: F(θ) = R(θ) F R(θ)ᵀ with R(θ) = expm(rotation · (wᵀθ) S), S skew-symmetric."""
    rng = np.random.default_rng(r.seed + 1)
    S = rng.standard_normal((r.n, r.n))
    S = (S - S.T) / np.linalg.norm(S - S.T, 2)
    w = rng.standard_normal(r.n)
    w /= np.linalg.norm(w)
    F0, lam = p["F"], p["lam"]
    Lam_gap = float(lam[r.d - 1] - lam[r.d])
    dists, P_moves, dk, drift13, grads = [], [], [], [], []
    Lf = 0.0
    for th in dp:
        R = expm(r.rotation * float(w @ th) * S)
        Ft = R @ F0 @ R.T
        grads.append(Ft @ th)  # ∇Δu(θ) = F(θ)(θ − θ*) for the moving quadratic form
        nrm = float(np.linalg.norm(th))
        if nrm > 0:
            Lf = max(Lf, float(np.linalg.norm(Ft - F0, 2)) / nrm)
        wv, V = np.linalg.eigh(Ft)
        Pt = V[:, -r.d :] @ V[:, -r.d :].T
        dists.append(nrm)
        P_moves.append(float(np.linalg.norm(Pt - p["P"], 2)))
        drift13.append(float(np.linalg.norm(sqrt_psd(F0) @ Pt @ th)))
    dists = np.array(dists)
    dk = 2 * Lf * dists / Lam_gap
    # Δu along the path with the moving F(θ): Δu(t) = ∫ ∇Δu(θ(s)) · θ'(s) ds (trapezoid), from 0.
    G = np.array(grads)
    steps = np.diff(np.vstack([np.zeros(r.n), dp]), axis=0)
    G0 = np.vstack([np.zeros(r.n), G[:-1]])
    du_moving = np.cumsum(0.5 * ((G + G0) * steps).sum(1))
    du_static = 0.5 * np.einsum("ti,ij,tj->t", dp, F0, dp)
    early = slice(0, max(4, len(tp) // 10))
    exp_moving = fit_exponent(tp[early], np.maximum(du_moving[early], 1e-300))[0]
    sup_g = float(np.linalg.norm(p["A"], 2)) * (np.linalg.norm(dp, axis=1).max() + 0) + float(np.linalg.norm(p["g"]))
    rho = math.sqrt(lam_max) * (2 * Lf / Lam_gap) * sup_g**2
    bound13 = gamma / 2 * tp**2 - math.sqrt(lam_max) * eps * tp - rho * tp**2 - Cp * tp**3
    return {
        "lipschitz_F": Lf,
        "eigengap": Lam_gap,
        "davis_kahan_holds": bool(np.all(np.array(P_moves) <= dk + 1e-12)),
        "davis_kahan_vacuous": bool(np.all(dk >= 1.0)),  # sin θ ≤ 1: a bound ≥ 1 says nothing
        "delta_u_moving_exponent": exp_moving,
        "delta_u_moving_vs_static_max_ratio": float(np.max(du_moving[1:] / np.maximum(du_static[1:], 1e-300))),
        "subspace_rotation_max": float(max(P_moves)),
        "davis_kahan_bound_max": float(dk.max()),
        "rho": rho,
        "eq13_holds": bool(np.all(np.array(drift13) >= bound13 - 1e-12)),
        "eq13_non_vacuous_fraction": float(np.mean(bound13 > 0)),
    }


REGIMES = [
    Regime("second_order (eps=0)", eps=0.0),
    Regime("near_orthogonal (eps=1e-3)", eps=1e-3),
    Regime("mixed (eps=1e-2)", eps=1e-2),
    Regime("first_order (eps=1)", eps=1.0),
    Regime("second_order with tail", eps=0.0, tail=1e-9),
    Regime("moving subspace (App B)", eps=0.0, rotation=0.5),
]


def eps_sweep(epsilons=(1.0, 1e-1, 1e-2, 1e-3, 1e-4, 0.0)) -> list[dict]:
    """Exponent in a fixed early window as ε → 0 (it rises from 2 to 4)."""
    rows = []
    for e in epsilons:
        res = simulate(Regime(f"eps={e:g}", eps=e))
        rows.append({"eps": e, "exponent": res["exponent"], "t_crossover": res["t_crossover"]})
    return rows


def nonlinear_check(seed: int = 0, n: int = 16, prompts: int = 2, vocab: int = 4) -> dict:
    """The t⁴ coefficient on a problem whose logits are nonlinear in θ, where γ²/8 is not the answer.

    Logits z_k(θ) = c_k + A_k θ + ½ [θᵀ B_{k,v} θ]_v for ``prompts`` prompts over ``vocab`` tokens,
    θ* = 0, Δu(θ) = mean_k KL(softmax z_k(0) ‖ softmax z_k(θ)); fine-tuning loss
    L(θ) = ½ (θ − θ_f)ᵀ K (θ − θ_f) with exact flow θ(t) = θ_f + e^{−Kt}(θ* − θ_f). g = K(θ* − θ_f) is
    built in the null space of every A_k (J g = 0: exact initial orthogonality), so
    Δu(t) = (t⁴/8) qᵀA q + O(t⁵) with q = J Hg + ∇²z[g, g]. The measured coefficient (Δu/t⁴
    extrapolated to t → 0 from the exact Δu) is compared with the code's
    (:func:`aligncollapse.geometry.curvature.logit_expansion_forms`, the scan's function) and with the
    Gauss-Newton part alone, (J Hg)ᵀA(J Hg)/8, which is what γ²/8 measures.
    """
    import torch

    from aligncollapse.geometry.curvature import logit_expansion_forms

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((prompts, vocab))
    A = rng.standard_normal((prompts, vocab, n))
    B = rng.standard_normal((prompts, vocab, n, n))
    B = (B + B.transpose(0, 1, 3, 2)) / 2
    null = np.linalg.svd(A.reshape(-1, n))[2][prompts * vocab :]  # rows span the null space of all A_k
    g = null.T @ rng.standard_normal(len(null))
    g /= np.linalg.norm(g)
    Q = _orthonormal(n, rng)
    K = Q @ np.diag(rng.uniform(0.5, 3.0, n)) @ Q.T
    theta_f = -np.linalg.solve(K, g)  # g = K(θ* − θ_f) with θ* = 0

    def logits(theta: np.ndarray) -> np.ndarray:
        return c + A @ theta + 0.5 * np.einsum("kvij,i,j->kv", B, theta, theta)

    def kl(theta: np.ndarray) -> float:
        z0, z = logits(np.zeros(n)), logits(theta)
        lp0 = z0 - np.log(np.exp(z0).sum(-1, keepdims=True))
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float((np.exp(lp0) * (lp0 - lp)).sum(-1).mean())

    ts = np.geomspace(2e-3, 1e-2, 9)
    du = np.array([kl(theta_f + expm(-K * tt) @ (-theta_f)) for tt in ts])
    exponent = float(np.polyfit(np.log(ts), np.log(du), 1)[0])
    slope, measured = np.polyfit(ts, du / ts**4, 1)  # Δu/t⁴ = c4 + c5 t + …: extrapolate to t = 0

    def f(theta):
        Bt = torch.from_numpy(B)
        return (torch.from_numpy(c) + torch.from_numpy(A) @ theta
                + 0.5 * torch.einsum("kvij,i,j->kv", Bt, theta, theta))  # fmt: skip

    forms = logit_expansion_forms(
        f, (torch.zeros(n, dtype=torch.float64),), (torch.from_numpy(g),), (torch.from_numpy(K @ g),),
        torch.full((prompts,), 1.0 / prompts, dtype=torch.float64),
    )  # fmt: skip
    computed = forms["qAq"] / 8
    gauss_newton = forms["hFh"] / 8
    return {
        "problem": f"n={n}, {prompts} prompts x {vocab} tokens, quadratic logits, J g = 0 exactly",
        "early_exponent": exponent,
        "measured_t4_coefficient": float(measured),
        "computed_t4_coefficient": computed,
        "gauss_newton_t4_coefficient": gauss_newton,
        "curvature_term_coefficient": forms["dAd"] / 8,
        "coefficient_ratio": float(measured) / computed,
        "gauss_newton_ratio": float(measured) / gauss_newton if gauss_newton > 0 else None,
        "first_order_term": forms["gFg"],
        "note": "coefficient_ratio ≈ 1 checks the scan's full coefficient; gauss_newton_ratio ≠ 1 shows that "
        "γ²/8 (which drops ∇²z[g, g]) is not the t⁴ coefficient of a network with curved logits",
    }


def run_theory() -> dict:
    """Every synthetic regime, the ε sweep and the nonlinear check (pure numbers; the report is
    rendered separately)."""
    sims = [simulate(r) for r in REGIMES]
    sweep = eps_sweep()
    nonlinear = nonlinear_check()
    table = [
        {
            k: s[k]
            for k in (
                "regime",
                "eps_orth",
                "gamma",
                "exponent",
                "predicted_exponent",
                "coefficient_ratio",
                "drift_bound_holds",
                "drift_bound_vacuous",
            )
        }
        for s in sims
    ]
    return {"regimes": sims, "eps_sweep": sweep, "table": table, "nonlinear": nonlinear}
