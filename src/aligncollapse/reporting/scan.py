"""Reports of ``scan`` and ``validate`` runs, rendered from their results.json."""

from __future__ import annotations

import math
from pathlib import Path

from aligncollapse.reporting.html import fmt, table, write_report
from aligncollapse.reporting.plots import plot_forecast, plot_global_spectrum


def aic_rows(res: dict) -> list[dict]:
    ci = res.get("ci", {})
    null = res.get("shuffled_null") or {}

    def c(k):
        return f"{res[k]:.4g} [{ci[k]['ci_low']:.3g}, {ci[k]['ci_high']:.3g}]" if k in ci else fmt(res.get(k))

    return [
        {"quantity": "d (subspace dimension)", "value": res["d"], "reference": res.get("d_rule")},
        {"quantity": "λ = λ_d", "value": c("lambda"), "reference": f"λ_max {res['lambda_max']:.4g}"},
        {
            "quantity": "tail mass (fraction)",
            "value": f"{res['tail_mass']:.4g} ({res['tail_fraction']:.3f})",
            "reference": f"tr F {res['trace']:.4g}",
        },
        {
            "quantity": "sharpness λ_d/(tr F/n)",
            "value": fmt(res["sharpness_ratio"]),
            "reference": "1 for a flat spectrum",
        },
        {"quantity": "ε_orth = ‖Pg‖", "value": c("eps_orth"), "reference": f"‖g‖ {res['g_norm']:.4g}"},
        {
            "quantity": "‖Pg‖/‖g‖",
            "value": c("eps_orth_rel"),
            "reference": f"shuffled-response null {null.get('eps_orth_rel', float('nan')):.3g}; "
            f"isotropic √(d/n) = {res['eps_orth_random']:.3g}",
        },
        {"quantity": "ε_F = ‖F^½Pg‖", "value": c("eps_fisher"), "reference": ""},
        {
            "quantity": "γ = ‖F^½PHg‖",
            "value": c("gamma"),
            "reference": f"isotropic direction {res['gamma_random']:.3g}",
        },
        {
            "quantity": "γ/‖Hg‖ (optimiser-free)",
            "value": fmt(res.get("flow_geometry", {}).get("gamma_rel")),
            "reference": f"shuffled-response null {null.get('gamma_rel', float('nan')):.3g}",
        },
    ]


def _steps(x) -> str:
    return "∞" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def scan_markdown(res: dict, label: str, figures: tuple[str, str] = ("forecast.png", "spectrum.png")) -> str:
    fc = res["forecast"]
    props = [{"property": k, "holds": v["holds"], "measured": v["why"]} for k, v in res["properties"].items()]
    onset, until = fc["onset_window_steps"]
    qw = res.get("quartic_window") or {}
    lines = [
        f"# aligncollapse scan{': ' + label if label else ''}",
        "",
        f"> **Verdict:** {res['verdict']}. Regime: {res['regime']}.",
        "",
        f"Fisher: {res['fisher']}. {res['n_safety']} safety prompts, {res['n_finetune']} fine-tuning examples, "
        f"{res['n_parameters']:,} parameters; optimizer {res['optimizer']}.",
        "",
        "## Alignment Instability Condition",
        "",
        table(aic_rows(res), ["quantity", "value", "reference"]),
        "95% bootstrap CIs in brackets (" + res.get("ci", {}).get("note", "") + ").",
        "",
        table(props, ["property", "holds", "measured"]),
        "## Forecast",
        "",
        f"- Δu at the planned budget ({fc.get('planned_steps', '?')} steps): {fmt(fc.get('at_budget'))} nats per sequence"
        + ("" if res.get("budget_within_validity", True) else " — **an extrapolation beyond the validity horizon**"),
        f"- forecast valid until step {_steps(until)} (third-order term < 10% of the kept terms, Δu within the trust region)",
        f"- second-order onset t₁ at step {_steps(onset)}; quartic window "
        + (
            "**empty** (the onset is not before the end of validity and of the budget)"
            if qw.get("empty", not onset < until)
            else f"steps [{_steps(qw.get('steps', [onset, until])[0])}, {_steps(qw.get('steps', [onset, until])[1])}]"
        ),
    ]
    qc = res.get("quartic_coefficient") or {}
    if qc:
        lines.append(
            f"- t⁴ coefficient (when J g ≈ 0): full ⅛ qᵀAq = {fmt(qc.get('full'))} (with ∇²z[g, g]); "
            f"Gauss-Newton only {fmt(qc.get('gauss_newton'))}; γ²/8 within M = {fmt(qc.get('gamma_sq_over_8'))}"
        )
    if fc.get("threshold") is not None:
        step = fc.get("predicted_collapse_step")
        lines.append(
            f"- collapse threshold Δu = {fc['threshold']:.4g}: "
            + ("not crossed on the forecast grid" if step is None else f"predicted crossing at step {step}")
            + (
                ""
                if step is None or fc.get("collapse_within_valid_window")
                else " (outside the validity window: not a reliable prediction)"
            )
        )
    lines += ["", f"![forecast]({figures[0]})", "", f"![spectrum]({figures[1]})", ""]
    return "\n".join(lines)


