"""Faults in the middle of the work, with real processes: symbolic links in a checkpoint, sizes that
cannot fit, Ctrl-C in training, analysis and a sweep, a tracking server SIGKILLed mid-analysis, an
artifact store that stops accepting writes mid-training; on SQLite and on a real `mlflow server`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import use_tracking_store
from ntk_tracking.cli.train import train_main
from servers import MlflowServer
from test_one_writer import (ANALYSIS, TINY, analyze_exit, checkpoint_dir, cli, env_for,  # noqa: F401
                             largest_array_file, steps, trained, wait_for_run)
from test_stalls import as_in_a_terminal, assert_every_point_once, stalled_analyzer  # noqa: F401


# -- symbolic links in a checkpoint ------------------------------------------------------------------


def test_a_symlinked_metadata_or_array_file_makes_its_checkpoint_damaged(trained, capsys, tmp_path):
    metadata = checkpoint_dir(trained, 2) / "_CHECKPOINT_METADATA"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(metadata, elsewhere / "metadata")
    metadata.unlink()
    metadata.symlink_to(elsewhere / "metadata")  # the same bytes, read through a link
    array = largest_array_file(checkpoint_dir(trained, 4))
    shutil.copy(array, elsewhere / "array")
    array.unlink()
    array.symlink_to(elsewhere / "array")
    code, _, err = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 3
    assert steps(trained) == [0, 1, 3, 5, 6]
    lines = [line for line in err.splitlines() if line.startswith("damaged:")]
    assert len(lines) == 2, err
    assert "epoch 2:" in lines[0] and "2/_CHECKPOINT_METADATA is a symbolic link" in lines[0]
    assert "epoch 4:" in lines[1] and "is a symbolic link" in lines[1]
    assert "Traceback" not in err


# -- sizes that cannot fit -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["--subsets", "100000000"], "over the memory budget of 4,096 MiB (--memory-budget-mb): at most "),
    (["--subsets", "40", "--points", "31", "--memory-budget-mb", "100000"], "only 32 distinct subsets of 31"),
    (["--points", "100000"], "--points 100000 exceeds the "),
])
def test_sizes_that_cannot_fit_are_refused_before_any_work(trained, capsys, argv, says):
    import resource

    t0 = time.monotonic()
    code, _, err = analyze_exit([trained, *argv, "--no-progress"], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 60 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 2**20  # KiB
    assert steps(trained) == []
    assert mlflow.MlflowClient().get_experiment_by_name(f"ntk_tracking.claims/{trained}/settings") is None


# -- Ctrl-C ------------------------------------------------------------------------------------------


def resume_command(line: str) -> str:
    """The first `…` command of a one-line message."""
    return re.search(r"`([^`]+)`", line).group(1)


def test_ctrl_c_in_training_is_one_line_with_the_resume_command(any_store, tmp_path):
    store = tmp_path
    mlflow.MlflowClient().search_experiments()
    experiment = f"ctrl-c-{tmp_path.name}"
    argv = ["train", "mnist_dense", *TINY[:TINY.index("--epochs")], "--epochs", "60",
            *TINY[TINY.index("--epochs") + 2:], "--resume-interval-seconds", "0", "--experiment", experiment]
    env = env_for(any_store)
    proc = subprocess.Popen(cli(*argv), cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    run_id = wait_for_run(experiment)
    while len(steps(run_id, "train/loss")) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"interrupted: run {run_id} stopped and is marked KILLED; resume it with "), lines
    assert f"`mlflow run . -e mnist_dense --env-manager local --run-id {run_id} -P " in lines[0]
    assert "-P width=8" in lines[0] and "-P epochs=60" in lines[0]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    command = resume_command(lines[0])
    assert command.startswith(f"MLFLOW_RUN_ID={run_id} ntk-tracking train mnist_dense --width 8 ")
    resumed = subprocess.run(["bash", "-c", command], cwd=store, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert steps(run_id, "train/loss") == list(range(61))


def test_ctrl_c_in_the_analyzer_is_one_line_and_the_command_continues(trained, store, tmp_path):
    from ntk_tracking import claims

    uri = f"sqlite:///{store}/mlflow.db"
    proc = stalled_analyzer(tmp_path, uri, trained, "measuring", ttl=60, wait_for=tmp_path / "never")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"interrupted: run {trained}: epochs [0, 1, 2] logged by this command; continue "
                               f"with `ntk-tracking analyze {trained} --subsets 2 --points 4 --no-progress`"), lines
    assert steps(trained) == [0, 1, 2]
    assert claims.holder(mlflow.MlflowClient(), trained, "analysis/3") is None  # released on the way out
    continued = subprocess.run(["bash", "-c", resume_command(lines[0])], cwd=store, env=env_for(uri),
                               capture_output=True, text=True, timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert_every_point_once(trained)


def test_ctrl_c_in_a_sweep_is_one_line_and_its_command_resumes_it(store):
    mlflow.MlflowClient().search_experiments()
    argv = ["sweep", "--widths", "4,8", "--depths", "1", "--activations", "relu", "--epochs", "60", "--cv-every", "20",
            "--train-size", "64", "--test-size", "32", "--batch-size", "16", "--no-progress", "--experiment", "swept"]
    env = env_for(f"sqlite:///{store}/mlflow.db")
    proc = subprocess.Popen(cli(*argv), cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + 300
    while True:  # the first child is training
        found = client.get_experiment_by_name("swept")
        runs = client.search_runs([found.experiment_id], "tags.`ntk_tracking.kind` = 'training'") if found else []
        if any(len(steps(r.info.run_id, "train/loss")) >= 2 for r in runs):
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the sweep and the child it runs
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    parent = re.match(r"interrupted: sweep (\w+): its running children were stopped", lines[0]).group(1)
    assert client.get_run(parent).info.status == "KILLED"
    command = resume_command(lines[0])
    assert command.startswith("ntk-tracking sweep --widths 4,8 ") and command.endswith(f"--parent-run-id {parent}")
    resumed = subprocess.run(["bash", "-c", command], cwd=store, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(parent).info.status == "FINISHED"
    children = client.search_runs([client.get_experiment_by_name("swept").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2
    for child in children:
        assert client.get_run(child.info.run_id).info.status == "FINISHED"
        assert steps(child.info.run_id, "train/loss") == list(range(61))


# -- the tracking server lost mid-analysis ----------------------------------------------------------


def test_a_server_killed_mid_analysis_is_one_line_and_the_next_start_cleans_up(tmp_path, monkeypatch):
    from ntk_tracking import claims

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)
    try:
        server.wait_until_healthy()
        run_id = train_main("mnist_dense", TINY)
        go = tmp_path / "go"
        proc = stalled_analyzer(tmp_path, server.uri, run_id, "logging", ttl=60, wait_for=go)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.stop()
        go.touch()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 6, err[-3000:]
        assert time.monotonic() - t0 < 90
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err and "Retrying" not in err, err[-3000:]
        assert lines[0].startswith(f"error: lost the tracking server {server.uri}: run {run_id}: epochs [0, 1, 2] "
                                   "logged by this command; once the server is back, continue with `ntk-tracking "
                                   f"analyze {run_id} "), lines

        server.start().wait_until_healthy()  # same port, same store
        client = mlflow.MlflowClient()
        assert claims.holder(client, run_id, "analysis/3") is None  # its holder is gone
        continued = subprocess.run(["bash", "-c", resume_command(lines[0])], cwd=tmp_path,
                                   env=env_for(server.uri), capture_output=True, text=True, timeout=300)
        assert continued.returncode == 0, continued.stderr[-3000:]
        assert_every_point_once(run_id)
        left = [e.name for e in client.search_experiments() if e.name.startswith(claims.PREFIX)]
        assert left == [], left  # the claim the lost analyzer could not release is gone from the UI
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)


# -- an artifact store that stops accepting writes mid-training --------------------------------------

# Makes the run's checkpoints/ folder immutable (chattr +i: binds root too) once epoch 3 is logged;
# on a server, the folder in the server's artifact store.
IMMUTABLE_AFTER_EPOCH_3 = """\
import os, subprocess, sys, time
from ntk_tracking import tracking
from ntk_tracking.cli import main
real = tracking.log_metrics
def log(client, run_id, metrics, step):
    real(client, run_id, metrics, step)
    if step == 3:
        run, root = client.get_run(run_id), os.environ.get("NTK_TEST_SERVER_ARTIFACTS")
        folder = (os.path.join(root, run.info.experiment_id, run_id, "artifacts", "checkpoints") if root else
                  os.path.join(tracking.mlflow.utils.file_utils.local_file_uri_to_path(run.info.artifact_uri),
                               "checkpoints"))
        while not os.path.isdir(folder):  # a server's first upload may still be under way
            time.sleep(0.05)
        subprocess.run(["chattr", "+i", folder], check=True)
        open(os.environ["NTK_TEST_MARK"], "w").write(folder)
