"""One writer per run, damaged checkpoints detected, refusals that change nothing: real processes,
real Orbax files, a SQLite store and a real `mlflow server`."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from ntk_tracking import claims
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--width", "8", "--depth", "1", "--epochs", "6", "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--no-progress"]
ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]
EPOCHS = list(range(7))


def env_for(uri: str, **extra) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT),
                PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]), **extra)


def cli(*argv) -> list[str]:
    return [sys.executable, "-c", "from ntk_tracking.cli import main; main()", *argv]


def steps(run_id, key="ntk/entropy/train") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


@pytest.fixture
def trained(store):
    return train_main("mnist_dense", TINY)


def checkpoint_dir(run_id, epoch) -> pathlib.Path:
    root = mlflow.utils.file_utils.local_file_uri_to_path(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    return pathlib.Path(root, "checkpoints", str(epoch))


def analyze_exit(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        analyze_main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- claims ----------------------------------------------------------------------------------------


def test_a_claim_is_exclusive_expires_and_is_taken_over(any_store, tmp_path):
    client = mlflow.MlflowClient()
    run = f"run-{tmp_path.name}"  # the server is shared by the session's tests
    first = claims.Claim.acquire(client, run, "analysis/3", ttl=60)
    with pytest.raises(claims.Held, match="analysis/3"):
        claims.Claim.acquire(client, run, "analysis/3", ttl=60)
    assert claims.holder(client, run, "analysis/3")[0] == first.owner
    first.release()
    assert claims.holder(client, run, "analysis/3") is None
    with claims.Claim.acquire(client, run, "analysis/3", ttl=0.5) as dying:  # a holder that stops beating
        time.sleep(0.7)
        taker = claims.Claim.acquire(client, run, "analysis/3", ttl=60)
        assert not dying.holds() and taker.holds()
        taker.release()
    # Claims stay out of the UI's experiment list.
    assert not [e.name for e in client.search_experiments() if e.name.startswith(claims.PREFIX)]


def test_settings_are_recorded_once(store):
    client = mlflow.MlflowClient()
    assert claims.record_once(client, "r", "settings", "a") == "a"
    assert claims.record_once(client, "r", "settings", "b") == "a"
    assert claims.recorded(client, "r", "settings") == "a"


# -- concurrent writers ----------------------------------------------------------------------------


def concurrent_analyzers(uri: str, run_id: str, cwd, settings: list[list[str]]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cli("analyze", run_id, *s, "--no-progress"), cwd=cwd, env=env_for(uri),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in settings]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def one_point_per_step(run_id) -> None:
    for key in ("ntk/entropy/train", "ntk/trace/test"):
        assert steps(run_id, key) == EPOCHS, key


def test_three_concurrent_analyzers_log_each_checkpoint_once_sqlite(trained, store):
    done = concurrent_analyzers(f"sqlite:///{store}/mlflow.db", trained, store, [ANALYSIS[:-1]] * 3)
    assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-1500:] for p in done]
    one_point_per_step(trained)


def test_analyzers_with_other_settings_cannot_mix(trained, store):
    done = concurrent_analyzers(f"sqlite:///{store}/mlflow.db", trained, store,
                                [["--subsets", "2", "--points", "4"], ["--subsets", "3", "--points", "5"]])
    codes = sorted(p.returncode for p in done)
    assert codes == [0, 2], [p.stderr[-1500:] for p in done]
    one_point_per_step(trained)
    refused = next(p for p in done if p.returncode == 2)
    assert "other settings" in refused.stderr


def test_three_concurrent_analyzers_against_a_server(shared_tracking_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_tracking_server.uri)
    mlflow.set_tracking_uri(shared_tracking_server.uri)
    try:
        run_id = train_main("mnist_dense", TINY)
        done = concurrent_analyzers(shared_tracking_server.uri, run_id, tmp_path, [ANALYSIS[:-1]] * 3)
        assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-1500:] for p in done]
        one_point_per_step(run_id)
    finally:
        mlflow.set_tracking_uri(None)


SLOW_TRAINER = """\
import sys, time
from ntk_tracking.train import tracked

def slow_fit(original):
    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        def paced(epoch, state, metrics):
            on_epoch(epoch, state, metrics)
            time.sleep(float(sys.argv[1]))
        return original(self, config, data, model, state, start_epoch, paced, progress)
    return fit

