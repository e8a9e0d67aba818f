"""The run's evolution figure: integer epochs, readable log axes, the spread over subsets as bands."""

from __future__ import annotations

import matplotlib.collections
import numpy as np
import pytest

from ntk_tracking import figures
from ntk_tracking.tasks.base import TaskConfig


def histories(steps, with_std=True):
    steps = list(steps)
    out = {}
    for split, shift in (("train", 0.0), ("test", 0.1)):
        out[f"ntk/entropy/{split}"] = [(s, 2.0 - 0.01 * s + shift) for s in steps]
        out[f"ntk/trace/{split}"] = [(s, 10.0 * 1.5 ** min(s, 40) + shift) for s in steps]  # spans decades
        if with_std:
            out[f"ntk/entropy_std/{split}"] = [(s, 0.05) for s in steps]
            out[f"ntk/trace_std/{split}"] = [(s, 1.0) for s in steps]
    epochs = range(max(steps) + 1)
    out["train/loss"] = [(e, 2.0 / (1 + e)) for e in epochs]
    out["test/loss"] = [(e, 2.5 / (1 + e)) for e in epochs]
    return out


def tick_labels(ax, axis="x"):
    ax.figure.canvas.draw()
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_text()]


def test_evenly_spaced_checkpoints_have_integer_epoch_ticks_and_bands():
    fig = figures.evolution_figure(histories(range(0, 7)), ("train", "test"))
    entropy, trace, loss = fig.axes[:3]
    for ax in (entropy, trace, loss):
        assert ax.get_xscale() == "linear"
        labels = tick_labels(ax)
        assert labels and all(label.lstrip("−-").isdigit() for label in labels), labels
    bands = [c for c in entropy.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bands) == 2  # train and test: mean ± std over the subsets
    assert any("std" in label for label in entropy.get_legend_handles_labels()[1])
    assert trace.get_yscale() == "log" and loss.get_yscale() == "log"
    for ax in (trace, loss):  # plain numbers, no 10^k mathtext
        assert all("$" not in label and "^" not in label for label in tick_labels(ax, "y"))


def test_without_std_no_band_is_drawn():
    fig = figures.evolution_figure(histories(range(0, 7), with_std=False), ("train", "test"))
    assert not [c for c in fig.axes[0].collections if isinstance(c, matplotlib.collections.PolyCollection)]


def test_log_spaced_checkpoints_go_on_a_log_axis_that_keeps_epoch_zero():
    config = TaskConfig(epochs=200, cv_every=50, cv_log_points=10)
    steps = config.cv_epochs()
    assert figures.log_spaced(steps) and not figures.log_spaced(range(0, 201, 20))
    fig = figures.evolution_figure(histories(steps), ("train", "test"))
    entropy = fig.axes[0]
    assert entropy.get_xscale() == "symlog" and "log scale" in entropy.get_xlabel()
    labels = tick_labels(entropy)
    assert "0" in labels and all(label.isdigit() for label in labels), labels
    xs = np.concatenate([line.get_xdata() for line in entropy.get_lines()])
    assert 0 in xs


@pytest.mark.parametrize("steps", [[0, 1], [0, 5, 10], [3]])
def test_short_series_still_draw(steps):
    figures.evolution_figure(histories(steps), ("train",))


def test_tick_numbers_are_plain_and_one_style():
    assert [figures.plain_number(v) for v in (0, 5e-4, 0.05, 20, 5000, 1e4, 1.2e8, -3e5)] == [
        "0", "5e-4", "0.05", "20", "5000", "1e4", "1.2e8", "-3e5"]