tracking.log_metrics = log
main(["train", "mnist_dense", *sys.argv[1:]])
"""


def chattr_works(tmp_path) -> bool:
    probe = tmp_path / "chattr-probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        return False
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    return True


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_a_store_that_stops_accepting_writes_stops_training_and_resume_completes(where, tmp_path, monkeypatch,
                                                                                  request):
    if not chattr_works(tmp_path):
        pytest.skip("needs chattr +i (root on a file system with immutable files) to make a folder unwritable")
    extra = {}
    if where == "sqlite":
        use_tracking_store(monkeypatch, tmp_path)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    else:
        server = request.getfixturevalue("shared_tracking_server")
        uri, extra = server.uri, {"NTK_TEST_SERVER_ARTIFACTS": str(server.artifacts)}
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
    experiment = f"unwritable-{where}-{tmp_path.name}"
    argv = [*TINY[:TINY.index("--epochs")], "--epochs", "12", *TINY[TINY.index("--epochs") + 2:],
            "--resume-interval-seconds", "0", "--experiment", experiment]
    script, mark = tmp_path / "immutable.py", tmp_path / "immutable"
    script.write_text(IMMUTABLE_AFTER_EPOCH_3)
    env = env_for(uri, NTK_TEST_MARK=str(mark), **extra)
    t0 = time.monotonic()
    failed = subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    folder = mark.read_text() if mark.exists() else None
    if folder:
        subprocess.run(["chattr", "-i", folder], check=True)  # the store is fixed
    try:
        assert failed.returncode == 7, failed.stderr[-3000:]
        assert time.monotonic() - t0 < 120
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        named = folder if where == "sqlite" else "mlflow-artifacts:/"
        assert lines[0].startswith("error: could not ") and named in lines[0], lines
        client = mlflow.MlflowClient()
        run_id = client.get_experiment_by_name(experiment) and client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id])[0].info.run_id
        assert f"MLFLOW_RUN_ID={run_id} ntk-tracking train mnist_dense" in lines[0]
        logged = steps(run_id, "train/loss")
        assert 3 in logged and max(logged) < 12  # it stopped part-way
        resumed = subprocess.run(["bash", "-c", resume_command(lines[0])], cwd=tmp_path, env=env_for(uri),
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert steps(run_id, "train/loss") == list(range(13))  # every epoch once
        from ntk_tracking.checkpointing import CheckpointStore

        with CheckpointStore(run_id, client) as store:
            assert store.cv_epochs() == list(range(13))  # none lost, none missing
    finally:
        mlflow.set_tracking_uri(None)
