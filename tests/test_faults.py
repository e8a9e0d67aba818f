"""Tracking-server faults: down at start, lost mid-run, SIGKILL during a checkpoint save, load."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from ntk_tracking.checkpointing import COMMIT_MARKER, CheckpointStore
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from conftest import use_tracking_store
from servers import MlflowServer, free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 3
TINY = ["--width", "4", "--depth", "1", "--epochs", str(EPOCHS), "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--no-progress", "--resume-interval-seconds", "0"]
TRAINING_METRICS = ("train/loss", "test/loss", "test/accuracy")

# Pauses after epoch 1's metrics until the test says go (it stops the server meanwhile).
PAUSE_AFTER_EPOCH_1 = """
import os, sys, time
from ntk_tracking import tracking
from ntk_tracking.cli.train import train_main
real_log, ctl = tracking.log_metrics, os.environ["NTK_TEST_CTL"]
def paced(client, run_id, metrics, step):
    real_log(client, run_id, metrics, step)
    if step == 1:
        open(os.path.join(ctl, "epoch1"), "w").close()
        while not os.path.exists(os.path.join(ctl, "go")):
            time.sleep(0.05)
tracking.log_metrics = paced
train_main(sys.argv[1], sys.argv[2:])
"""

# SIGKILL while the CV checkpoint of epoch 2 is being written: locally right after Orbax's
# asynchronous save started; on a server after half of the step's files were uploaded.
KILL_IN_CV_SAVE = """
import os, signal, sys
from ntk_tracking import checkpointing
from ntk_tracking.cli.train import train_main
Store = checkpointing.CheckpointStore
real_save, real_upload = Store._save, Store._upload
def save(self, kind, epoch, args, force=True):
    started = real_save(self, kind, epoch, args, force)
    if kind == "cv" and epoch == 2 and not self.remote:
        os.kill(os.getpid(), signal.SIGKILL)
    return started
def upload(self, kind, epoch):
    if kind == "cv" and epoch == 2:
        step = self._dir(kind) / str(epoch)
        first = next(e for e in sorted(step.iterdir()) if e.is_dir())
        self._client.log_artifacts(self.run_id, str(first), f"checkpoints/{epoch}/{first.name}")
        os.kill(os.getpid(), signal.SIGKILL)
    real_upload(self, kind, epoch)
Store._save, Store._upload = save, upload
train_main(sys.argv[1], sys.argv[2:])
"""


def child_env(uri: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra)
    return env


def train_process(uri: str, run_id: str, script: str | None = None, log=None, **extra) -> subprocess.Popen:
    command = ([sys.executable, "-c", script, "mnist_dense"] if script
               else [sys.executable, "-m", "pipelines.train", "mnist_dense"]) + TINY
    return subprocess.Popen(command, env=child_env(uri, MLFLOW_RUN_ID=run_id, **extra),
                            stdout=log, stderr=subprocess.STDOUT if log else None)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete_once(client, run_id: str, ntk: bool = False) -> None:
    """FINISHED, every epoch's metrics exactly once, every CV checkpoint once and complete."""
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in TRAINING_METRICS + (("ntk/entropy/train", "ntk/trace/test") if ntk else ()):
        assert steps(client, run_id, key) == list(range(EPOCHS + 1)), key
    listed = [a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "checkpoints") if a.is_dir]
    assert sorted(n for n in listed if n.isdigit()) == [str(e) for e in range(EPOCHS + 1)]
    for epoch in range(EPOCHS + 1):
        names = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, f"checkpoints/{epoch}")}
        assert COMMIT_MARKER in names and not any("tmp" in n for n in names), (epoch, names)


def test_server_down_at_start_fails_fast_and_creates_nothing(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        for command in (lambda: train_main("mnist_dense", TINY), lambda: analyze_main(["0" * 32])):
            t0 = time.monotonic()
            with pytest.raises(SystemExit):
                command()
            assert time.monotonic() - t0 < 30
            assert f"cannot reach the MLflow tracking server at {uri}" in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)
    assert os.listdir(tmp_path) == []


