"""A tracked training run: MLflow run, config artifact, CV and resume checkpoints, resumption."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import mlflow

from ntk_tracking import run_inputs, system_metrics, tracking
from ntk_tracking.checkpointing import CheckpointError, CheckpointStore
from ntk_tracking.claims import TTL_SECONDS, Claim, Held, clean_up

from ntk_tracking.keys import (DIVERGED_TAG, EPOCH_METRIC, KIND_TAG, STEP_UNIT_TAG, STEPS_PER_EPOCH_TAG, TASK_TAG,
                               TRAIN_LOSS)
from ntk_tracking.models import INIT_SCALED_LEAVES
from ntk_tracking.train.loop import StepCadence


def _check_same_config(saved: dict, config) -> None:
    current = dataclasses.asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()))
        raise tracking.RunError(
            f"this run was started with other parameters ({detail}); relaunch it with the "
            "original parameters to resume, or start a new run"
        )


RESUME_INTERVAL_SECONDS = 60  # a killed run loses at most about this much training, plus one epoch


def run_training(task, config, dataset, progress: bool = True, experiment: str | None = None,
                 resume_interval_seconds: int | None = RESUME_INTERVAL_SECONDS) -> str:
    """Train `task` with `config` on `dataset` inside an MLflow run (resuming it if it has a resume checkpoint).

    Under `mlflow run` (MLFLOW_RUN_ID set) the launched run is used; relaunching with
    `--run-id` continues a killed run from its latest resume checkpoint. The resume checkpoint
    is written at most once per `resume_interval_seconds` (None or 0: every epoch) and always
    after the last epoch; a resumed run replays the epochs since it, which training's
    determinism (data order and randomness are functions of seed and epoch) makes identical.
    """
    # The experiment by id, not mlflow.set_experiment: that would also set MLFLOW_EXPERIMENT_ID in
    # this process's environment, where it would outlive the call.
    experiment_id = tracking.experiment_id(experiment) if experiment else None
    client = tracking.client()
    # A relaunch (MLFLOW_RUN_ID) is checked and claimed before mlflow.start_run touches the run, so a
    # refusal leaves its status and tags as they were.
    relaunched = os.environ.get("MLFLOW_RUN_ID")
    claim = None
    if relaunched:
        tracking.check_artifacts_writable(client.get_run(relaunched).info.artifact_uri)
        saved = tracking.load_json_artifact(relaunched, tracking.CONFIG_ARTIFACT)
        if saved is not None:  # fields added since the run started take their defaults
            _check_same_config(dataclasses.asdict(task.config_from_dict(saved)), config)
        claim = _claim_training(client, relaunched)
    else:
        location = client.get_experiment(experiment_id or _default_experiment_id()).artifact_location
        tracking.check_artifacts_writable(location)
    # A launched or resumed run keeps its name; a new one is named by its architecture.
    name = None if relaunched else task.run_name(config)
    try:
        # System metrics come from our own sampler (system_metrics.sampled), not MLflow's monitor.
        run_id = mlflow.start_run(run_name=name, experiment_id=experiment_id, log_system_metrics=False).info.run_id
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    try:  # from here on the run exists: whatever stops it ends it KILLED or FAILED, never RUNNING
        claim = (claim or _claim_training(client, run_id)).start_heartbeat()
        _train_in_run(client, run_id, task, config, dataset, progress, resume_interval_seconds or None)
        claim.release()
        mlflow.end_run()
    except BaseException as err:
        if claim is not None:
            _quietly(claim.release)
        lost = not isinstance(err, KeyboardInterrupt) and tracking.server_lost()
        if not lost:
            _quietly(client.set_tag, run_id, "error", tracking.redact(f"{type(err).__name__}: {err}")[:5000])
        _quietly(mlflow.end_run, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if isinstance(err, KeyboardInterrupt):
            raise TrainingInterrupted(run_id) from None
        if lost:
            cause = " ".join(tracking.redact(f"{type(err).__name__}: {err}").split())[:300]
            raise TrackingServerLost(
                f"lost the tracking server {tracking.redact_uri(mlflow.get_tracking_uri())} while training "
                f"run {run_id} ({cause}); training stopped, and every epoch whose metrics and checkpoints "
                "reached the server is kept", run_id) from None
        if isinstance(err, CheckpointError):
            raise CheckpointsNotWritten(str(err), run_id) from None
        raise
    return run_id


def _default_experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def _claim_training(client, run_id: str):
    """The run's training claim (one trainer per run), or RunError naming the live trainer."""
    clean_up(client, run_id)  # claims and records a process that lost the store left behind
    try:
        return Claim.acquire(client, run_id, "training")
    except Held as held:
        raise tracking.RunError(
            f"run {run_id} is being trained by another process ({held.owner}; its heartbeat keeps the claim "
            f"until {time.strftime('%H:%M:%S', time.localtime(held.expires))} unless renewed): a second trainer "
            "is refused. Wait for it to finish, or, if it was killed, relaunch once its claim has expired "
            f"(at most {TTL_SECONDS:.0f} s after its last heartbeat)") from None


class TrainingStopped(tracking.RunError):
    """Training stopped part-way for a cause outside it; relaunching the run resumes it."""

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


class TrackingServerLost(TrainingStopped):
    """The tracking server stopped answering during training."""


