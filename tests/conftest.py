"""Shared test helpers. The repository root goes first on sys.path so that `pipelines` and the
working tree's `ntk_tracking` import whatever way the project was installed."""

import pathlib
import sys

import mlflow

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def use_tracking_store(mp, path) -> None:
    """Point MLflow (this process and subprocesses) at a SQLite store in `path`, run from `path`."""
    mp.chdir(path)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{path}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
