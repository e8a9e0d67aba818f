"""Figures in the style of the paper: collective-variable evolution (Figs. 1, 3–5)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; no display needed
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np

from ntk_tracking.keys import PRIMARY_NETWORK, TEST_LOSS, TRAIN_LOSS, metric_key, split_key

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


def plot_series(ax, points, split: str, label: bool = True, spread=None) -> None:
    """Raw values and, for long series, their running average (paper Fig. 3 style); `spread`,
    (step, std) points over the measurement subsets, is drawn as a band of ±1 std."""
    if not points:
        return
    steps, values = zip(*points)
    color = SPLIT_COLORS.get(split, "tab:gray")
    if spread:
        std = dict(spread)
        both = [(s, v, std[s]) for s, v in points if s in std]
        if both:
            s_, v_, d_ = (np.asarray(a, float) for a in zip(*both))
            ax.fill_between(s_, v_ - d_, v_ + d_, color=color, alpha=0.18, lw=0,
                            label=f"{split} ± std over subsets" if label else None)
    window = smoothing_window(len(values))
    if window == 1:
        ax.plot(steps, values, color=color, lw=1.5, marker=".", ms=4, label=split if label else None)
        return
    ax.plot(steps, values, color=color, alpha=0.35, lw=1)
    ax.plot(steps, running_average(values, window), color=color, lw=2,
            label=f"{split} (running mean, {window} pts)" if label else None)


def log_spaced(steps) -> bool:
    """Whether checkpoint steps crowd at the start as log-spaced ones do (cv_log_points): over
    a range of at least ×20, a third or more of the positive steps lie in its first tenth."""
    positive = np.asarray(sorted({s for s in steps if s > 0}), float)
    if len(positive) < 4 or positive[-1] / positive[0] < 20:
        return False
    return bool(np.mean(positive <= positive[0] + 0.1 * (positive[-1] - positive[0])) >= 1 / 3)


def epoch_axis(ax, steps, label: str, log: bool = False) -> None:
    """Integer ticks; a symmetric-log axis (linear from 0 to 1, so epoch 0 stays) for log-spaced
    steps, or with `log`."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, SymmetricalLogLocator

    if (log and max(steps, default=0) > 1) or log_spaced(steps):
        ax.set_xscale("symlog", linthresh=1, linscale=0.4)
        ax.set_xlim(left=0)
        subs = (1.0, 2.0, 5.0) if max(steps) <= 100 else (1.0, 3.0)  # labels that do not collide
        ax.xaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        label += " (log scale)"
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def log_axis_if_spanning(ax, axis: str = "y", ratio: float = 10.0) -> None:
    """A log scale with plain-number ticks where every plotted value is positive and they span
    more than `ratio`; linear otherwise."""
    values = [np.asarray(line.get_ydata() if axis == "y" else line.get_xdata(), float) for line in ax.get_lines()]
    values = np.concatenate(values) if values else np.array([])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > ratio:
        getattr(ax, f"set_{axis}scale")("log")
        _plain_log_ticks(getattr(ax, f"{axis}axis"), values.min(), values.max())


def evolution_figure(histories: dict, splits, title: str = "", networks=(PRIMARY_NETWORK,),
                     loss_keys=(TRAIN_LOSS, TEST_LOSS), xlabel: str = "epoch", log_x: bool = False,
                     loss_label: str = ""):
    """Entropy, trace and loss against epoch, one row per network; `histories` maps metric keys
    to (step, value) lists (`…/entropy_std/…`, `…/trace_std/…` where present: bands); `log_x`:
    a log axis whatever the steps (runs counted in optimizer steps)."""
    fig, axes = plt.subplots(len(networks), 3, figsize=(13, 3.6 * len(networks)), squeeze=False)
    for row, network in zip(axes, networks):
        prefix = "" if network == PRIMARY_NETWORK else f"{network}: "
        cv_steps = []
        for ax, variable, ylabel in ((row[0], "entropy", "NTK entropy S (nats)"), (row[1], "trace", "NTK trace Tr Θ")):
            for split in splits:
                points = histories.get(metric_key(network, variable, split), [])
                cv_steps += [s for s, _ in points]
                plot_series(ax, points, split, spread=histories.get(metric_key(network, f"{variable}_std", split)))
            ax.set_ylabel(prefix + ylabel)
        log_axis_if_spanning(row[1])
        losses = [k for k in loss_keys if histories.get(k)]
        for key in losses:
            plot_series(row[2], histories[key], key.split("/")[0])
        row[2].set_ylabel(loss_label or ", ".join(sorted({k.split("/", 1)[-1] for k in loss_keys})))
        log_axis_if_spanning(row[2], ratio=3.0)
        for ax in row:
            epoch_axis(ax, cv_steps, xlabel, log=log_x)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- sweep reports: evolution grids (Figs. 1, 4, 5) and scaling maps (Fig. 2) -----------------