def _scan_figures(out: Path, res: dict, label: str, prefix: str = "") -> tuple[str, str]:
    f1 = plot_forecast(res["forecast"], out / f"{prefix}forecast.png", title=f"forecast: {label}").name
    f2 = plot_global_spectrum(
        {"alignment-KL Fisher (top-k)": res["eigenvalues"]}, out / f"{prefix}spectrum.png", "top eigenvalues / trace"
    ).name
    return f1, f2


def _label(results: dict) -> str:
    """The run's label on one line (a newline in a file name must not forge report structure)."""
    label = results.get("label") or (results.get("config") or {}).get("finetune") or ""
    return " ".join(str(label).split())


def render_scan(out: Path, results: dict, src: Path | None = None) -> Path:
    label = _label(results)
    figs = _scan_figures(out, results, label)
    return write_report(out, "report", scan_markdown(results, label, figs), f"scan: {label}")


def render_validate(out: Path, results: dict, src: Path | None = None) -> Path:
    scan = results["scan"]
    label = _label(results)
    figs = _scan_figures(out, scan, label, prefix="scan_")
    fc = scan["forecast"]
    plot_forecast(fc, out / "validate.png", measured=results["trajectory"], title=f"forecast vs measured: {label}")
    comp = results["forecast_vs_measured"]
    ex = results.get("exponent")
    md = scan_markdown(scan, label, figs)
    md += "\n## Validation against a real fine-tuning run (SGD)\n\n![validate](validate.png)\n\n"
    md += f"- forecast vs measured inside the validity window: {comp}\n"
    if ex:
        md += (
            f"- early-time exponent of measured Δu: {ex['exponent']:.3f} [{ex['ci_low']:.3f}, {ex['ci_high']:.3f}]"
            f" over t ∈ {ex['window_t']}\n"
        )
    nll = results.get("nll_form", {})
    md += f"- NLL form: linear coefficient {fmt(nll.get('linear_coefficient'))}, exponent {(nll.get('exponent') or {}).get('exponent')}\n"
    th = results.get("thm62") or {}
    frac = results.get("thm62_holds_fraction")
    if frac is None:
        md += "- Thm 6.2 drift bound: **vacuous** at every step in the window (its right-hand side is ≤ 0)\n\n"
    else:
        md += (
            f"- Thm 6.2 drift bound (without its O(t³) term) holds at {frac:.0%} of the "
            f"{th.get('non_vacuous_steps', '?')} non-vacuous steps in the window (of {th.get('steps_in_window', '?')})\n\n"
        )
    dk = results.get("davis_kahan") or {}
    if results.get("rotation"):
        md += f"Davis–Kahan (Lipschitz constant {dk.get('lipschitz', 'at the same point')}): holds = {dk.get('holds')}, vacuous = {dk.get('vacuous')}\n\n"
        md += table(results["rotation"], ["step", "subspace_rotation", "lipschitz_F", "lipschitz_F_other_checkpoints",
                                          "davis_kahan_bound", "holds", "vacuous"])  # fmt: skip
    seq = (results.get("sequence_kl") or {}).get("rows")
    if seq:
        md += ("\n## Greedy-path vs sequence-level KL\n\nThe forecast is about the greedy-path form; Lemma 3.2's "
               "sequence-level KL (Monte Carlo over responses sampled from θ\\*) at the checkpoints:\n\n")  # fmt: skip
        md += table(seq, ["step", "greedy_path_kl", "sequence_kl", "stderr", "ratio"])
    return write_report(out, "report", md, f"validate: {label}")
