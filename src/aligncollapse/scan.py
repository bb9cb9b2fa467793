"""``aligncollapse scan``: the pre-flight check (AIC, forecast, verdict, report). Never modifies the model."""

from __future__ import annotations

from pathlib import Path

import torch

from aligncollapse.aic import ScanSettings, measure_aic
from aligncollapse.plots import plot_forecast, plot_global_spectrum
from aligncollapse.report import table, write_report
from aligncollapse.subspace import SafetySubspace


def run_scan(model, tokenizer, safety, finetune, out_dir: str | Path, s: ScanSettings, label: str = "") -> dict:
    out = Path(out_dir)
    res = measure_aic(model, tokenizer, safety, finetune, s)
    basis = res.pop("basis")
    res.pop("update_vectors", None)
    params = s.blocks.select(model)
    SafetySubspace(
        torch.tensor(res["eigenvalues"][: res["d"]], dtype=torch.float64), basis, list(params), [tuple(p.shape) for p in params.values()],
        "sampled", res["trace"], res["n_safety"], {"source": "scan", "fisher": res["fisher"]},
    ).save(out / "subspace")  # fmt: skip
    res["subspace_path"] = "subspace"
    plot_forecast(res["forecast"], out / "forecast.png", title=f"forecast: {label}")
    plot_global_spectrum(
        {"alignment-KL Fisher (top-k)": res["eigenvalues"]}, out / "spectrum.png", "top eigenvalues / trace"
    )
    write_report(out, "report", scan_markdown(res, label))
    return res


def aic_rows(res: dict) -> list[dict]:
    ci = res["ci"]

    def c(k):
        return f"{res[k]:.4g} [{ci[k]['ci_low']:.3g}, {ci[k]['ci_high']:.3g}]" if k in ci else f"{res[k]:.4g}"

    return [
        {"quantity": "d (subspace dimension)", "value": res["d"], "reference": res["d_rule"]},
        {"quantity": "λ = λ_d", "value": c("lambda"), "reference": f"λ_max {res['lambda_max']:.4g}"},
        {
            "quantity": "tail mass (fraction)",
            "value": f"{res['tail_mass']:.4g} ({res['tail_fraction']:.3f})",
            "reference": f"tr F {res['trace']:.4g}",
        },
        {
            "quantity": "sharpness λ_d/(tr F/n)",
            "value": f"{res['sharpness_ratio']:.4g}",
            "reference": "1 for a flat spectrum",
        },
        {"quantity": "ε_orth = ‖Pg‖", "value": c("eps_orth"), "reference": f"‖g‖ {res['g_norm']:.4g}"},
        {
            "quantity": "‖Pg‖/‖g‖",
            "value": c("eps_orth_rel"),
            "reference": f"random direction √(d/n) = {res['eps_orth_random']:.3g}",
        },
        {"quantity": "ε_F = ‖F^½Pg‖", "value": c("eps_fisher"), "reference": ""},
        {"quantity": "γ = ‖F^½PHg‖", "value": c("gamma"), "reference": f"random direction {res['gamma_random']:.3g}"},
    ]


def scan_markdown(res: dict, label: str) -> str:
    fc = res["forecast"]
    props = [{"property": k, "holds": v["holds"], "measured": v["why"]} for k, v in res["properties"].items()]
    lines = [
        f"# aligncollapse scan{': ' + label if label else ''}",
        "",
        f"**Verdict:** {res['verdict']}. Regime: {res['regime']}.",
        "",
        f"Fisher: {res['fisher']}. {res['n_safety']} safety prompts, {res['n_finetune']} fine-tuning examples, {res['n_parameters']:,} parameters; optimizer {res['optimizer']}.",
        "",
        "## Alignment Instability Condition",
        "",
        table(aic_rows(res), ["quantity", "value", "reference"]),
        "95% bootstrap CIs in brackets (" + res["ci"]["note"] + ").",
        "",
        table(props, ["property", "holds", "measured"]),
        "## Forecast",
        "",
        f"- Δu at the planned budget: {fc['at_budget']:.4g} nats per sequence"
        if fc["at_budget"] is not None
        else "- budget beyond the grid",
        f"- onset window (steps): [{fc['onset_window_steps'][0]:.3g}, {fc['onset_window_steps'][1]:.3g}] (empty when the first bound exceeds the second)",
        f"- forecast valid until step {fc['valid_until_step']:.3g} (third-order term < 10% of the kept terms, Δu within the trust region)",
    ]
    if fc.get("threshold") is not None:
        step = fc.get("predicted_collapse_step")
        lines.append(
            f"- collapse threshold Δu = {fc['threshold']:.4g}: predicted crossing at step {step}"
            + (
                ""
                if fc.get("collapse_within_valid_window")
                else " (outside the validity window: not a reliable prediction)"
            )
        )
    lines += ["", "![forecast](forecast.png)", "", "![spectrum](spectrum.png)", ""]
    return "\n".join(lines)
