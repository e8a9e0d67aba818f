"""MLflow plumbing shared by training and analysis: runs, JSON artifacts, metric history."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from urllib.parse import urlsplit, urlunsplit

import mlflow

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ntk_tracking.keys import TRAIN_LOSS

CONFIG_ARTIFACT = "config.json"
# Small JSON downloads should not draw progress bars over the training bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class RunError(ValueError):
    """A run that cannot be used as asked (unknown id, not ours, no checkpoints…)."""


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def experiment_id(name: str, mlflow_client=None) -> str:
    """The id of the experiment `name`, created if it does not exist (race-safe)."""
    mlflow_client = mlflow_client or client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise RunError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                             "or choose another --experiment")
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def get_run(run_id: str, mlflow_client=None):
    """The run, or RunError naming the tracking store that lacks it."""
    mlflow_client = mlflow_client or client()
    try:
        return mlflow_client.get_run(run_id)
    except MlflowException as err:
        raise RunError(
            f"no MLflow run with id {run_id!r} in the tracking store {redact_uri(mlflow.get_tracking_uri())} "
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


def check_artifacts_writable(artifact_uri: str | None) -> None:
    """RunError naming the folder if a local artifact store cannot be written (tried for real:
    permission bits do not bind root, a read-only file system or a file in the way do)."""
    from urllib.parse import urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path

    if not artifact_uri or urlparse(artifact_uri).scheme not in ("", "file"):
        return
    path = local_file_uri_to_path(artifact_uri)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ntk-write-check-"):
            pass
    except OSError as err:
        raise RunError(f"cannot write to the artifact store at {path} ({err.strerror or type(err).__name__}): "
                       "make it writable, or use a tracking store whose artifacts you can write") from None


EXPLODING_FACTOR = 1e6  # a loss this many times its first value (in magnitude) has diverged


def divergence(points: list[tuple[int, float]], key: str = TRAIN_LOSS) -> str | None:
    """How a loss history diverged (the first non-finite or exploding value), or None."""
    import math

    points = sorted(points)
    if not points:
        return None
    first = abs(points[0][1]) if math.isfinite(points[0][1]) else 0.0
    for step, value in points:
        if not math.isfinite(value):
            return f"{key} is {value} at step {step}"
        if abs(value) > EXPLODING_FACTOR * max(first, 1e-12):
            return f"{key} = {value:.3g} at step {step}, {abs(value) / max(first, 1e-12):.2g} times its first value"
    return None


def fail_launched_run(message: str) -> None:
    """Under `mlflow run` the run exists before our code: end it FAILED with the reason on it.

    Only a run this launch created: a relaunch of an existing training run (it has a config.json)
    that is refused leaves that run's status and tags as they were."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        c = client()
        if load_json_artifact(run_id, CONFIG_ARTIFACT) is not None:
            return
        c.set_tag(run_id, "error", redact(message)[:5000])
        c.set_terminated(run_id, "FAILED")
    except MlflowException as err:  # the store is unreachable: say so, the error still exits
        warnings.warn(f"could not mark run {run_id} FAILED: {redact(str(err))}", RuntimeWarning, stacklevel=2)


# -- the tracking server: credentials kept out of messages, short retries, reachability -----------

# MLflow's own defaults retry a dead server for minutes; unless the user chose, fail in seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
REACHABLE_TIMEOUT_SECONDS = 10.0
_SERVER_HINT = ("start one with `mlflow server --backend-store-uri sqlite:///mlflow.db "
                "--artifacts-destination ./mlartifacts --host 0.0.0.0 --port 5000` (see docs/reliability.md) "
                "or point MLFLOW_TRACKING_URI at a running one")


def redact_uri(uri: str | None) -> str:
    """`uri` with any password (and token-like query values) replaced by ***: safe to print or log."""
    if not uri:
        return str(uri)
    parts = urlsplit(uri)
    if parts.password is None and "@" not in parts.netloc:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0] if parts.password is not None else ""  # a lone user part may be a token
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}" if name else f"***@{host}"))


def redact(text: str) -> str:
    """`text` with the tracking URI's password and MLFLOW_TRACKING_PASSWORD/TOKEN masked."""
    uri = mlflow.get_tracking_uri()
    secrets = [os.environ.get(k) for k in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")]
    if uri:
        secrets.append(urlsplit(uri).password)
    text = re.sub(r"(?<=://)([^:/@\s]+):([^@/\s]+)@", r"\1:***@", str(text))
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def configure_http() -> None:
    """Short HTTP retries unless the user set them; no run links that would print credentials."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Each retry would print a warning line; a lost server is reported once, in one line.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    uri = mlflow.get_tracking_uri()
    if urlsplit(uri).password is not None or "@" in urlsplit(uri).netloc:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def server_lost() -> bool:
    """After a failure: whether an http(s) tracking server has stopped answering."""
    if not is_http_uri(mlflow.get_tracking_uri()):
        return False
    try:
        check_reachable(timeout=3.0)
    except ValueError:
        return True
    return False


def is_http_uri(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def check_reachable(uri: str | None = None, timeout: float = REACHABLE_TIMEOUT_SECONDS) -> None:
    """ValueError naming the (redacted) URI if an http(s) tracking server does not answer /health
    within `timeout` seconds; other stores are not checked."""
    uri = uri or mlflow.get_tracking_uri()
    if not is_http_uri(uri):
        return
    parts = urlsplit(uri)
    host = parts.hostname or ""
    health = urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host,
                                       path=parts.path.rstrip("/") + "/health", query="", fragment=""))
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            with urllib.request.urlopen(health, timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                return
        except urllib.error.HTTPError as err:  # it answers: an auth proxy or an old server
            if err.code in (401, 403, 404):
                return
            last = err
        except (OSError, ValueError) as err:
            last = err
        if time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    reason = getattr(last, "reason", last)
    raise ValueError(f"cannot reach the MLflow tracking server at {redact_uri(uri)} "
                     f"(no answer within {timeout:.0f} s: {redact(str(reason))}); {_SERVER_HINT}")


def prepare_tracking(reading: bool = False) -> None:
    """Before any run is created: short retries, and a clear error if the server is down.

    `reading` (analyze, report: commands that need runs to exist): a SQLite store whose file does
    not exist is an error, not a new empty store left behind."""
    configure_http()
    check_reachable()
    if reading:
        check_store_exists()


def check_store_exists() -> None:
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.exists(path):
            raise RunError(
                f"there is no tracking store at {uri} (no such file; MLflow's default store is mlflow.db in "
                "the current directory): run this from the folder you trained in, or set "
                "MLFLOW_TRACKING_URI to the store that holds the run")