from ntk_tracking.tasks import get_task
task = type(get_task("mnist_dense"))
task.fit = slow_fit(task.fit)
from ntk_tracking.cli import main
main(["train", "mnist_dense", *sys.argv[2:]])
"""


def start_slow_trainer(cwd, uri: str, seconds_per_epoch: float, argv, **env) -> subprocess.Popen:
    script = cwd / "slow_trainer.py"
    script.write_text(SLOW_TRAINER)
    return subprocess.Popen([sys.executable, str(script), str(seconds_per_epoch), *argv], cwd=cwd,
                            env=env_for(uri, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_run(experiment: str, timeout=120):
    client = mlflow.MlflowClient()
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and steps(runs[0].info.run_id, "train/loss"):
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("the trainer did not start")


def test_a_second_trainer_is_refused_and_a_refusal_changes_nothing(any_store, tmp_path, monkeypatch, capsys):
    mlflow.MlflowClient().search_experiments()  # the store's tables, before two processes race for them
    experiment = f"live-{tmp_path.name}"
    live = start_slow_trainer(tmp_path, any_store, 0.6, [*TINY, "--experiment", experiment])
    try:
        run_id = wait_for_run(experiment)
        before = mlflow.MlflowClient().get_run(run_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        with pytest.raises(SystemExit):
            train_main("mnist_dense", TINY)  # same parameters: a second writer
        assert "a second trainer is refused" in capsys.readouterr().err
        after = mlflow.MlflowClient().get_run(run_id)
        assert after.info.status == "RUNNING" and after.data.tags == before.data.tags
        with pytest.raises(SystemExit):
            train_main("mnist_dense", [*TINY[:1], "16", *TINY[2:]])  # other parameters
        assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    finally:
        _, stderr = live.communicate(timeout=300)
        assert live.returncode == 0, stderr[-2000:]
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert steps(run_id, "train/loss") == EPOCHS  # no epoch logged twice


def test_follow_on_a_killed_trainer_ends_with_a_message(store, capsys):
    mlflow.MlflowClient().search_experiments()
    live = start_slow_trainer(store, f"sqlite:///{store}/mlflow.db", 30,
                              [*TINY[:-3], "--epochs", "50", "--no-progress"], NTK_TRACKING_CLAIM_TTL_SECONDS="2")
    run_id = wait_for_run("Default")
    while not steps(run_id, "train/loss") or not checkpoint_dir(run_id, 0).joinpath("commit_success.txt").exists():
        time.sleep(0.2)
    os.killpg(live.pid, signal.SIGKILL)
    live.communicate()
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    code, _, err = analyze_exit([run_id, *ANALYSIS, "--follow", "--poll-seconds", "0.3", "--stall-seconds", "3"], capsys)
    assert code == 4
    assert "trainer stopped" in err and f"MLFLOW_RUN_ID={run_id}" in err
    assert steps(run_id) == [0]


# -- damaged checkpoints ---------------------------------------------------------------------------


def largest_array_file(step: pathlib.Path) -> pathlib.Path:
    files = [f for f in step.rglob("*") if f.is_file() and "variables" in f.parts and "d" in f.parts]
    return max(files, key=lambda f: f.stat().st_size)


def test_flipped_bit_truncated_file_and_missing_step_are_named_and_the_rest_analyzed(trained, capsys):
    flipped = largest_array_file(checkpoint_dir(trained, 2))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = largest_array_file(checkpoint_dir(trained, 3))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shutil.rmtree(checkpoint_dir(trained, 5))
    code, _, err = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 3
    assert steps(trained) == [0, 1, 4, 6]
    lines = [line for line in err.splitlines() if line.startswith(("damaged:", "missing:"))]
    assert len(lines) == 3 and all(len(line) < 400 for line in lines), err
    assert any("epoch 2:" in line for line in lines) and any("epoch 3:" in line for line in lines)
    assert any(line.startswith("missing: epoch 5:") for line in lines)
    assert "skipped: 2 damaged (epochs 2, 3), 1 missing (epoch 5)" in err
    assert "tensorstore" not in err.lower() and "Traceback" not in err
    # A rerun logs nothing twice and names the same problems.
    code, _, _ = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 3 and steps(trained) == [0, 1, 4, 6]


def test_a_non_finite_kernel_is_reported_not_logged_and_retried(trained, capsys, monkeypatch):
    import jax

    from ntk_tracking.checkpointing import CheckpointStore

    restore, poison = CheckpointStore.restore_cv, {4}

    def restore_with_nan(self, epoch, abstract):  # NaN parameters, as a diverged step leaves them
        variables = restore(self, epoch, abstract)
        return jax.tree.map(lambda x: x * np.nan, variables) if epoch in poison else variables

    monkeypatch.setattr(CheckpointStore, "restore_cv", restore_with_nan)
    code, _, err = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 3 and "non-finite: epoch 4:" in err and "skipped: 1 non-finite (epoch 4)" in err
    assert steps(trained) == [0, 1, 2, 3, 5, 6]
    poison.clear()  # the cause is gone: a rerun analyzes it
    code, _, _ = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 0 and steps(trained) == EPOCHS


def test_checkpoints_without_a_digest_still_load_with_a_note(trained, capsys):
    shutil.rmtree(checkpoint_dir(trained, 1) / "digest")
    code, out, _ = analyze_exit([trained, *ANALYSIS], capsys)
    assert code == 0 and steps(trained) == EPOCHS
    assert "checkpoint(s) [1] were saved before checkpoints carried a digest" in out


# -- refusals that change nothing ------------------------------------------------------------------


def test_an_unwritable_artifact_store_is_one_line_naming_it(store, capsys):
    blocker = store / "blocker"
    blocker.write_text("a file where the artifact folder should be")
    mlflow.MlflowClient().create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    with pytest.raises(SystemExit):
        train_main("mnist_dense", [*TINY, "--experiment", "blocked"])
    err = capsys.readouterr().err
    assert f"cannot write to the artifact store at {blocker / 'artifacts'}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("blocked").experiment_id]) == []


def test_a_diverged_run_is_flagged_in_the_run_and_by_the_analyzer(store, capsys):
    try:
        run_id = train_main("mnist_dense", [*TINY, "--learning-rate", "1e6"])
    except SystemExit:  # the loop's own finiteness check may stop it: the flag must be there either way
        run_id = mlflow.MlflowClient().search_runs(["0"])[0].info.run_id
    tag = mlflow.MlflowClient().get_run(run_id).data.tags.get("ntk_tracking.diverged")
    assert tag and "train/loss" in tag
    capsys.readouterr()
    try:
        analyze_main([run_id, *ANALYSIS])
    except SystemExit:
        pass
    assert f"warning: run {run_id} diverged" in capsys.readouterr().err
