"""Plots shared by the commands (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Save atomically (a temporary file, then ``os.replace``): never written through a symlink."""
    import os
    import tempfile

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_trajectories(trajectories: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Alignment loss (NLL and KL) and refusal rate against fine-tuning step, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, recs in trajectories.items():
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [r["alignment_loss"] for r in recs], marker="o", ms=3, label=name)
        if all("alignment_kl" in r for r in recs):
            axes[1].plot(steps, [r["alignment_kl"] for r in recs], marker="o", ms=3, label=name)
        ref = [(r["step"], r["refusal_rate"]) for r in recs if "refusal_rate" in r]
        if ref:
            axes[2].plot(*zip(*ref), marker="s", ms=4, label=name)
    axes[0].set(xlabel="fine-tuning step", ylabel="NLL of safe targets (per token)", title="alignment loss (a)")
    axes[1].set(xlabel="fine-tuning step", ylabel="KL(π* ‖ π_t) per sequence", title="alignment loss (b): Δu")
    axes[2].set(xlabel="fine-tuning step", ylabel="refusal rate", title="held-out harmful refusal", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, 110)


MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plot_block_spectra(blocks: dict[str, list[float]], path: str | Path, title: str = "", top: int = 64) -> Path:
    """Sorted top eigenvalues per module, one panel per module type and one line per layer
    (the paper's Figs 2 and 5); parameters outside the seven projections go to 'other'."""
    import re

    panels: dict[str, list[tuple[int, list[float]]]] = {}
    for name, eigs in blocks.items():
        kind = next((m for m in MODULE_ORDER if f".{m}." in name or name.endswith(f".{m}.weight")), "other")
        layer = re.search(r"layers\.(\d+)\.", name)
        panels.setdefault(kind, []).append((int(layer.group(1)) if layer else -1, eigs))
    kinds = [k for k in (*MODULE_ORDER, "other") if k in panels]
    cols = min(4, len(kinds))
    rows = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for layer, eigs in sorted(panels[kind]):
            e = [x for x in eigs[:top] if x > 0]
            if e:
                ax.semilogy(range(1, len(e) + 1), e, alpha=0.6, label=f"layer {layer}" if layer >= 0 else None)
        ax.set(title=kind, xlabel="index", ylabel="eigenvalue")
        ax.grid(alpha=0.3)
        if len(panels[kind]) <= 8:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path, 100)


def plot_global_spectrum(curves: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Sorted eigenvalues (normalised by the trace) of each Fisher and its null references."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, eigs in curves.items():
        tot = sum(eigs) or 1.0
        e = [x / tot for x in eigs if x > 0]
        ax.semilogy(range(1, len(e) + 1), e, marker=".", label=label, alpha=0.8)
    ax.set(xlabel="index", ylabel="eigenvalue / trace", title=title or "Fisher spectrum vs null")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, 100)


def plot_theory(sims: list[dict], path: str | Path) -> Path:
    """Δu(t) on log-log axes per regime, and Thm 6.2's drift against its bound."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in sims:
        c = s["curves"]
        axes[0].loglog(c["t"], c["delta_u"], label=f"{s['regime']}: slope {s['exponent']:.2f}")
    axes[0].set(xlabel="t", ylabel="Δu(t)", title="alignment loss along gradient flow")
    s0 = sims[0]["curves"]
    axes[1].plot(s0["t_path"], s0["drift"], label="‖F^½ P Δθ(t)‖")
    axes[1].plot(s0["t_path"], s0["drift_bound"], "--", label="(γ/2)t² − √λmax ε t − C′t³")
    axes[1].set(xlabel="t", title=f"Thm 6.2 drift bound ({sims[0]['regime']})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, 100)


def plot_forecast(fc: dict, path: str | Path, measured: list[dict] | None = None, title: str = "") -> Path:
    """Forecast Δu against step (log-log): solid inside the validity horizon, dotted beyond it (a
    grey band marks where the forecast is not valid), the quartic onset window shaded, the planned
    budget and threshold as lines, and, if given, the measured alignment KL of a fine-tuning run."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    steps = np.asarray(fc["steps"], dtype=float)
    valid = float(fc.get("valid_until_step") or 0.0)
    inside = steps <= valid

    def curve(values, style, label, color):
        y = np.maximum(np.asarray(values, dtype=float), 1e-300)
        k = int(inside.sum())  # the grid is increasing: the first k points are inside the horizon
        if k:
            ax.loglog(steps[:k], y[:k], style, color=color, label=label)
        if k < len(steps):
            j = max(k - 1, 0)  # join the dotted extrapolation to the last valid point
            ax.loglog(steps[j:], y[j:], ":", color=color, alpha=0.6, label=None if k else f"{label} (not valid)")

    curve(fc["delta_u"], "-", "forecast Δu (full F)", "C0")
    curve(fc["delta_u_in_M"], "--", "forecast within M", "C1")
    curve(fc["quartic_term"], "-.", "γ² t⁴ / 8", "C2")
    lo, hi = steps.min(), steps.max()
    if valid < hi:
        ax.axvspan(max(valid, lo), hi, color="0.85", alpha=0.6, lw=0, label=f"forecast not valid (step > {valid:.3g})")
    onset, end = fc["onset_window_steps"]
    end = min(end, float(fc.get("planned_steps") or end))
    if np.isfinite(onset) and onset < end:
        ax.axvspan(max(onset, lo), end, color="C3", alpha=0.12, lw=0, label="quartic onset window")
    if fc.get("planned_steps"):
        ax.axvline(
            fc["planned_steps"], color="k", lw=0.8, ls="--", label=f"planned budget ({fc['planned_steps']} steps)"
        )
    if measured:
        pts = [(r["step"], r["alignment_kl"]) for r in measured if r["step"] > 0 and (r.get("alignment_kl") or 0) > 0]
        if pts:
            ax.loglog(*zip(*pts), "ko", ms=4, label="measured Δu (KL)")
    if fc.get("threshold"):
        ax.axhline(fc["threshold"], color="red", lw=0.8, label="collapse threshold")
    ax.set_xlim(lo, hi)
    ax.set(xlabel="fine-tuning step", ylabel="Δu = KL(π* ‖ π_t) per sequence", title=title or "alignment-loss forecast")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path, 100)


