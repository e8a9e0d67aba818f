"""What a run's artifacts may make the analyzer do, unpickling, and credentials in messages."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import socket

import mlflow
import pytest

from ntk_tracking import tracking
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from ntk_tracking.confine import check_data_paths, looks_like_path
from ntk_tracking.tasks import get_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--depth", "1", "--epochs", "1", "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds; conftest's `store` opens it), with a
    link in it to a file outside."""
    root = tmp_path_factory.mktemp("security")
    (root / "work").mkdir()
    (root / "outside.csv").write_text("label\n")
    (root / "work" / "link.csv").symlink_to(root / "outside.csv")
    return root / "work"


def planted_run(dataset: str) -> str:
    """A run whose config.json (as anyone with write access could plant it) names `dataset`."""
    client = mlflow.MlflowClient()
    run_id = client.create_run("0").info.run_id
    config = dataclasses.asdict(get_task("mnist_dense").default_config())
    tracking.log_json_artifact(client, run_id, {**config, "dataset": dataset}, tracking.CONFIG_ARTIFACT)
    return run_id


@pytest.mark.parametrize("dataset", ["../outside.csv", "{outside}", "~/.ntk-no-such-file.csv",
                                     "inside/../../outside.csv", "link.csv"])
def test_analyzer_refuses_data_paths_outside_the_current_directory(store, capsys, dataset):
    outside = store.parent / "outside.csv"
    run_id = planted_run(dataset.format(outside=outside))
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([run_id, "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "outside the current directory" in err and "--allow-data-path" in err
    assert not (store / "mlruns").exists() or not list((store / "mlruns").rglob("settings.json"))


def test_allowed_or_inside_paths_and_names_pass(store):
    config = get_task("mnist_dense").default_config()
    (store / "data").mkdir(exist_ok=True)
    (store / "data" / "mnist.csv").write_text("label\n")
    outside = store.parent / "outside.csv"
    for name in ("mnist5k", "ylecun/mnist", "data/mnist.csv", str(store / "data" / "mnist.csv")):
        check_data_paths(dataclasses.replace(config, dataset=name))
    check_data_paths(dataclasses.replace(config, dataset=str(outside)), allowed=[str(outside)])
    check_data_paths(dataclasses.replace(config, dataset="../outside.csv"), allowed=[str(store.parent)])
    with pytest.raises(ValueError, match="outside.csv"):
        check_data_paths(dataclasses.replace(config, dataset="../outside.csv"), allowed=[str(store / "data")])
    assert not looks_like_path("mnist5k") and looks_like_path("/abs") and looks_like_path("a/../b")


# Calls that turn bytes into arbitrary objects; none may read anything a run (or anyone) supplies.
UNSAFE = [r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bdill\.loads?\(", r"\bjoblib\.load\(",
          r"\btorch\.load\(", r"allow_pickle\s*=\s*True", r"\bmarshal\.loads?\(", r"\byaml\.load\(",
          r"\bshelve\.open\(", r"\bPyTreeRestore\(", r"\bnp\.load\((?![^)]*allow_pickle=False)"]


def test_no_unpickling_anywhere_in_the_package():
    offenders = []
    for path in sorted([*(ROOT / "ntk_tracking").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in UNSAFE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "unsafe deserialisation:\n" + "\n".join(offenders)


def test_checkpoints_restore_only_through_orbax_standard_and_json():
    source = (ROOT / "ntk_tracking" / "checkpointing.py").read_text()
    restores = set(re.findall(r"ocp\.args\.(\w+Restore)\(", source))
    assert restores <= {"StandardRestore", "JsonRestore"}, restores


def test_redaction():
    assert tracking.redact_uri("http://user:secret@host:5000/x") == "http://user:***@host:5000/x"
    assert tracking.redact_uri("https://token@host") == "https://***@host"
    assert tracking.redact_uri("http://host:5000") == "http://host:5000"
    assert "secret" not in tracking.redact("failed: GET http://me:secret@h/api (HTTPConnectionPool)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_error_hides_credentials(tmp_path, monkeypatch, capsys):
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(SystemExit):
            train_main("mnist_dense", TINY)
    finally:
        mlflow.set_tracking_uri(None)
    out = capsys.readouterr()
    assert f"http://user:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in out.err
    assert "secret" not in out.err + out.out and "hunter2" not in out.err + out.out
    assert os.listdir(tmp_path) == []


def test_credentials_never_reach_params_tags_or_output(shared_tracking_server, tmp_path, monkeypatch, capfd):
    """A run logged through a URI with credentials (the test server ignores them)."""
    uri = shared_tracking_server.uri.replace("http://", "http://user:secret@")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "user")
    mlflow.set_tracking_uri(uri)
    try:
        run_id = train_main("mnist_dense", TINY)
        run = mlflow.MlflowClient().get_run(run_id)
    finally:
        mlflow.set_tracking_uri(None)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags])
    out = capfd.readouterr()
    for secret in ("secret", "hunter2"):
        assert secret not in logged and secret not in out.out + out.err