LINESTYLES = ("-", "--", "-.", ":")


def shade(color, i: int, n: int):
    """The i-th of n shades of `color`: lightest first, the full colour last."""
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color))
    f = 0.0 if n < 2 else 0.6 * (1 - i / (n - 1))  # blend toward white, at most 60%
    return tuple(rgb + (1 - rgb) * f)


# Log-axis tick sets, sparsest first: the first that labels at least MIN_LOG_TICKS values is used.
LOG_SUBS = ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0), tuple(range(1, 10)))
MIN_LOG_TICKS = 4


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Log-axis ticks as plain numbers (0.5, 10, 1e+04), at least MIN_LOG_TICKS of them labelled: a log
    axis labels only decades by default, so a range of one or two decades showed two or three."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    axis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v)))
    axis.set_minor_formatter(NullFormatter())
    if not (0 < lo < hi and np.isfinite(hi)):
        return
    for subs in LOG_SUBS:
        ticks = [t for t in LogLocator(base=10, subs=subs).tick_values(lo, hi) if lo <= t <= hi]
        if len(ticks) >= MIN_LOG_TICKS:
            axis.set_major_locator(FixedLocator(ticks))
            return
    axis.set_major_locator(MaxNLocator(nbins=5))  # under about ×2: even steps
    axis.set_minor_locator(NullLocator())


def plain_number(v: float) -> str:
    """A tick label: plain from 0.001 to 9999 (0.05, 20, 5000), else mantissa e exponent (1e5, 2.5e-4)."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:g}"
    exponent = int(np.floor(np.log10(abs(v))))
    return f"{v / 10**exponent:.2g}e{exponent}"


def cell_text(v: float) -> str:
    """A heatmap value in at most ~5 characters: 0.975, 2.3, 5610, 1.2e+05."""
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.0f}" if 100 <= abs(v) < 1e5 else f"{v:.3g}"


def _positive(ax) -> bool:
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float) if np.isfinite(y)]
    return bool(ys) and all(y > 0 for y in ys)


def mean_and_std(series: list[list[tuple[int, float]]]):
    """(steps, mean, std) over several (step, value) series, at the steps they all have."""
    series = [dict(s) for s in series if s]
    if not series:
        return np.array([]), np.array([]), np.array([])
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[t] for t in steps] for s in series], float)
    return np.asarray(steps), values.mean(axis=0), values.std(axis=0)


def evolution_grid(rows, loss_label: str = "loss", title: str = ""):
    """Entropy, trace and loss against epoch; one row per varied property (paper Figs. 1, 4, 5).

    `rows`: dicts with "title", "property", "values" (ordered) and "lines", each line a dict
    with "value" and "histories" (metric key → [(epoch, value)]). Train and test keep the split
    colours; the property's values are told apart by shade (light = first) and line style. Lines
    sharing a value (seeds) are drawn as their mean with a ±1 std band.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = [("NTK entropy S (nats)", lambda split: metric_key(PRIMARY_NETWORK, "entropy", split)),
              ("NTK trace Tr Θ (sum over m points)", lambda split: metric_key(PRIMARY_NETWORK, "trace", split)),
              (loss_label, lambda split: split_key(split, "loss"))]
    fig, axes = plt.subplots(len(rows), 3, figsize=(16, 3.3 * len(rows) + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        values = list(row["values"])
        for c, (ylabel, key) in enumerate(panels):
            ax = axes[r, c]
            for i, value in enumerate(values):
                members = [line["histories"] for line in row["lines"] if line["value"] == value]
                for split, color in SPLIT_COLORS.items():
                    steps, mean, std = mean_and_std([m.get(key(split), []) for m in members])
                    if not len(steps):
                        continue
                    tone = shade(color, i, len(values))
                    ax.plot(steps, mean, color=tone, ls=LINESTYLES[i % len(LINESTYLES)],
                            lw=1.6, marker="." if len(steps) <= 30 else None, ms=5)
                    if len(members) > 1:  # several seeds: their spread as a band
                        ax.fill_between(steps, mean - std, mean + std, color=tone, alpha=0.2, lw=0)
            if c > 0 and _positive(ax):  # trace and loss span decades
                ax.set_yscale("log")
                ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()])
                _plain_log_ticks(ax.yaxis, np.nanmin(ys), np.nanmax(ys))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, lw=0.5)
        axes[r, 1].set_title(row["title"], fontsize=11)
        handles = [Line2D([], [], color=color, lw=2, label=split) for split, color in SPLIT_COLORS.items()]
        prop = row.get("property")
        for i, value in enumerate(values):
            label = f"{prop} = {value}" if prop else str(value)
            handles.append(Line2D([], [], color=shade("0.15", i, len(values)), lw=1.6,
                                  ls=LINESTYLES[i % len(LINESTYLES)], label=label))
        axes[r, 2].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                          fontsize=9)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return fig


