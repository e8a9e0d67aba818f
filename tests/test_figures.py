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


def drawn(ax) -> list[list[tuple[float, float]]]:
    """The (x, y) points of each line on the axes."""
    return [list(zip(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)))
            for line in ax.get_lines()]


@pytest.mark.parametrize("steps", [[0, 1], [0, 5, 10], [3]])
def test_short_series_still_draw(steps, tmp_path):
    """Each panel draws its series' every point, and the figure saves as a PNG."""
    data = histories(steps)
    fig = figures.evolution_figure(data, ("train",))
    entropy, trace, loss = fig.axes[:3]
    assert drawn(entropy) == [data["ntk/entropy/train"]]
    assert drawn(trace) == [data["ntk/trace/train"]]
    assert drawn(loss) == [data["train/loss"], data["test/loss"]]
    fig.savefig(tmp_path / "evolution.png")
    figures.plt.close(fig)
    png = (tmp_path / "evolution.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_tick_numbers_are_plain_and_one_style():
    assert [figures.plain_number(v) for v in (0, 5e-4, 0.05, 20, 5000, 1e4, 1.2e8, -3e5)] == [
        "0", "5e-4", "0.05", "20", "5000", "1e4", "1.2e8", "-3e5"]


@pytest.mark.parametrize("lo, hi", [(1.0, 1.6), (0.3, 1.5), (200.0, 2100.0), (10.0, 900.0), (5.0, 4e4), (1.0, 1e6)])
def test_log_axes_label_at_least_four_values(lo, hi):
    fig, ax = figures.plt.subplots()
    ax.plot([0, 1], [lo, hi])
    ax.set_yscale("log")
    figures._plain_log_ticks(ax.yaxis, lo, hi)
    ax.set_ylim(lo, hi)
    labels = tick_labels(ax, "y")
    figures.plt.close(fig)
    assert len(labels) >= figures.MIN_LOG_TICKS, (lo, hi, labels)
    assert all("$" not in label for label in labels)  # plain numbers, not 10^k


def grid_rows(seeds=2):
    """Two latents values × `seeds` seeds; seed s shifts every value by s."""
    lines = []
    for value in ("4", "8"):
        for s in range(seeds):
            h = {}
            for split in ("train", "test"):
                h[f"ntk/entropy/{split}"] = [(e, 2.0 + 0.1 * e + s) for e in range(3)]
                h[f"ntk/trace/{split}"] = [(e, 100.0 * (1 + e) + 10 * s) for e in range(3)]
                h[f"{split}/loss"] = [(e, 500.0 / (1 + e)) for e in range(3)]
            lines.append({"value": value, "histories": h})
    return [{"title": "t", "property": "latents", "values": ["4", "8"], "lines": lines}]


def test_seeds_are_drawn_as_their_mean_with_a_std_band():
    fig = figures.evolution_grid(grid_rows(seeds=2), "negative ELBO (nats)")
    entropy = fig.axes[0]
    lines = entropy.get_lines()
    assert len(lines) == 4  # one mean line per value and split, not one per seed
    np.testing.assert_allclose(lines[0].get_ydata(), [2.5, 2.6, 2.7])  # mean of seeds 0 and 1
    bands = [c for c in entropy.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bands) == 4
    lows = bands[0].get_paths()[0].vertices[:, 1]
    assert lows.min() == pytest.approx(2.0) and lows.max() == pytest.approx(3.2)  # mean ± 0.5
    assert fig.axes[2].get_ylabel() == "negative ELBO (nats)"
    figures.plt.close(fig)
    one = figures.evolution_grid(grid_rows(seeds=1))
    assert not [c for c in one.axes[0].collections if isinstance(c, matplotlib.collections.PolyCollection)]
    figures.plt.close(one)


def test_sweep_row_titles_read_as_sentences_and_the_vae_loss_is_the_negative_elbo():
    from ntk_tracking.report import _loss_label, row_title
    from ntk_tracking.tasks import get_task

    assert row_title("latents", ["4", "8"], {}, 2) == "latents = 4, 8 · mean ± std over 2 seeds"
    assert row_title("width", ["16", "64"], {"depth": "2", "activation": "relu"}, 1) == \
        "width = 16, 64 · depth = 2 · activation = relu"
    assert _loss_label("mnist_vae") == "negative ELBO (nats)"
    assert _loss_label("mnist_dense") == "loss (cross-entropy, nats)"
    task = get_task("mnist_vae")
    fig = task.evolution_figure(task.default_config(), lambda key: [(0, 500.0), (1, 300.0)], ("model",),
                                ("train", "test"))
    assert fig.axes[2].get_ylabel() == "negative ELBO (nats)"
    figures.plt.close(fig)
