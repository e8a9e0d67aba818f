"""Figures in the style of the paper: collective-variable evolution (Figs. 1, 3–5)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.pyplot as plt
import numpy as np

SPLIT_COLORS = {"train": "tab:blue", "test": "tab:orange"}


def running_average(values, window: int) -> np.ndarray:
    """Centered mean over `window` points (odd), shrinking at the ends."""
    values = np.asarray(values, dtype=float)
    half = window // 2
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(0, idx - half), np.minimum(len(values), idx + half + 1)
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def smoothing_window(n: int) -> int:
    """About a tenth of the series, odd; 1 (no smoothing) below 20 points."""
    return 2 * (n // 20) + 1


def plot_series(ax, points, split: str, label: bool = True) -> None:
    """Raw values and, for long series, their running average (paper Fig. 3 style)."""
    if not points:
        return
    steps, values = zip(*points)
    color = SPLIT_COLORS.get(split, "tab:gray")
    window = smoothing_window(len(values))
    if window == 1:
        ax.plot(steps, values, color=color, lw=1.5, marker=".", ms=4, label=split if label else None)
        return
    ax.plot(steps, values, color=color, alpha=0.35, lw=1)
    ax.plot(steps, running_average(values, window), color=color, lw=2,
            label=f"{split} (running mean, {window} pts)" if label else None)


def evolution_figure(histories: dict, splits, title: str = ""):
    """Entropy, trace and loss against epoch; `histories` maps metric keys to (step, value) lists."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("entropy", "NTK entropy S (nats)", lambda s: f"ntk/entropy/{s}"),
        ("trace", "NTK trace Tr Θ", lambda s: f"ntk/trace/{s}"),
        ("loss", "loss", lambda s: f"{s}/loss"),
    ]
    for ax, (_, ylabel, key) in zip(axes, panels):
        for split in ("train", "test"):
            if ylabel.startswith("NTK") and split not in splits:
                continue
            plot_series(ax, histories.get(key(split), []), split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    axes[2].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
