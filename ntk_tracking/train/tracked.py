"""A tracked training run: MLflow run, config artifact, CV and resume checkpoints, resumption."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import mlflow

from ntk_tracking import run_inputs, system_metrics, tracking
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.claims import TTL_SECONDS, Claim, Held

from ntk_tracking.keys import KIND_TAG as RUN_KIND_TAG, TASK_TAG


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
    claim = (claim or _claim_training(client, run_id)).start_heartbeat()
    try:
        _train_in_run(client, run_id, task, config, dataset, progress, resume_interval_seconds or None)
        claim.release()
        mlflow.end_run()
    except BaseException as err:
        _quietly(claim.release)
        lost = not isinstance(err, KeyboardInterrupt) and _server_lost()
        if not lost:
            _quietly(client.set_tag, run_id, "error", tracking.redact(f"{type(err).__name__}: {err}")[:5000])
        _quietly(mlflow.end_run, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if lost:
            raise TrackingServerLost(
                f"lost the tracking server {tracking.redact_uri(mlflow.get_tracking_uri())} while training "
                f"run {run_id} ({tracking.redact(f'{type(err).__name__}: {err}')[:300]}). Training "
                "stopped; every epoch whose metrics and checkpoints reached the server is kept. Once "
                f"the server is back, continue the run with MLFLOW_RUN_ID={run_id} and the same command "
                f"(or `mlflow run . -e {config.task} --run-id {run_id}`): it resumes from its last resume "
                "checkpoint and logs no epoch twice") from None
        raise
    return run_id


def _default_experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def _claim_training(client, run_id: str):
    """The run's training claim (one trainer per run), or RunError naming the live trainer."""
    try:
        return Claim.acquire(client, run_id, "training")
    except Held as held:
        raise tracking.RunError(
            f"run {run_id} is being trained by another process ({held.owner}; its heartbeat keeps the claim "
            f"until {time.strftime('%H:%M:%S', time.localtime(held.expires))} unless renewed): a second trainer "
            "is refused. Wait for it to finish, or, if it was killed, relaunch once its claim has expired "
            f"(at most {TTL_SECONDS:.0f} s after its last heartbeat)") from None


class TrackingServerLost(tracking.RunError):
    """The tracking server stopped answering during training (the run can be relaunched)."""


def _server_lost() -> bool:
    """After a failure: whether an http(s) tracking server has stopped answering."""
    if not tracking.is_http_uri(mlflow.get_tracking_uri()):
        return False
    try:
        tracking.check_reachable(timeout=3.0)
    except ValueError:
        return True
    return False


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
        mlflow.set_tags({RUN_KIND_TAG: "training", TASK_TAG: config.task})
        tracking.log_json_artifact(client, run_id, dataclasses.asdict(config), tracking.CONFIG_ARTIFACT)
        tracking.log_json_artifact(client, run_id, task.data_info(dataset), "data.json")
        run_inputs.log_training_data(client, run_id, config, dataset, task.data_info(dataset))

    store = CheckpointStore(run_id, client, resume_interval_seconds=resume_interval_seconds)
    state = task.init_state(config, dataset)
    logged = tracking.logged_steps(client, run_id, task.loss_metrics[0])
    start_epoch = 0
    resumed = store.latest_resume(jax.eval_shape(lambda: state))
    if resumed is not None:
        state, meta = resumed
        start_epoch = int(meta["epoch"])
        if start_epoch not in logged:  # killed between the resume save and the metric log
            tracking.log_metrics(client, run_id, meta["metrics"], start_epoch)
            logged.add(start_epoch)
        print(f"resuming run {run_id} after epoch {start_epoch}")
    cv_epochs = set(config.cv_epochs())
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    diverged = [client.get_run(run_id).data.tags.get(tracking.DIVERGED_TAG)]

    def on_epoch(epoch, state, metrics):
        if "train/loss" in metrics and not diverged[0]:  # flag it in the run, once
            losses.setdefault(epoch, float(metrics["train/loss"]))
            diverged[0] = tracking.divergence(list(losses.items()))
            if diverged[0]:
                client.set_tag(run_id, tracking.DIVERGED_TAG, diverged[0])
                print(f"warning: run {run_id} diverged: {diverged[0]}", file=sys.stderr)
        if epoch in cv_epochs:
            store.save_cv(epoch, task.cv_variables(state))
        store.save_resume(epoch, state, {"epoch": epoch, "metrics": metrics}, force=epoch == config.epochs)
        if epoch not in logged:  # a resumed run repeats no logged epoch
            tracking.log_metrics(client, run_id, metrics, epoch)

    try:
        with system_metrics.sampled(run_id):
            task.fit(config, dataset, state, start_epoch, on_epoch, progress=progress)
    finally:
        store.close()  # waits for pending saves and uploads
