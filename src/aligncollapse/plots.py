"""Plots shared by the commands (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
