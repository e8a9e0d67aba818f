"""The post-hoc analyzer: restore a run's CV checkpoints and log the NTK's collective variables.

Rebuilds the task's data and probe from the run's config.json (big_vision's eval_only pattern),
draws the measurement subsets once, and logs `ntk/[<network>/]<variable>/<set>` at step =
checkpoint epoch. A checkpoint counts as analyzed once its metrics are in the run (one atomic
batch per checkpoint), so reruns skip it and a kill loses at most the checkpoint in progress.
The analyzer knows no model kind: everything model-specific comes from `ntk_tracking.tasks`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from ntk_tracking import run_inputs, system_metrics, tracking
from ntk_tracking.confine import check_data_paths, looks_like_path
from ntk_tracking.costs import CostEstimate
from ntk_tracking.checkpointing import CheckpointError, CheckpointStore
from ntk_tracking.claims import (TTL_SECONDS, Claim, Held, clean_up, describe, holder, log_points_once, record_once,
                                 recorded)
from ntk_tracking.ntk import IMPLEMENTATIONS, NTK, Measurement, check_against_ntvp, draw_subsets
from ntk_tracking.ntk.kernel import DEFAULT_MEMORY_BUDGET, num_points
from ntk_tracking.ntk.measure import NonFiniteKernel
from ntk_tracking.tasks import task_names, ProbeContext, get_task
from ntk_tracking.keys import DIVERGED_TAG, EPOCH_METRIC, PRIMARY_NETWORK, STEPS_PER_EPOCH_TAG, TRAIN_LOSS, metric_key

AUTO_SPLITS = ("auto",)  # the task's own probe sets
SETTINGS_ARTIFACT = "analysis/settings.json"


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """How the kernel is measured: K subsets of m points per probe set (paper: 200 of 20)."""

    num_subsets: int = 20
    subset_size: int = 20
    splits: tuple[str, ...] = AUTO_SPLITS
    seed: int = 0
    implementation: str = "auto"
    memory_budget: int | None = None  # bytes; None = the engine's default

    def validate(self) -> "AnalysisSettings":
        if self.subset_size < 2:
            raise ValueError(f"points per subset (m) must be ≥ 2 for an entropy, got {self.subset_size}")
        if self.num_subsets < 1:
            raise ValueError(f"subsets (K) must be ≥ 1, got {self.num_subsets}")
        if not self.splits:
            raise ValueError("splits must name at least one probe set (or 'auto' for the task's own)")
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


HELD_WAIT_SECONDS = 900.0  # how long a checkpoint held by another live analyzer is waited for
STALL_SECONDS = 300.0  # --follow: a trainer silent this long (no checkpoint, no heartbeat) has stopped


class TrainerStopped(tracking.RunError):
    """--follow found a RUNNING run whose trainer stopped writing."""


@dataclasses.dataclass
class AnalysisReport:
    """What one analysis did besides logging: each problem as one line keyed by epoch."""

    analyzed: list[int] = dataclasses.field(default_factory=list)
    already: list[int] = dataclasses.field(default_factory=list)  # done before this analysis started
    skipped: list[int] = dataclasses.field(default_factory=list)  # logged by another analyzer meanwhile
    held: dict[int, str] = dataclasses.field(default_factory=dict)  # still held by another live analyzer
    damaged: dict[int, str] = dataclasses.field(default_factory=dict)
    missing: dict[int, str] = dataclasses.field(default_factory=dict)
    nonfinite: dict[int, str] = dataclasses.field(default_factory=dict)
    unverified: list[int] = dataclasses.field(default_factory=list)

    def failed(self) -> set[int]:
        return set(self.damaged) | set(self.nonfinite)

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.nonfinite)

    def summary(self) -> str:
        parts = [f"{len(v)} {name} (epoch{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))})"
                 for name, v in (("damaged", self.damaged), ("missing", self.missing),
                                 ("non-finite", self.nonfinite)) if v]
        return "skipped: " + ", ".join(parts) if parts else ""


def check_sizes(settings: AnalysisSettings, probe_sets: dict, networks: int) -> None:
    """Before any subset is drawn: m fits each probe set, K is at most its number of distinct
    m-point subsets, and the measured points and kernels fit the memory budget (the kernel
    engine's own blocks stay within it separately). The refusal says what fits."""
    k, m = settings.num_subsets, settings.subset_size
    budget = settings.memory_budget or DEFAULT_MEMORY_BUDGET
    per_subset = 0  # bytes one subset costs: its points (and output mask), its kernels, its spectrum
    for split, probe_set in probe_sets.items():
        n = num_points(probe_set.inputs)
        if m > n:
            raise ValueError(f"--points {m} exceeds the {n} points of probe set {split!r}: m must be ≤ {n}")
        if k > math.comb(n, m):
            raise ValueError(f"--subsets {k} with --points {m} asks for K·m = {k * m:,} points from the {n} of probe "
                             f"set {split!r}, which has only {math.comb(n, m):,} distinct subsets of {m}: K must be "
                             f"≤ {math.comb(n, m):,}")
        point = sum(np.asarray(leaf)[0].nbytes for leaf in jax.tree_util.tree_leaves(
            (probe_set.inputs, probe_set.output_mask)))
        per_subset += networks * (m * point + m * m * (4 + 8) + m * 8)
    if k * per_subset > budget:
        raise ValueError(
            f"--subsets {k} of --points {m} need about {k * per_subset / 2**20:,.0f} MiB for the measured points "
            f"and kernels, over the memory budget of {budget / 2**20:,.0f} MiB (--memory-budget-mb): at most "
            f"{budget // per_subset:,} subsets of {m} points fit")


def _other_settings(run_id: str, recorded: dict) -> ValueError:
    return ValueError(f"run {run_id} was analyzed with other settings {recorded}; rerun with those settings "
                      "(metrics of two protocols must not mix in one history)")


class Analyzer:
    """The collective variables of one training run, checkpoint by checkpoint."""

    def __init__(self, run_id: str, settings: AnalysisSettings, mlflow_client=None,
                 data_paths: tuple[str, ...] = (), data: str | None = None):
        """`data_paths`: files or folders a run's config may name as data besides the trusted
        places (see ntk_tracking.confine); `data`: read the dataset from here instead of the
        recorded one (it must hold the same data: sizes are compared with the run's data.json)."""
        settings = settings.validate()
        self.client = mlflow_client or tracking.client()
        self.run_id = run_id
        tracking.check_artifacts_writable(tracking.get_run(run_id, self.client).info.artifact_uri)
        saved = tracking.load_json_artifact(run_id, tracking.CONFIG_ARTIFACT)
        if saved is None:
            raise tracking.RunError(
                f"run {run_id} has no {tracking.CONFIG_ARTIFACT}: it was not made by an "
                "ntk_tracking training entry point, so there is no model to rebuild"
            )
        if saved.get("task") not in task_names():
            raise tracking.RunError(
                f"run {run_id} trained a {saved.get('task')!r} model, which this analyzer does not "
                f"support (it knows {list(task_names())})"
            )
        self.task = get_task(saved["task"])
        self.config = self.task.config_from_dict(saved)
        if data:
            self.config = dataclasses.replace(self.config, dataset=data)
            data_paths = (*data_paths, data)
        check_data_paths(self.config, data_paths, run_id)
        self._check_data_exists(data)
        known = self.task.default_probe_sets()
        if tuple(settings.splits) == AUTO_SPLITS:
            settings = dataclasses.replace(settings, splits=tuple(known))
        bad = [s for s in settings.splits if s not in known]
        if bad:
            raise ValueError(f"{self.config.task} has the probe sets {list(known)}; unknown: {bad}")
        self.settings = settings
        previous = tracking.load_json_artifact(run_id, SETTINGS_ARTIFACT)
        if previous is not None:
            previous = {k: v for k, v in previous.items() if k in self.settings.to_dict()}
        if previous is not None and previous != self.settings.to_dict():
            raise _other_settings(run_id, previous)
        self._check_recorded_settings()
        self.store = CheckpointStore(run_id, self.client)
        clean_up(self.client, run_id)  # claims and records a process that lost the store left behind
        self.report = AnalysisReport()
        self._data_override = data
        self._measurements = None
        self.held: dict[int, Held] = {}
        self.check: dict | None = None
        # Called with what runs now (loading data, compiling, checking the engine, logging):
        # the progress bar shows it, so a first checkpoint that takes minutes says why.
        self.on_stage: Callable[[str], None] = lambda text: None

    def _check_data_exists(self, override: str | None) -> None:
        value = self.config.dataset
        if looks_like_path(value) and not os.path.exists(os.path.expanduser(value)):
            if override:
                raise ValueError(f"--data {value!r}: no such file or folder")
            raise tracking.RunError(
                f"run {self.run_id} was trained on {value!r}, which does not exist on this machine; pass "
                f"the data's location here with --data PATH (ntk-tracking analyze {self.run_id} --data PATH; "
                f"mlflow run . -e analyze -P run_id={self.run_id} -P data=PATH)")

    def _check_same_data(self) -> None:
        """With --data: the data read must be the data trained on (every number of data.json equal:
        sizes, vocabularies, normalization statistics)."""
        recorded = tracking.load_json_artifact(self.run_id, "data.json")
        if recorded is None:
            return
        now = dict(_numbers(json.loads(json.dumps(self.task.data_info(self.data)))))
        differ = {k: (v, now[k]) for k, v in _numbers(recorded)
                  if k in now and not math.isclose(v, now[k], rel_tol=1e-6, abs_tol=1e-9)}
        if differ:
            detail = ", ".join(f"{k}: trained on {a:g}, now {b:g}" for k, (a, b) in sorted(differ.items())[:4])
            raise ValueError(f"the data at --data {self.config.dataset!r} is not what run {self.run_id} "
                             f"trained on ({detail}); pass the file or folder it was trained on")

    # -- setup, once per run ----------------------------------------------------------------

    def _context(self) -> ProbeContext:
        return ProbeContext(
            run_id=self.run_id, cv_epochs=self.store.cv_epochs(),
            restore=lambda epoch: self.store.restore_cv(epoch, self.abstract),
            load_arrays=self._load_arrays, save_arrays=self._save_arrays,
            metric_history=lambda key: sorted(
                (m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)),
        )

    def _load_arrays(self, path: str) -> dict | None:
        with tempfile.TemporaryDirectory() as tmp:
            local = tracking.download_artifact(self.run_id, path, tmp)
            if local is None:
                return None
            with np.load(local, allow_pickle=False) as npz:  # never unpickle a run's files
                return {k: npz[k] for k in npz.files}

    def _save_arrays(self, path: str, arrays: dict) -> None:
        directory, name = os.path.split(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            np.savez(local, **arrays)
            self.client.log_artifact(self.run_id, local, directory or None)

    def _setup(self):
        cfg, s = self.config, self.settings
        self.data = self.task.load_data(cfg)
        if self._data_override:
            self._check_same_data()
        self.model = self.task.build_model(cfg, self.data)  # once: checkpoints, probe and figures share it
        self.abstract = self.task.abstract_variables(cfg, self.data, self.model)
        probe = self.task.probe(cfg, self.data, self.model, self._context())
        check_sizes(s, {split: probe.sets[split] for split in s.splits}, len(probe.networks))  # before any write
        run_inputs.log_probe_sets(self.client, self.run_id, cfg, {split: probe.sets[split] for split in s.splits},
                                  self.task.data_info(self.data))
        self.networks = {name: NTK(fn, s.implementation, s.memory_budget) for name, fn in probe.networks.items()}
        self._measurements = {}
        for i, split in enumerate(s.splits):
            probe_set = probe.sets[split]
            n = num_points(probe_set.inputs)
            subsets = draw_subsets(n, s.num_subsets, s.subset_size, seed=s.seed + 1000 * i)
            for name, ntk in self.networks.items():
                self._measurements[name, split] = Measurement(ntk, probe_set.inputs, subsets, probe_set.output_mask)
        self._record_settings()
        self._write_settings()

    def _record_settings(self) -> None:
        """The run's protocol, recorded once and for all by the first analyzer to log."""
        value = json.loads(record_once(self.client, self.run_id, "settings",
                                       json.dumps(self.settings.to_dict(), sort_keys=True)))
        if value != self.settings.to_dict():
            raise _other_settings(self.run_id, value)

    def _write_settings(self) -> None:
        document = self.settings.to_dict()
        if self.check is not None:
            document["check"] = self.check
        tracking.log_json_artifact(self.client, self.run_id, document, SETTINGS_ARTIFACT)

    def _check_engine(self, variables) -> None:
        """On the run's first checkpoint: the first subset's kernel, as the measurement computed
        it, against ntvp on the same points.

        A fast path that disagrees beyond float32 round-off stops the analysis before any
        number is logged (NTKMismatchError names both values)."""
        results = {}
        for (name, split), measurement in self._measurements.items():
            if name in results:
                continue
            results[name] = check_against_ntvp(measurement.ntk, variables, measurement.inputs[0],
                                               measurement.masks[0], raise_on_mismatch=True,
                                               kernel=measurement.last_kernels[0], from_subsets=True)
        self.check = results if len(results) > 1 else results[next(iter(results))]
        self._write_settings()

    def _implementation(self) -> str:
        ntk = next(iter(self._measurements.values())).ntk
        return ntk.implementation if ntk.implementation != "auto" else "fast-path"

    # -- per checkpoint ---------------------------------------------------------------------

    def marker_key(self) -> str:
        """The metric whose steps say which checkpoints are analyzed (logged in the same batch)."""
        return metric_key(next(iter(self._network_names())), "entropy", self.settings.splits[0])

    def _network_names(self) -> list[str]:
        if self._measurements is not None:
            return list(dict.fromkeys(name for name, _ in self._measurements))
        return list(self.task.network_names(self.config))

    def pending_epochs(self) -> list[int]:
        """Complete CV checkpoints whose metrics are not in the run yet."""
        done = tracking.logged_steps(self.client, self.run_id, self.marker_key())
        return [e for e in self.store.cv_epochs() if e not in done]

    def analyze_epoch(self, epoch: int) -> dict[str, float] | None:
        """Measure one checkpoint and log its variables under a claim on it; None when another
        analyzer holds it (`self.held[epoch]` says who) or finished it first. CheckpointError (one
        line) for a damaged or missing step, NonFiniteKernel for a kernel with NaN/Inf: neither is
        logged. The points are logged once whatever pauses where (claims.log_points_once)."""
        if self._measurements is None:
            self.on_stage("loading data and probe sets")
            self._setup()
        try:
            claim = Claim.acquire(self.client, self.run_id, f"analysis/{epoch}").start_heartbeat()
        except Held as held:
            self.held[epoch] = held
            return None
        self.held.pop(epoch, None)
        try:
            if epoch in tracking.logged_steps(self.client, self.run_id, self.marker_key()):
                return None  # another analyzer finished it before we claimed it
            recorded_points = recorded(self.client, self.run_id, f"points/{epoch}")
            if recorded_points is not None:  # measured by a writer that stopped before logging them
                self.on_stage(f"epoch {epoch}: logging the points another analyzer recorded")
                metrics = json.loads(recorded_points)["metrics"]
                log_points_once(self.client, self.run_id, f"points/{epoch}", metrics, epoch)
                return metrics
            self.on_stage(f"epoch {epoch}: restoring")
            variables = self.store.restore_cv(epoch, self.abstract)
            metrics, spectra = {}, {}
            for (network, split), measurement in self._measurements.items():
                compiling = "compiling and " if measurement.last_kernels is None else ""
                self.on_stage(f"epoch {epoch}: {compiling}measuring {network} on {split}")
                for name, value in measurement.run(variables):
                    metrics[metric_key(network, name, split)] = value
                spectra[split if network == PRIMARY_NETWORK else f"{network}.{split}"] = measurement.last_spectra
            bad = sorted(k for k, v in metrics.items()
                         if not math.isfinite(v) and k.split("/")[-2] in ("entropy", "trace"))
            if bad:
                raise NonFiniteKernel(f"{', '.join(bad)} came out NaN or Inf")
            if self.check is None:
                self.on_stage(f"epoch {epoch}: checking the {self._implementation()} kernel against ntvp")
                self._check_engine(variables)
            self._check_recorded_settings()
            if not claim.holds():  # expired while we measured (a stall) and taken over: its taker logs
                return None
            self.on_stage(f"epoch {epoch}: logging")
            # Artifacts first (rewriting one is harmless), the metrics last: the commit point.
            self._log_spectra(epoch, spectra)
            for path, fig in self.task.checkpoint_artifacts(self.config, self.data, self.model, variables, epoch):
                self._log_figure_file(fig, path)
            mine = log_points_once(self.client, self.run_id, f"points/{epoch}", metrics, epoch)
            return metrics if mine else None  # None: a writer that took it over recorded its points first
        finally:
            claim.release()

    def _check_recorded_settings(self) -> None:
        """At start and before each checkpoint is logged: the run's recorded protocol is ours
        (another analyzer with other settings may have recorded its own first)."""
        value = recorded(self.client, self.run_id, "settings")
        if value is not None and json.loads(value) != self.settings.to_dict():
            raise _other_settings(self.run_id, json.loads(value))

    def diverged(self) -> str | None:
        """How the run's training diverged (tagged by the trainer, or read from its loss), or None."""
        tag = self.client.get_run(self.run_id).data.tags.get(DIVERGED_TAG)
        return tag or tracking.divergence(self.history(TRAIN_LOSS))

    def _planned_checkpoints(self) -> int:
        """How many CV checkpoints the run's cadence writes in all (step checkpoints included)."""
        count = len(self.config.cv_epochs())
        if self.config.step_checkpoints:
            tags = self.client.get_run(self.run_id).data.tags
            count += len(self.config.cv_optimizer_steps(int(tags.get(STEPS_PER_EPOCH_TAG, "1"))))
        return count

    def expected_epochs(self) -> list[int]:
        """The CV epochs the run's cadence says exist by now (none while it trains)."""
        run = self.client.get_run(self.run_id)
        if run.info.status == "RUNNING":
            return []
        if self.config.step_checkpoints:  # the steps training reached, read from its `epoch` metric
            stops = set(self.config.cv_optimizer_steps(int(run.data.tags.get(STEPS_PER_EPOCH_TAG, "1"))))
            epochs = set(self.config.cv_epochs())
            return [s for s, e in self.history(EPOCH_METRIC) if s in stops or (e.is_integer() and int(e) in epochs)]
        if run.info.status == "FINISHED":
            return self.config.cv_epochs()
        logged = tracking.logged_steps(self.client, self.run_id, self.task.loss_metrics[0])
        last = max(logged, default=-1)
        return [e for e in self.config.cv_epochs() if e <= last]

    def _log_spectra(self, epoch: int, spectra: dict[str, np.ndarray]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"epoch_{epoch:06d}.npz")
            np.savez(path, **spectra)
            self.client.log_artifact(self.run_id, path, "analysis/spectra")

    def _log_figure_file(self, fig, artifact_path: str) -> None:
        import matplotlib.pyplot as plt

        directory, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            fig.savefig(local, dpi=120, bbox_inches="tight")
            self.client.log_artifact(self.run_id, local, directory or None)
        plt.close(fig)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, follow: bool = False, poll_seconds: float = 10.0, progress: bool = True,
            stall_seconds: float = STALL_SECONDS, held_wait_seconds: float = HELD_WAIT_SECONDS) -> list[int]:
        """_run, with the machine's system metrics sampled into the run (system/analysis/…) while it works."""
        busy = follow or bool(self.pending_epochs())
        if busy and self._measurements is None:  # a refused size or data check writes nothing, samples included
            self.on_stage("loading data and probe sets")
            self._setup()
        with system_metrics.sampled(self.run_id, node="analysis", busy=busy):
            return self._run(follow, poll_seconds, progress, stall_seconds, held_wait_seconds)

    def _run(self, follow: bool = False, poll_seconds: float = 10.0, progress: bool = True,
             stall_seconds: float = STALL_SECONDS, held_wait_seconds: float = HELD_WAIT_SECONDS) -> list[int]:
        """Analyze every pending checkpoint; with `follow`, keep going while training runs.

        Returns the epochs this call logged; `self.report` says what else happened (checkpoints
        another analyzer held, damaged, missing or non-finite ones). With `follow`, a trainer
        that wrote no checkpoint and no heartbeat for `stall_seconds` ends it (TrainerStopped).
        A checkpoint another live analyzer holds is waited for until it is logged or its claim
        expires and is taken over here, for at most `held_wait_seconds` (then `report.held`)."""
        report = self.report = AnalysisReport()
        report.already = sorted(set(self.store.cv_epochs())
                                & tracking.logged_steps(self.client, self.run_id, self.marker_key()))
        first, estimate = True, None
        seen, last_progress = set(), time.time()
        while True:
            pending = self.pending_epochs()
            if first and not pending and not follow and not self.store.cv_epochs():
                raise tracking.RunError(
                    f"run {self.run_id} has no CV checkpoints under checkpoints/ to analyze "
                    "(was it trained with this version, and did it finish epoch 0?)"
                )
            first = False
            bar = tqdm(pending, desc=f"NTK {self.run_id[:8]}", unit="ckpt", disable=not progress)
            if estimate is None and pending:  # said once, for every checkpoint the run will have
                planned = self._planned_checkpoints() - len(report.already) if follow else 0
                estimate = CostEstimate(max(len(pending), planned))
            self.on_stage = functools.partial(bar.set_postfix_str, refresh=True)
            for epoch in bar:
                t0 = time.perf_counter()
                if epoch in report.failed():
                    continue
                done = self._attempt(epoch)
                seconds = time.perf_counter() - t0
                bar.set_postfix(epoch=epoch, seconds=f"{seconds:.2f}")
                cost = estimate.after(seconds) if done else None
                if cost:
                    tqdm.write(f"NTK {self.run_id[:8]}: {cost}")
            self._wait_for_others(pending, held_wait_seconds)
            bar.close()
            self.on_stage = lambda text: None
            if not follow:
                break
            status = self.client.get_run(self.run_id).info.status
            if status != "RUNNING" and not [e for e in self.pending_epochs() if e not in report.failed()]:
                break
            epochs = set(self.store.cv_epochs())
            if epochs - seen:
                seen, last_progress = seen | epochs, time.time()
            elif status == "RUNNING" and holder(self.client, self.run_id, "training") is None \
                    and time.time() - last_progress > stall_seconds:
                raise TrainerStopped(
                    f"run {self.run_id} is marked RUNNING but its trainer stopped: no new checkpoint and no "
                    f"heartbeat for {time.time() - last_progress:.0f} s (limit {stall_seconds:.0f} s; was it "
                    f"killed?). The {len(report.analyzed)} checkpoint(s) it wrote are analyzed; resume training "
                    f"with MLFLOW_RUN_ID={self.run_id} and the same command, then analyze again")
            time.sleep(poll_seconds)
        done = tracking.logged_steps(self.client, self.run_id, self.marker_key())
        present = set(self.store.cv_epochs())
        report.missing = {e: f"epoch {e}: {self.store.location('cv', e)}: absent, though the run's cadence "
                             f"(every {self.config.cv_every}, plus log-spaced) says it was saved"
                          for e in self.expected_epochs() if e not in present and e not in done}
        for message in report.missing.values():
            tqdm.write(f"missing: {message}", file=sys.stderr)
        report.unverified = sorted(self.store.unverified)
        report.analyzed.sort()
        if report.analyzed:
            self.log_figure()
        return report.analyzed

    def _attempt(self, epoch: int) -> bool:
        """analyze_epoch, with a damaged checkpoint or a non-finite kernel named in the report;
        whether this call logged the checkpoint."""
        report = self.report
        try:
            if self.analyze_epoch(epoch) is not None:
                report.analyzed.append(epoch)
                return True
        except CheckpointError as err:
            if tracking.server_lost():  # a download that failed because the server went: not damage
                raise
            report.damaged[epoch] = str(err)
            tqdm.write(f"damaged: {err}", file=sys.stderr)
        except NonFiniteKernel as err:
            report.nonfinite[epoch] = f"epoch {epoch}: {err}; not logged (a rerun tries it again)"
            tqdm.write(f"non-finite: {report.nonfinite[epoch]}", file=sys.stderr)
        return False

    def _wait_for_others(self, epochs: list[int], limit: float) -> None:
        """Epochs of `epochs` this call did not log and no other analyzer has logged yet (held by a
        live one, or taken over from us after a stall): each is waited for until it is logged
        (`report.skipped`) or its claim can be taken here (then measured), for at most `limit`
        seconds; what is still held then goes to `report.held` as `HOST:PID until TIME`."""
        report, deadline = self.report, time.time() + limit
        while True:
            logged = tracking.logged_steps(self.client, self.run_id, self.marker_key())
            for epoch in [e for e in report.held if e in logged or e in report.analyzed]:
                del report.held[epoch]  # held in an earlier round of --follow, logged since
            waiting = [e for e in epochs if e not in logged and e not in report.analyzed and e not in report.failed()]
            report.skipped = sorted(set(report.skipped) | {e for e in epochs if e in logged
                                                           and e not in report.analyzed and e not in report.already})
            if not waiting or time.time() > deadline:
                break
            self.on_stage(f"waiting for {len(waiting)} checkpoint(s) held by another analyzer: epochs {waiting}")
            time.sleep(min(5.0, max(0.5, TTL_SECONDS / 8)))
            for epoch in waiting:
                self._attempt(epoch)
        for epoch in waiting:
            held = self.held.get(epoch)
            report.held[epoch] = (f"epoch {epoch}: held by {describe(held.owner, held.expires)}" if held else
                                  f"epoch {epoch}: taken over by another analyzer that has not logged it yet")

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_figure(self) -> None:
        """The evolution figure (paper Figs. 1, 3): entropy, trace and loss against epoch."""
        fig = self.task.evolution_figure(self.config, self.history, self._network_names(), self.settings.splits,
                                         title=f"{self.config.task} · run {self.run_id[:8]}")
        self._log_figure_file(fig, "analysis/evolution.png")


def _numbers(value, prefix: str = ""):
    """(dotted path, number) for every numeric leaf of a JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)
