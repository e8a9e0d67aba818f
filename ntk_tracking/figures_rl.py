"""The RL evolution figure (paper Fig. 3c): NTK entropy and trace of actor and critic, and the
return, against training episodes on a log axis, with the first return jump marked."""

from __future__ import annotations

import numpy as np

from ntk_tracking.keys import EVAL_EPISODE_RETURN, TRAIN_EPISODE_RETURN, TRAIN_EPISODES, metric_key

JUMP_FACTOR = 2.0  # a return jump: the evaluation return at least doubles the untrained agent's


def return_jump_step(points, factor: float = JUMP_FACTOR, max_return: float | None = None):
    """The first step whose return is ≥ factor × the return at the first step, or (when the
    episode's best possible return `max_return` is known and lower) at least halfway from the
    first step's return to it; None if never. Without the cap, an untrained agent already at
    half the best possible return could only "jump" by becoming perfect."""
    points = sorted((s, v) for s, v in points if np.isfinite(v))
    if len(points) < 2:
        return None
    base = points[0][1]
    threshold = factor * base
    if max_return is not None and max_return > base:
        threshold = min(threshold, base + (max_return - base) / 2)
    for step, value in points[1:]:
        if value >= threshold:
            return step
    return None


def _episodes_at(histories, steps):
    """Cumulative training episodes at each update step (update 0 → 0)."""
    table = dict(histories.get(TRAIN_EPISODES, []))
    table.setdefault(0, 0.0)
    known = sorted(table)
    return np.array([table.get(s, table[max([k for k in known if k <= s] or [0])]) for s in steps], float)


def rl_evolution_figure(histories: dict, title: str = "", probe_set: str = "states",
                        max_return: float | None = None):
    """histories: metric key -> [(update, value)]. Columns: actor, critic; rows: entropy, trace, return."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(10, 8), sharex=True, squeeze=False)
    returns = sorted(histories.get(EVAL_EPISODE_RETURN, []))
    train_returns = sorted(histories.get(TRAIN_EPISODE_RETURN, []))
    jump = return_jump_step(returns, max_return=max_return)
    jump_x = None if jump is None else max(_episodes_at(histories, [jump])[0], 1.0)

    def x_of(points):
        return np.maximum(_episodes_at(histories, [s for s, _ in points]), 1.0)  # update 0 drawn at 1

    for col, network in enumerate(("actor", "critic")):
        for row, variable in enumerate(("entropy", "trace")):
            ax = axes[row, col]
            points = sorted(histories.get(metric_key(network, variable, probe_set), []))
            if points:
                ax.plot(x_of(points), [v for _, v in points], "o-", ms=3)
            ax.set_ylabel(f"{network} NTK {variable}")
            if variable == "trace":
                ax.set_yscale("log")
        ax = axes[2, col]
        if train_returns:
            ax.plot(x_of(train_returns), [v for _, v in train_returns], color="0.7", lw=0.8, label="training episodes")
        if returns:
            ax.plot(x_of(returns), [v for _, v in returns], "o-", ms=3, color="C3", label="evaluation")
        ax.set_ylabel("episode return")
        ax.set_xlabel("training episodes (log; update 0 at 1)")
        ax.legend(fontsize=7)
        axes[0, col].set_title(network)
        for r in range(3):
            axes[r, col].set_xscale("log")
            if jump_x is not None:
                axes[r, col].axvline(jump_x, color="C2", ls="--", lw=1,
                                     label="first return jump" if r == 0 else None)
        if jump_x is not None:
            axes[0, col].legend(fontsize=7)
    fig.suptitle(title or "NTK evolution of the actor-critic agent")
    fig.tight_layout()
    return fig
