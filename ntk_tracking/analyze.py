"""The post-hoc analyzer: restore a run's CV checkpoints and log the NTK's collective variables.

Rebuilds model and data from the run's config.json (big_vision's eval_only pattern), draws the
measurement subsets once, and logs `ntk/<variable>/<split>` at step = checkpoint epoch. A
checkpoint counts as analyzed once its metrics are in the run (one atomic batch per checkpoint),
so reruns skip it and a kill loses at most the checkpoint in progress.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ntk_tracking import tracking
from ntk_tracking.checkpointing import CheckpointError, CheckpointStore
from ntk_tracking.configs import TASKS, TrainConfig
from ntk_tracking.data import load_dataset
from ntk_tracking.models import create_model, ntk_apply_fn
from ntk_tracking.ntk import IMPLEMENTATIONS, NTK, Measurement, draw_subsets

SPLITS = ("train", "test")
SETTINGS_ARTIFACT = "analysis/settings.json"


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """How the kernel is measured: K subsets of m points per split (paper: 200 of 20)."""

    num_subsets: int = 20
    subset_size: int = 20
    splits: tuple[str, ...] = SPLITS
    seed: int = 0
    implementation: str = "auto"
    memory_budget: int | None = None  # bytes; None = the engine's default

    def validate(self) -> "AnalysisSettings":
        if self.subset_size < 2:
            raise ValueError(f"points per subset (m) must be ≥ 2 for an entropy, got {self.subset_size}")
        if self.num_subsets < 1:
            raise ValueError(f"subsets (K) must be ≥ 1, got {self.num_subsets}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {list(self.splits)}")
        if self.implementation not in IMPLEMENTATIONS + ("auto",):
            raise ValueError(
                f"unknown NTK implementation {self.implementation!r}; choose one of "
                f"{IMPLEMENTATIONS + ('auto',)}"
            )
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory budget must be positive, got {self.memory_budget}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["splits"] = list(self.splits)
        return d


def metric_key(name: str, split: str) -> str:
    return f"ntk/{name}/{split}"


class Analyzer:
    """The collective variables of one training run, checkpoint by checkpoint."""

    def __init__(self, run_id: str, settings: AnalysisSettings, mlflow_client=None):
        self.settings = settings.validate()
        self.client = mlflow_client or tracking.client()
        self.run_id = run_id
        tracking.get_run(run_id, self.client)
        saved = tracking.load_json_artifact(run_id, tracking.CONFIG_ARTIFACT)
        if saved is None:
            raise tracking.RunError(
                f"run {run_id} has no {tracking.CONFIG_ARTIFACT}: it was not made by an "
                "ntk_tracking training entry point, so there is no model to rebuild"
            )
        if saved.get("task") not in TASKS:
            raise tracking.RunError(
                f"run {run_id} trained a {saved.get('task')!r} model, which this analyzer does not "
                f"support (it knows {sorted(TASKS)})"
            )
        self.config = TrainConfig.from_dict(saved)
        previous = tracking.load_json_artifact(run_id, SETTINGS_ARTIFACT)
        if previous is not None and previous != self.settings.to_dict():
            raise ValueError(
                f"run {run_id} was analyzed with other settings {previous}; rerun with those "
                "settings (metrics of two protocols must not mix in one history)"
            )
        self.store = CheckpointStore(run_id, self.client)
        self._measurements = None

    # -- setup, once per run ----------------------------------------------------------------

    def _setup(self):
        cfg, s = self.config, self.settings
        data = load_dataset(cfg.dataset, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
        self.model = create_model(cfg.model, **cfg.model_hyperparameters(data.num_outputs))
        example = jnp.asarray(data.x_train[:1])
        self.abstract = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), example)
        ntk = NTK(ntk_apply_fn(self.model), s.implementation, s.memory_budget)
        splits = {"train": data.x_train, "test": data.x_test}
        self._measurements = {}
        for i, split in enumerate(s.splits):
            x = splits[split]
            subsets = draw_subsets(len(x), s.num_subsets, s.subset_size, seed=s.seed + 1000 * i)
            self._measurements[split] = Measurement(ntk, x, subsets)
        tracking.log_json_artifact(self.client, self.run_id, self.settings.to_dict(), SETTINGS_ARTIFACT)

    # -- per checkpoint ---------------------------------------------------------------------

    def pending_epochs(self) -> list[int]:
        """Complete CV checkpoints whose metrics are not in the run yet."""
        done = tracking.logged_steps(self.client, self.run_id, metric_key("entropy", self.settings.splits[0]))
        return [e for e in self.store.cv_epochs() if e not in done]

    def analyze_epoch(self, epoch: int) -> dict[str, float] | None:
        """Measure one checkpoint and log its variables; None (with a warning) if it is unreadable."""
        if self._measurements is None:
            self._setup()
        try:
            variables = self.store.restore_cv(epoch, self.abstract)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {epoch}: {err}", RuntimeWarning, stacklevel=2)
            return None
        metrics, spectra = {}, {}
        for split, measurement in self._measurements.items():
            for name, value in measurement.run(variables):
                metrics[metric_key(name, split)] = value
            spectra[split] = measurement.last_spectra
        self._log_spectra(epoch, spectra)
        tracking.log_metrics(self.client, self.run_id, metrics, epoch)  # the commit point
        return metrics

    def _log_spectra(self, epoch: int, spectra: dict[str, np.ndarray]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"epoch_{epoch:06d}.npz")
            np.savez(path, **spectra)
            self.client.log_artifact(self.run_id, path, "analysis/spectra")

    # -- the loop ---------------------------------------------------------------------------

    def run(self, follow: bool = False, poll_seconds: float = 10.0, progress: bool = True) -> list[int]:
        """Analyze every pending checkpoint; with `follow`, keep going while training runs."""
        analyzed: list[int] = []
        first = True
        while True:
            pending = self.pending_epochs()
            if first and not pending and not follow and not self.store.cv_epochs():
                raise tracking.RunError(
                    f"run {self.run_id} has no CV checkpoints under checkpoints/ to analyze "
                    "(was it trained with this version, and did it finish epoch 0?)"
                )
            first = False
            bar = tqdm(pending, desc=f"NTK {self.run_id[:8]}", unit="ckpt", disable=not progress)
            for epoch in bar:
                t0 = time.perf_counter()
                if self.analyze_epoch(epoch) is not None:
                    analyzed.append(epoch)
                bar.set_postfix(epoch=epoch, seconds=f"{time.perf_counter() - t0:.2f}")
            if not follow:
                break
            status = self.client.get_run(self.run_id).info.status
            if status != "RUNNING" and not self.pending_epochs():
                break
            time.sleep(poll_seconds)
        if analyzed:
            self.log_figure()
        return analyzed

    def log_figure(self) -> None:
        """The evolution figure (paper Figs. 1, 3): entropy, trace and loss against epoch."""
        from ntk_tracking.figures import evolution_figure

        histories = {}
        for variable in ("entropy", "trace"):
            for split in self.settings.splits:
                key = metric_key(variable, split)
                histories[key] = sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
        for split in SPLITS:
            key = f"{split}/loss"
            histories[key] = sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
        fig = evolution_figure(histories, self.settings.splits, title=f"{self.config.task} · run {self.run_id[:8]}")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "evolution.png")
            fig.savefig(path, dpi=120, bbox_inches="tight")
            self.client.log_artifact(self.run_id, path, "analysis")
        import matplotlib.pyplot as plt

        plt.close(fig)


def analyze_run(run_id: str, settings: AnalysisSettings | None = None, follow: bool = False,
                poll_seconds: float = 10.0, progress: bool = True) -> list[int]:
    """Analyze run `run_id`; returns the checkpoint epochs analyzed by this call."""
    return Analyzer(run_id, settings or AnalysisSettings()).run(follow, poll_seconds, progress)