def plot_ranking(scores: dict[str, dict], path: str | Path, label: str) -> Path:
    """Candidate sets by predicted harm (highest first), with CIs where present."""
    names = [n for n in scores if scores[n]["score"] is not None]  # undefined scores are not drawn
    vals = [scores[n]["score"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    y = range(len(names))[::-1]
    lo = [max(0.0, v - scores[n]["ci_low"]) if scores[n].get("ci_low") is not None else 0 for n, v in zip(names, vals)]
    hi = [
        max(0.0, scores[n]["ci_high"] - v) if scores[n].get("ci_high") is not None else 0 for n, v in zip(names, vals)
    ]
    ax.barh(list(y), vals, xerr=[lo, hi], color="tab:red", alpha=0.7, capsize=3)
    ax.set_yticks(list(y), names)
    if min(vals) > 0 and max(vals) / max(min(vals), 1e-300) > 100:
        ax.set_xscale("log")
    ax.set(xlabel=label, title="predicted harm")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path, 110)


def plot_predicted_vs_measured(points: dict[str, dict[str, tuple]], path: str | Path, xlabel: str, ylabel: str) -> Path:
    """One panel per mode: predictor (x, log) against measured harm (y, with error bars)."""
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
    for ax, (mode, pts) in zip(axes[0], points.items()):
        for name, (x, y, ylo, yhi) in pts.items():
            ax.errorbar([x], [y], yerr=[[y - ylo], [yhi - y]], fmt="o", capsize=3)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        xs = [p[0] for p in pts.values()]
        if xs and min(xs) > 0:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=mode)
        ax.grid(alpha=0.3)
    return _save(fig, path, 110)


def plot_layer_overlap(curves: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """Mean OS per transformer block against layer, one line per set, one panel per mode (Fig 3)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (mode, sets) in zip(axes[0], curves.items()):
        for name, per_layer in sets.items():
            ls = sorted(per_layer, key=int)
            ax.plot([int(k) for k in ls], [per_layer[k] for k in ls], marker="o", ms=3, label=name)
        ax.set(xlabel="layer", ylabel="mean overlap score (audit)", title=mode, yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, 110)


def plot_defenses(runs: dict[str, dict[str, list[dict]]], path: str | Path) -> Path:
    """Alignment KL against step on log-log axes (top) and refusal against step (bottom), one
    column per fine-tuning set, one line per defense."""
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 8), squeeze=False)
    for j, (data, defs) in enumerate(runs.items()):
        for name, recs in defs.items():
            kl = [(r["step"], r["alignment_kl"]) for r in recs if r["step"] > 0 and r.get("alignment_kl", 0) > 0]
            if kl:
                axes[0][j].plot(*zip(*kl), marker="o", ms=3, label=name)
            ref = [(r["step"], r["refusal_rate"]) for r in recs if "refusal_rate" in r]
            if ref:
                axes[1][j].plot(*zip(*ref), marker="s", ms=3, label=name)
        axes[0][j].set(xscale="log", yscale="log", xlabel="step", ylabel="alignment KL Δu", title=data)
        axes[1][j].set(xlabel="step", ylabel="held-out refusal rate", ylim=(-0.05, 1.05), title=data)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path, 110)
