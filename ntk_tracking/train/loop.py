"""The epoch loop of every trainer: evaluate the initialization, train, evaluate, report, stop on divergence.

A trainer supplies `step(state, epoch) -> (state, metrics)` (one epoch, or one PPO update) and
`evaluate(state, epoch) -> metrics`; metrics are plain floats keyed as logged (train/loss, …).
A trainer that can stop inside an epoch also takes `step(state, epoch, steps)` (a slice of the
epoch's optimizer steps) and passes `epoch_steps(epoch)`: then a `StepCadence` given as
`on_epoch` stops at its optimizer steps (CV checkpoints inside epochs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

from ntk_tracking.keys import TEST_LOSS, TRAIN_LOSS, split_key

_LAST = ("param_norm", "learning_rate")  # values at the end of a stretch of steps, not means over it
_SUMMED = ("train/steps",)


@dataclasses.dataclass
class StepCadence:
    """`on_epoch` for a run with CV checkpoints at optimizer steps.

    `stops`: the global optimizer steps to stop at; `step`: global steps done before the first
    epoch the loop runs. The loop calls `on_point(step, epoch, state, metrics, epoch_end)` at every
    stop inside an epoch (metrics: an evaluation, epoch fractional) and at every epoch's end."""

    stops: tuple[int, ...]
    step: int
    on_point: Callable[[int, float, Any, dict, bool], None]

    def __call__(self, epoch: int, state, metrics: dict) -> None:
        self.on_point(self.step, float(epoch), state, metrics, True)

from tqdm.auto import tqdm


def run_epochs(config, state, start_epoch: int, on_epoch: Callable[[int, Any, dict], None],
               step: Callable[[Any, int], tuple[Any, dict]], evaluate: Callable[[Any, int], dict], *,
               progress: bool = True, unit: str = "epoch", shown: dict[str, str] | None = None,
               finite: tuple[str, ...] | None = None, check_before_reporting: bool = False,
               epoch_steps: Callable[[int], int] | None = None):
    """Epochs start_epoch+1 … config.epochs; on_epoch(epoch, state, metrics) after evaluating epoch 0
    (when start_epoch is 0) and after every epoch, with `time/<unit>_seconds`.

    With a StepCadence as on_epoch, an epoch holding some of its stops runs as stretches of steps
    (`step(state, epoch, slice)`, `epoch_steps(epoch)` steps in all), evaluated at each stop.

    `shown`: progress-bar label -> metric key. `finite`: the keys that must stay finite (all by
    default); otherwise FloatingPointError, after the epoch is reported (so its metrics show the
    divergence) or, with `check_before_reporting`, before."""
    shown = shown or {"loss": TRAIN_LOSS, "test": TEST_LOSS}
    if start_epoch == 0:
        on_epoch(0, state, evaluate(state, 0))
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"{config.task} {unit}s", disable=not progress,
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        if isinstance(on_epoch, StepCadence):
            state, step_metrics, paused = _stepped_epoch(on_epoch, state, epoch, step, evaluate, epoch_steps)
            t0 += paused
        else:
            state, step_metrics = step(state, epoch)
        metrics = {**evaluate(state, epoch), **step_metrics}
        metrics[f"time/{unit}_seconds"] = time.perf_counter() - t0
        bad = {k: metrics[k] for k in (finite or metrics) if not math.isfinite(metrics[k])}
        if bad and check_before_reporting:
            _diverged(unit, epoch, bad)
        on_epoch(epoch, state, metrics)
        bar.set_postfix({label: f"{metrics[key]:.4g}" for label, key in shown.items() if key in metrics})
        if bad:
            _diverged(unit, epoch, bad)
    return state


def _stepped_epoch(cadence: StepCadence, state, epoch: int, step, evaluate, epoch_steps):
    """One epoch in stretches ending at the cadence's stops; (state, metrics of the whole epoch,
    seconds spent outside training: evaluating and reporting at the stops)."""
    if epoch_steps is None:
        raise ValueError("this trainer cannot stop inside an epoch (it passes no epoch_steps)")
    n, start = epoch_steps(epoch), cadence.step
    cuts = [s - start for s in cadence.stops if start < s < start + n]
    if not cuts:
        state, metrics = step(state, epoch)
        cadence.step += n
        return state, metrics, 0.0
    parts, paused, a = [], 0.0, 0
    for b in cuts + [n]:
        state, m = step(state, epoch, slice(a, b))
        parts.append((b - a, m))
        if b < n:
            t = time.perf_counter()
            cadence.on_point(start + b, epoch - 1 + b / n, state, evaluate(state, epoch), False)
            paused += time.perf_counter() - t
        a = b
    cadence.step += n
    return state, _combined(parts), paused


def _combined(parts: list[tuple[int, dict]]) -> dict:
    """An epoch's metrics from its stretches' (steps, metrics): means weighted by steps, the last
    stretch's norms and learning rate, summed counts."""
    total = sum(n for n, _ in parts)
    out = {}
    for key in parts[-1][1]:
        values = [(n, m[key]) for n, m in parts if key in m]
        if key.endswith(_LAST):
            out[key] = values[-1][1]
        elif key in _SUMMED:
            out[key] = sum(v for _, v in values)
        else:
            out[key] = sum(n * v for n, v in values) / max(sum(n for n, _ in values), 1) if total else values[-1][1]
    return out


def _diverged(unit: str, epoch: int, bad: dict) -> None:
    raise FloatingPointError(f"training diverged at {unit} {epoch} ({', '.join(f'{k} = {v}' for k, v in bad.items())}); "
                             "lower the learning rate")


def epoch_order(seed: int, epoch: int, n: int):
    """The data order of one epoch: a pure function of (seed, epoch), so resumed runs repeat it."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def full_batches(n: int, batch_size: int) -> int:
    """Optimizer steps of an epoch of full batches (shuffled_batches)."""
    return max(1, n // min(batch_size, n)) if n else 0


def shuffled_batches(seed: int, epoch: int, batch_size: int, *arrays):
    """The epoch's full batches of every array (same order): each shaped (steps, batch, …)."""
    n = len(arrays[0])
    batch = min(batch_size, n)
    steps = n // batch
    order = epoch_order(seed, epoch, n)[: steps * batch]
    return tuple(a[order].reshape((steps, batch) + a.shape[1:]) for a in arrays)


def chunked_means(chunk_sums: Callable, state, arrays: tuple, chunk: int, *extra: Callable[[int], Any]) -> dict:
    """Means over a whole split of what `chunk_sums(state, *chunks, weight, *(f(start) for f in extra))`
    sums per fixed-size chunk; the last chunk is padded with weight 0 (one compiled shape)."""
    import numpy as np

    n = len(arrays[0])
    totals: dict[str, float] = {}
    for start in range(0, n, chunk):
        chunks = [a[start:start + chunk] for a in arrays]
        weight = np.ones(len(chunks[0]), np.float32)
        if len(chunks[0]) < chunk and n > chunk:
            pad = chunk - len(chunks[0])
            chunks = [np.concatenate([c, np.repeat(c[:1], pad, 0)]) for c in chunks]
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        for k, v in chunk_sums(state, *chunks, weight, *(f(start) for f in extra)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / n for k, v in totals.items()}


def train_and_test(evaluate: Callable, state, train: tuple, test: tuple) -> dict:
    """`evaluate(state, *arrays)` on both splits, keyed train/… and test/…."""
    return {**{split_key("train", k): v for k, v in evaluate(state, *train).items()},
            **{split_key("test", k): v for k, v in evaluate(state, *test).items()}}