class CheckpointsNotWritten(TrainingStopped):
    """The artifact store stopped accepting checkpoints during training."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the run is marked KILLED and can be resumed."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


def _quietly(call, *args) -> None:
    """A best-effort tracking call while handling an error (the store may be gone)."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _train_in_run(client, run_id: str, task, config, dataset, progress: bool,
                  resume_interval_seconds: int | None) -> None:
    # A relaunch's config was compared with this one before the run was touched (run_training).
    if tracking.load_json_artifact(run_id, tracking.CONFIG_ARTIFACT) is None:
        params = client.get_run(run_id).data.params  # `mlflow run` logs its own first
        missing = {k: v for k, v in dataclasses.asdict(config).items() if k not in params}
        mlflow.log_params(missing)
        tags = {KIND_TAG: "training", TASK_TAG: config.task, STEP_UNIT_TAG: task.step_unit(config)}
        if config.step_checkpoints:
            tags[STEPS_PER_EPOCH_TAG] = str(task.steps_per_epoch(config, dataset))
        mlflow.set_tags(tags)
        tracking.log_json_artifact(client, run_id, dataclasses.asdict(config), tracking.CONFIG_ARTIFACT)
        tracking.log_json_artifact(client, run_id, task.data_info(dataset), "data.json")
        run_inputs.log_training_data(client, run_id, config, dataset, task.data_info(dataset))

    store = CheckpointStore(run_id, client, resume_interval_seconds=resume_interval_seconds)
    model = task.build_model(config, dataset)  # once: training's init_state and fit share it
    state = task.init_state(config, dataset, model)
    # Every logged batch holds `epoch` (runs before it existed: the loss), so a replayed step is never logged twice.
    logged = (tracking.logged_steps(client, run_id, EPOCH_METRIC)
              | tracking.logged_steps(client, run_id, task.loss_metrics[0]))
    start_epoch = start_step = 0
    resumed = store.latest_resume(jax.eval_shape(lambda: state))
    if resumed is not None:
        state, meta = resumed
        start_epoch = int(meta["epoch"])
        start_step = int(meta.get("step", start_epoch))
        if start_step not in logged:  # killed between the resume save and the metric log
            tracking.log_metrics(client, run_id, {**meta["metrics"], EPOCH_METRIC: float(start_epoch)}, start_step)
            logged.add(start_step)
        print(f"resuming run {run_id} after epoch {start_epoch}")
    elif config.init_scale != 1:
        check_init_scale(task, config, dataset, model, state)
    cv_epochs = set(config.cv_epochs())
    losses = {m.step: m.value for m in client.get_metric_history(run_id, TRAIN_LOSS)}
    diverged = [client.get_run(run_id).data.tags.get(DIVERGED_TAG)]

    def on_point(step, epoch, state, metrics, epoch_end):
        """At every epoch's end (step = epoch, or the optimizer step with step checkpoints) and
        at every step checkpoint inside an epoch (epoch fractional)."""
        if TRAIN_LOSS in metrics and not diverged[0]:  # flag it in the run, once
            losses.setdefault(step, float(metrics[TRAIN_LOSS]))
            diverged[0] = tracking.divergence(list(losses.items()))
            if diverged[0]:
                client.set_tag(run_id, DIVERGED_TAG, diverged[0])
                print(f"warning: run {run_id} diverged: {diverged[0]}", file=sys.stderr)
        if (epoch_end and int(epoch) in cv_epochs) or step in step_stops:
            store.save_cv(step, task.cv_variables(state))
        if epoch_end:
            store.save_resume(step, state, {"epoch": int(epoch), "step": step, "metrics": metrics},
                              force=epoch == config.epochs)
        if step not in logged:  # a resumed run repeats no logged step
            tracking.log_metrics(client, run_id, {**metrics, EPOCH_METRIC: epoch}, step)

    step_stops: set[int] = set()
    on_epoch = lambda epoch, state, metrics: on_point(epoch, float(epoch), state, metrics, True)  # noqa: E731
    if config.step_checkpoints:
        step_stops = set(config.cv_optimizer_steps(task.steps_per_epoch(config, dataset)))
        on_epoch = StepCadence(tuple(sorted(step_stops)), start_step, on_point)

    try:
        with system_metrics.sampled(run_id):
            task.fit(config, dataset, model, state, start_epoch, on_epoch, progress=progress)
    finally:
        store.close()  # waits for pending saves and uploads


def check_init_scale(task, config, dataset, model, state) -> None:
    """--init-scale is applied by each task's init_state (models.scale_initial_params): prove it
    was, against the same initialization at scale 1, so a task that ignores the option fails
    loudly instead of training at the default scale under a scaled run's name."""
    import numpy as np

    reference = task.cv_variables(task.init_state(dataclasses.replace(config, init_scale=1.0), dataset, model))
    got = dict(jax.tree_util.tree_flatten_with_path(task.cv_variables(state))[0])
    scaled = 0
    for path, want in jax.tree_util.tree_flatten_with_path(reference)[0]:
        name = getattr(path[-1], "key", None)
        factor = config.init_scale if name in INIT_SCALED_LEAVES and any(
            getattr(p, "key", None) == "params" for p in path) else 1.0
        scaled += factor != 1.0
        if path not in got or not np.allclose(np.asarray(got[path]), factor * np.asarray(want), rtol=1e-6, atol=0):
            raise RuntimeError(
                f"task {task.name!r} does not apply --init-scale {config.init_scale:g} to "
                f"{jax.tree_util.keystr(path)}: its init_state must pass the new network's params through "
                "ntk_tracking.models.scale_initial_params(params, config.init_scale)")
    if not scaled:
        raise RuntimeError(f"--init-scale {config.init_scale:g} has nothing to scale: task {task.name!r}'s "
                           f"network has no {' or '.join(INIT_SCALED_LEAVES)} parameter")