def against_field(field: str, xs, panels: dict, title: str = ""):
    """Entropy and trace against a swept numeric option, at initialization and after training.

    `panels[(variable, when)]`: one (mean, std, count) per x, variable in (entropy, trace), when in
    (initial, final). Error bars: std over seeds where there are several."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = np.asarray(xs, float)
    for ax, variable, ylabel in ((axes[0], "entropy", "NTK entropy S (nats)"), (axes[1], "trace", "NTK trace Tr Θ")):
        for when, style, label in (("initial", "o--", "initialization (epoch 0)"), ("final", "s-", "after training")):
            rows = panels.get((variable, when), [])
            if not rows:
                continue
            mean, std, _ = (np.asarray(a, float) for a in zip(*rows))
            ax.errorbar(xs, mean, yerr=std, fmt=style, color="tab:gray" if when == "initial" else "tab:blue",
                        capsize=3, lw=1.5, ms=5, label=label)
        if xs.min() > 0 and xs.max() / xs.min() >= 4:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, xs.min(), xs.max())
        ax.set_xticks(xs, [plain_number(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if variable == "trace":
            log_axis_if_spanning(ax)
        ax.set_xlabel(field)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def scaling_map(widths, depths, rows, columns, marks=None, mark_row: int = -1, title: str = "",
                footnote: str = "", xlabel: str = "width (units per hidden layer)",
                ylabel: str = "depth (hidden layers)"):
    """Quantities over the width × depth grid, one row per time point (paper Fig. 2).

    `rows`: (row title, [array (len(depths), len(widths)) per column]); `columns`: (label, log)
    pairs; a column shares one colour scale across rows. `marks`: strings per cell, written
    under the value in row `mark_row`. NaN cells are grey.
    """
    from matplotlib.colors import LogNorm, Normalize

    nw, nd = len(widths), len(depths)
    cell = max(0.55, min(1.1, 7.0 / max(nw, nd)))
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(len(columns) * (nw * cell + 2.2), len(rows) * (nd * cell + 1.6) + 0.6))
    fontsize = max(5.5, min(9.0, 40.0 / max(nw, 4)))
    for c, (label, log) in enumerate(columns):
        stacked = np.concatenate([np.ravel(np.asarray(grids[c], float)) for _, grids in rows])
        finite = stacked[np.isfinite(stacked) & ((stacked > 0) if log else True)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (1.0, 10.0)
        if lo == hi:
            lo, hi = (lo / 2, hi * 2) if log else (lo - 0.5, hi + 0.5)
        norm = LogNorm(lo, hi) if log else Normalize(lo, hi)
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
        for r, (row_title, grids) in enumerate(rows):
            ax = axes[r, c]
            data = np.asarray(grids[c], float)
            shown = np.ma.masked_invalid(np.where(data > 0, data, np.nan) if log else data)
            im = ax.imshow(shown, origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for d in range(nd):
                for w in range(nw):
                    v = data[d, w]
                    text = cell_text(v)
                    if marks is not None and r == (mark_row % len(rows)) and marks[d][w]:
                        text += f"\n{marks[d][w]}"
                    color = "black" if not np.isfinite(v) else _text_color(cmap(norm(v)))
                    ax.text(w, d, text, ha="center", va="center", fontsize=fontsize, color=color)
            ax.set_xticks(range(nw), [str(w) for w in widths])
            ax.set_yticks(range(nd), [str(d) for d in depths])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{label}\n{row_title}", fontsize=10)
            bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
            if log:
                _plain_log_ticks(bar.ax.yaxis, lo, hi)
    if title:
        fig.suptitle(title, fontsize=12)
    if footnote:
        fig.text(0.5, 0.005, footnote, ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 if footnote else 0, 1, 1))
    return fig
