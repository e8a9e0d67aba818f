"""MLflow plumbing shared by training and analysis: runs, JSON artifacts, metric history."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

CONFIG_ARTIFACT = "config.json"
# Small JSON downloads should not draw progress bars over the training bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class RunError(ValueError):
    """A run that cannot be used as asked (unknown id, not ours, no checkpoints…)."""


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def get_run(run_id: str, mlflow_client=None):
    """The run, or RunError naming the tracking store that lacks it."""
    mlflow_client = mlflow_client or client()
    try:
        return mlflow_client.get_run(run_id)
    except MlflowException as err:
        raise RunError(
            f"no MLflow run with id {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
            "(set MLFLOW_TRACKING_URI to the store that holds it)"
        ) from err


def download_artifact(run_id: str, path: str, dst: str) -> str | None:
    """The run's artifact `path` copied under `dst`, or None if it does not exist."""
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst)
    except (MlflowException, OSError):
        return None


def load_json_artifact(run_id: str, path: str) -> dict | None:
    """A JSON artifact of the run, or None if it does not exist."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        if local is None:
            return None
        with open(local) as f:
            return json.load(f)


def log_json_artifact(mlflow_client, run_id: str, data: dict, path: str) -> None:
    """Write `data` as the artifact `path` of the run (replacing an earlier version)."""
    directory, name = os.path.split(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        mlflow_client.log_artifact(run_id, local, directory or None)


def logged_steps(mlflow_client, run_id: str, key: str) -> set[int]:
    """The steps at which `key` has been logged in the run."""
    return {m.step for m in mlflow_client.get_metric_history(run_id, key)}


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log a dict of metrics at one step in a single batch (all of them or, on failure, none)."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    mlflow_client.log_batch(run_id, metrics=batch, synchronous=True)


def fail_launched_run(message: str) -> None:
    """Under `mlflow run` the run exists before our code: end it FAILED with the reason on it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        c = client()
        c.set_tag(run_id, "error", message[:5000])
        c.set_terminated(run_id, "FAILED")
    except MlflowException as err:  # the store is unreachable: say so, the error still exits
        warnings.warn(f"could not mark run {run_id} FAILED: {err}", RuntimeWarning, stacklevel=2)