def test_server_lost_mid_run_then_relaunch(tmp_path):
    """Training stops with a relaunch hint when the server goes; the relaunch completes the run."""
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    try:
        server.wait_until_healthy()
        client = mlflow.MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("lost")).info.run_id
        with open(tmp_path / "train.log", "w") as log:
            proc = train_process(server.uri, run_id, PAUSE_AFTER_EPOCH_1, log, NTK_TEST_CTL=str(ctl))
            deadline = time.monotonic() + 180
            while not (ctl / "epoch1").exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
                time.sleep(0.1)
            server.stop()
            (ctl / "go").touch()
            t0 = time.monotonic()
            assert proc.wait(timeout=180) == 6  # EXIT_SERVER_LOST
            stopped_after = time.monotonic() - t0
        output = (tmp_path / "train.log").read_text()
        assert "lost the tracking server" in output and f"MLFLOW_RUN_ID={run_id}" in output, output[-3000:]
        assert "Traceback" not in output and "Retrying" not in output, output[-3000:]
        assert f"--run-id {run_id}" in output.strip().splitlines()[-1]  # the one line says how to continue
        assert stopped_after < 90, stopped_after
        print(f"training stopped {stopped_after:.1f} s after the server went")

        server.start().wait_until_healthy()  # same port, same backend store and artifacts
        assert steps(client, run_id, "train/loss") == [0, 1]
        assert train_process(server.uri, run_id).wait(timeout=300) == 0
        assert_complete_once(client, run_id)
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["local", "server"])
def test_sigkill_during_cv_save_then_relaunch_and_analyze(where, shared_tracking_server, tmp_path, monkeypatch):
    if where == "local":
        use_tracking_store(monkeypatch, tmp_path)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    else:
        uri = shared_tracking_server.uri
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment(f"kill-in-save-{where}")).info.run_id
        with open(tmp_path / "train.log", "w") as log:
            assert train_process(uri, run_id, KILL_IN_CV_SAVE, log).wait(timeout=300) == -9
        store = CheckpointStore(run_id, client)
        assert 2 not in store.cv_epochs() or where == "local"  # Orbax may have committed it already
        if where == "server":  # half a step on the server: no commit marker, not offered to readers
            names = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "checkpoints/2")}
            assert names and COMMIT_MARKER not in names
        store.close()

        assert train_process(uri, run_id).wait(timeout=300) == 0
        assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == list(range(EPOCHS + 1))
        assert_complete_once(client, run_id, ntk=True)
    finally:
        mlflow.set_tracking_uri(None)


ANALYZERS = int(os.environ.get("NTK_LOAD_RUNS", "8"))


@pytest.mark.load
def test_many_trainers_and_followers_against_one_server(shared_tracking_server, tmp_path):
    """8 training processes and their --follow analyzers at once; every metric point exactly once."""
    uri = shared_tracking_server.uri
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("load")
    runs = [client.create_run(experiment).info.run_id for _ in range(ANALYZERS)]
    procs, logs = [], []
    try:
        for i, run_id in enumerate(runs):
            logs.append(open(tmp_path / f"train{i}.log", "w"))
            procs.append(train_process(uri, run_id, log=logs[-1]))
        deadline = time.monotonic() + 600
        waiting = dict(enumerate(runs))
        while waiting:  # an analyzer needs the run's config.json, written before epoch 0
            for i, run_id in list(waiting.items()):
                if any(a.path == "config.json" for a in client.list_artifacts(run_id)):
                    logs.append(open(tmp_path / f"analyze{i}.log", "w"))
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "pipelines.analyze", run_id, "--follow", "--poll-seconds", "1",
                         "--subsets", "2", "--points", "4", "--no-progress"],
                        env=child_env(uri), stdout=logs[-1], stderr=subprocess.STDOUT))
                    del waiting[i]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
        assert codes == [0] * len(procs), [(tmp_path / n).read_text()[-2000:] for n in sorted(os.listdir(tmp_path))]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    for run_id in runs:
        assert_complete_once(client, run_id, ntk=True)


ORPHAN = """\
import sys, time
sys.path.insert(0, sys.argv[2])
from servers import MlflowServer
server = MlflowServer(sys.argv[1]).start().wait_until_healthy()
print(server.port, server.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_interrupted_test_process_leaves_no_server_behind(tmp_path, how):
    """A test run killed (a timeout, Ctrl-C) must not leave its `mlflow server` running."""
    script = tmp_path / "holder.py"
    script.write_text(ORPHAN)
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(pathlib.Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True)
    port, server_pid = map(int, holder.stdout.readline().split())
    os.kill(holder.pid, getattr(signal, how))
    holder.communicate(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(server_pid, signal.SIGKILL)
        pytest.fail(f"the server (pid {server_pid}, port {port}) outlived the process that started it")
