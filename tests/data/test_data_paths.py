"""Analyze what you trained wherever its data is: trusted paths, explicit opt-ins, --data remaps."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from conftest import use_tracking_store

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--width", "4", "--depth", "1", "--epochs", "1", "--batch-size", "16", "--no-progress"]
TINY_ANALYSIS = ["--subsets", "1", "--points", "4", "--no-progress"]


def write_mnist_csv(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """MNIST in the CSV layout the loader reads: a label column and 784 pixel columns."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % 10
    pixels = rng.integers(0, 256, (rows, 784))
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    body = "\n".join(",".join(map(str, [lab, *row])) for lab, row in zip(labels, pixels))
    path.write_text(header + "\n" + body + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained from `work/` on a CSV in `data/`, outside the current directory."""
    root = tmp_path_factory.mktemp("data-paths")
    (root / "work").mkdir()
    (root / "data").mkdir()
    write_mnist_csv(root / "data" / "digits.csv", 60)
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NTK_TRACKING_HOME", str(home))
        use_tracking_store(mp, root / "work")
        run_id = train_main("mnist_dense", ["--dataset", str(root / "data" / "digits.csv"), *TINY])
        mlflow.set_tracking_uri(None)
    return root, run_id


@pytest.fixture
def store_dir(trained):
    """conftest's `store` opens the store the run was trained into, from `work/`."""
    return trained[0] / "work"


@pytest.fixture
def as_the_trainer(trained, monkeypatch):
    """The home of the user who trained the run (where its data path is trusted); no data roots."""
    monkeypatch.setenv("NTK_TRACKING_HOME", str(trained[0] / "home"))
    monkeypatch.delenv("NTK_TRACKING_DATA_ROOTS", raising=False)


def ntk_steps(run_id) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "ntk/entropy/train"))


def settings_logged(run_id) -> bool:
    return any(a.path == "settings.json" or a.path.endswith("/settings.json")
               for a in mlflow.MlflowClient().list_artifacts(run_id, "analysis"))


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        analyze_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_run_you_trained_is_analyzed_with_no_option_and_others_are_refused(trained, store, as_the_trainer, capsys,
                                                                            monkeypatch):
    root, run_id = trained
    data = str((root / "data" / "digits.csv").resolve())
    # Another user (another home) analyzing the same store: the recorded path is not trusted.
    monkeypatch.setenv("NTK_TRACKING_HOME", str(root / "someone-else"))
    err = refused([run_id, *TINY_ANALYSIS], capsys)
    assert data in err and "--allow-data-path" in err and "-P allow_data_path=" in err
    assert "NTK_TRACKING_DATA_ROOTS" in err
    assert ntk_steps(run_id) == [] and not settings_logged(run_id)  # nothing logged before the refusal
    # A root in the environment is an explicit opt-in too.
    monkeypatch.setenv("NTK_TRACKING_DATA_ROOTS", os.pathsep.join(["/nonexistent", str(root / "data")]))
    assert analyze_main([run_id, *TINY_ANALYSIS]) == [0, 1]
    # The user who trained it: no option needed (a rerun finds nothing left to do).
    monkeypatch.delenv("NTK_TRACKING_DATA_ROOTS")
    monkeypatch.setenv("NTK_TRACKING_HOME", str(root / "home"))
    capsys.readouterr()
    assert analyze_main([run_id, *TINY_ANALYSIS]) == []
    assert ntk_steps(run_id) == [0, 1]
    assert "2 checkpoint(s) were already analyzed with these settings (epochs [0, 1]); nothing was left to do" \
        in capsys.readouterr().out


def test_moved_data_is_named_and_read_through_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "old").mkdir()
    write_mnist_csv(tmp_path / "old" / "digits.csv", 60)
    monkeypatch.setenv("NTK_TRACKING_HOME", str(tmp_path / "home"))
    use_tracking_store(monkeypatch, tmp_path / "work")
    run_id = train_main("mnist_dense", ["--dataset", str(tmp_path / "old" / "digits.csv"), *TINY])
    moved = tmp_path / "elsewhere" / "copy.csv"
    moved.parent.mkdir()
    shutil.move(tmp_path / "old" / "digits.csv", moved)
    err = refused([run_id, *TINY_ANALYSIS], capsys)
    assert "does not exist on this machine" in err and "--data PATH" in err and "-P data=PATH" in err
    # Other data under the same name is refused before anything is logged.
    write_mnist_csv(tmp_path / "elsewhere" / "other.csv", 80)
    err = refused([run_id, *TINY_ANALYSIS, "--data", str(tmp_path / "elsewhere" / "other.csv")], capsys)
    assert "not what run" in err and "trained on" in err
    assert ntk_steps(run_id) == [] and not settings_logged(run_id)
    err = refused([run_id, *TINY_ANALYSIS, "--data", str(tmp_path / "nowhere.csv")], capsys)
    assert "nowhere.csv" in err and "no such file" in err
    assert analyze_main([run_id, *TINY_ANALYSIS, "--data", str(moved)]) == [0, 1]


def test_analyze_entry_point_takes_the_opt_in_and_the_remap(trained, store, as_the_trainer, monkeypatch):
    root, run_id = trained
    monkeypatch.setenv("NTK_TRACKING_HOME", str(root / "third-user"))
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    base = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "analyze", "--env-manager", "local",
            "-P", f"run_id={run_id}", "-P", "subsets=1", "-P", "points=4"]
    proc = subprocess.run(base, cwd=root / "work", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "allow_data_path" in proc.stderr
    proc = subprocess.run(base + ["-P", f"allow_data_path={root / 'data'}"], cwd=root / "work", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The launch's own run says what it is and points at the analyzed run, and back.
    client = mlflow.MlflowClient()
    launched = client.get_run(client.get_run(run_id).data.tags["ntk_tracking.analyzed_by"])
    assert launched.data.tags["ntk_tracking.analyzed_run"] == run_id
    assert run_id in launched.data.tags["mlflow.note.content"]


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_reading_commands_never_create_a_store(tmp_path, monkeypatch, capsys, command):
    """`cd elsewhere && ntk-tracking analyze RUN` names the missing store and leaves no mlflow.db."""
    from ntk_tracking.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(None)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "0123456789abcdef0123456789abcdef"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no tracking store at sqlite:///" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []
