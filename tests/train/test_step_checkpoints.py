"""CV checkpoints at optimizer steps (--cv-steps, --cv-log-steps): parsing and refusals, the
step axis of such runs, their analysis, and a kill and resume inside the first epoch."""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from ntk_tracking.keys import EPOCH_METRIC, STEP_UNIT_TAG, STEPS_PER_EPOCH_TAG
from ntk_tracking.tasks import get_task
from ntk_tracking.tasks.base import TaskConfig, parse_steps
from conftest import metric_history

ROOT = pathlib.Path(__file__).resolve().parents[2]
# 64 points in batches of 8: 8 optimizer steps per epoch.
DENSE = ["--width", "8", "--depth", "1", "--epochs", "2", "--train-size", "64", "--test-size", "32",
         "--batch-size", "8", "--cv-every", "1", "--no-progress"]
ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]


def assert_one_value_per_step(run_id):
    client = mlflow.MlflowClient()
    for key in client.get_run(run_id).data.metrics:
        counts = collections.Counter(m.step for m in client.get_metric_history(run_id, key))
        assert all(n == 1 for n in counts.values()), (key, counts)


def all_runs():
    return mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.search_experiments()])


def test_steps_parse_and_the_log_spaced_rule():
    assert parse_steps("8,1,2,2, 4") == [1, 2, 4, 8]
    assert parse_steps("none") == parse_steps("") == []
    # --cv-log-steps N: round(10**x), x evenly spaced from 0 to log10(steps per epoch − 1), repeats dropped.
    assert TaskConfig(cv_log_steps=5).cv_optimizer_steps(63) == [1, 3, 8, 22, 62]
    assert TaskConfig(cv_log_steps=8).cv_optimizer_steps(4) == [1, 2, 3]  # a short epoch: fewer than N
    assert TaskConfig(cv_steps="16", cv_log_steps=2).cv_optimizer_steps(8) == [1, 7, 16]
    assert not TaskConfig().step_checkpoints and TaskConfig(cv_log_steps=1).step_checkpoints


@pytest.mark.parametrize("task, args, message", [
    ("mnist_dense", ["--cv-steps", "1,0,4"], "cv_steps must be positive integers"),
    ("mnist_dense", ["--cv-steps", "1.5"], "cv_steps must be positive integers"),
    ("mnist_dense", ["--cv-steps", "two"], "e.g. --cv-steps 1,2,4,8"),
    ("mnist_dense", ["--cv-log-steps", "-1"], "cv_log_steps must be ≥ 0"),
    ("mnist_dense", ["--cv-steps", "4,17,40"], "--cv-steps 17,40: beyond the run's last optimizer step, 16 "
                                               "(2 epochs × 8)"),
    ("pong_actor_critic", ["--cv-log-steps", "4", "--epochs", "3"],
     "a pong_actor_critic epoch is 1 PPO update: use --cv-steps"),
    ("pong_actor_critic", ["--cv-steps", "2,5", "--epochs", "3"], "beyond the run's last PPO update, 3"),
], ids=["zero", "fraction", "word", "negative-log", "beyond", "pong-log", "pong-beyond"])
def test_bad_step_cadence_is_refused_before_any_run(store, capsys, task, args, message):
    base = DENSE if task == "mnist_dense" else ["--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        train_main(task, base + args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert all_runs() == [] and not (store / "mlruns").exists()


def test_dense_step_checkpoints_train_and_analyze_once(store):
    """The issue's done-when: one point per sub-epoch checkpoint and per epoch; a rerun adds nothing."""
    run_id = train_main("mnist_dense", DENSE + ["--cv-steps", "1,2,4,8"])
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    assert tags[STEP_UNIT_TAG] == "optimizer step" and tags[STEPS_PER_EPOCH_TAG] == "8"
    # Step 8 is both a step checkpoint and the end of epoch 1: one checkpoint, one point.
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2, 4, 8, 16]
    assert [s for s, _ in metric_history(run_id, "train/loss")] == [0, 1, 2, 4, 8, 16]
    assert metric_history(run_id, EPOCH_METRIC) == [(0, 0.0), (1, 0.125), (2, 0.25), (4, 0.5), (8, 1.0), (16, 2.0)]
    assert [s for s, _ in metric_history(run_id, "train/grad_norm")] == [8, 16]  # per-epoch statistics at epoch ends

    # Stopping inside an epoch changes no number: the epoch ends equal a run without step checkpoints.
    plain = train_main("mnist_dense", DENSE)
    assert client.get_run(plain).data.tags[STEP_UNIT_TAG] == "epoch"
    assert [s for s, _ in metric_history(plain, "train/loss")] == [0, 1, 2]
    assert metric_history(plain, EPOCH_METRIC) == [(0, 0.0), (1, 1.0), (2, 2.0)]
    for key in ("train/loss", "test/loss", "train/grad_norm", "train/param_norm"):
        stepped = dict(metric_history(run_id, key))
        for epoch, value in metric_history(plain, key):
            assert stepped[8 * epoch] == pytest.approx(value, rel=1e-5), (key, epoch)

    assert analyze_main([run_id] + ANALYSIS) == [0, 1, 2, 4, 8, 16]
    for key in ("ntk/entropy/train", "ntk/trace/test", "ntk/entropy_std/test"):
        assert [s for s, _ in metric_history(run_id, key)] == [0, 1, 2, 4, 8, 16], key
    before = {k: metric_history(run_id, k) for k in client.get_run(run_id).data.metrics}
    assert analyze_main([run_id] + ANALYSIS) == []
    assert {k: metric_history(run_id, k) for k in client.get_run(run_id).data.metrics} == before
    assert_one_value_per_step(run_id)
    assert "analysis/evolution.png" in {a.path for a in client.list_artifacts(run_id, "analysis")}


def test_vae_takes_log_spaced_step_checkpoints_and_the_analyzer_measures_them(store):
    """A non-dense task: 64 digits in batches of 16 are 4 steps per epoch; --cv-log-steps 3 gives 1, 2, 3."""
    run_id = train_main("mnist_vae", ["--hidden", "16", "--latents", "2", "--epochs", "2", "--train-size", "64",
                                      "--test-size", "32", "--batch-size", "16", "--cv-every", "2",
                                      "--cv-log-points", "0", "--cv-log-steps", "3", "--no-progress"])
    assert CheckpointStore(run_id, mlflow.MlflowClient()).cv_epochs() == [0, 1, 2, 3, 8]
    assert [s for s, _ in metric_history(run_id, "test/loss")] == [0, 1, 2, 3, 4, 8]
    assert analyze_main([run_id] + ANALYSIS) == [0, 1, 2, 3, 8]
    for key in ("ntk/entropy/train", "ntk/encoder/trace/test"):
        assert [s for s, _ in metric_history(run_id, key)] == [0, 1, 2, 3, 8], key
    assert_one_value_per_step(run_id)


def test_pong_step_checkpoints_are_updates():
    """One Pong epoch is one PPO update: --cv-steps name updates, added to the epoch cadence."""
    task = get_task("pong_actor_critic")
    config = task.config(epochs=20, cv_every=10, cv_log_points=0, cv_steps="3,7")
    assert task.steps_per_epoch(config, None) == 1
    assert task.step_unit(config) == "PPO update"
    assert config.cv_optimizer_steps(1) == [3, 7]


# The real trainer, paused after logging optimizer step 4 (inside epoch 1) so the test can SIGKILL it there.
PAUSE_AFTER_STEP_4 = """
import os, sys, time
from ntk_tracking import tracking
from ntk_tracking.cli.train import train_main
real_log, ctl = tracking.log_metrics, os.environ["NTK_TEST_CTL"]
def paced(client, run_id, metrics, step):
    real_log(client, run_id, metrics, step)
    if step == 4:
        open(os.path.join(ctl, "step4"), "w").close()
        time.sleep(600)
tracking.log_metrics = paced
train_main(sys.argv[1], sys.argv[2:])
"""


@pytest.mark.slow
def test_kill_inside_the_first_epoch_then_resume_logs_no_step_twice(store):
    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient()
    args = DENSE + ["--cv-steps", "1,2,4,6"]
    reference = train_main("mnist_dense", args)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_RUN_ID=run_id, JAX_PLATFORMS="cpu", NTK_TEST_CTL=str(store),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(store / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_STEP_4, "mnist_dense"] + args, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (store / "step4").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (store / "train.log").read_text()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [s for s, _ in metric_history(run_id, "train/loss")] == [0, 1, 2, 4]  # killed inside epoch 1
    # Its training claim lapses with its heartbeat; the relaunch (what `mlflow run --run-id` does) waits for that.
    env.pop("NTK_TEST_CTL")
    deadline = time.monotonic() + 180
    while True:
        done = subprocess.run([sys.executable, "-m", "pipelines.train", "mnist_dense"] + args, env=env,
                              capture_output=True, text=True)
        if done.returncode == 0 or "being trained by another process" not in done.stderr \
                or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stderr
    assert "resuming run" in done.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_one_value_per_step(run_id)
    for key in ("train/loss", "test/loss", EPOCH_METRIC):
        resumed, uninterrupted = metric_history(run_id, key), metric_history(reference, key)
        assert [s for s, _ in resumed] == [s for s, _ in uninterrupted] == [0, 1, 2, 4, 6, 8, 16], key
        assert [v for _, v in resumed] == pytest.approx([v for _, v in uninterrupted], rel=1e-6), key
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2, 4, 6, 8, 16]
    assert analyze_main([run_id] + ANALYSIS) == [0, 1, 2, 4, 6, 8, 16]
    assert_one_value_per_step(run_id)


@pytest.mark.slow
def test_report_draws_runs_counted_in_steps_on_the_epoch_axis(store):
    """A sweep whose children differ in unit: the report reads each child's epochs, so both end at epoch 2."""
    import csv

    from ntk_tracking import tracking
    from ntk_tracking.report import report

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("Default").experiment_id
    grid = {"width": [4, 8], "depth": [1], "activation": ["relu"], "init": ["lecun_normal"], "seed": [0]}
    parent = client.create_run(exp, tags={"ntk_tracking.kind": "sweep", "ntk_tracking.task": "mnist_dense"}).info.run_id
    tracking.log_json_artifact(client, parent, {"task": "mnist_dense", "grid": grid, "fixed": {}}, "sweep.json")
    children = {}
    for width, extra in ((4, ["--cv-steps", "1,2,4"]), (8, [])):
        child = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        os.environ["MLFLOW_RUN_ID"] = child  # what the sweep's `mlflow run` does
        try:
            assert train_main("mnist_dense", DENSE + ["--width", str(width)] + extra) == child
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
        analyze_main([child] + ANALYSIS)
        children[width] = child
    result = report(parent, progress=False)
    assert set(result.regimes) == set(children.values())
    with open(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/runs.csv"), newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    assert rows[children[4]]["last_ntk_epoch"] == rows[children[8]]["last_ntk_epoch"] == "2"
    # The regime numbers go to the last NTK point's own step: optimizer step 16, epoch 2.
    for width, last in ((4, 16), (8, 2)):
        regime = [k for k in client.get_run(children[width]).data.metrics if k.startswith("regime/entropy_rise/")]
        assert regime and [m.step for m in client.get_metric_history(children[width], regime[0])] == [last]




def test_missing_and_damaged_step_checkpoints_are_named_and_the_rest_analyzed(store, capsys):
    import shutil

    run_id = train_main("mnist_dense", DENSE[:5] + ["1"] + DENSE[6:] + ["--cv-steps", "2,5"])  # --epochs 1
    root = pathlib.Path(mlflow.utils.file_utils.local_file_uri_to_path(
        mlflow.MlflowClient().get_run(run_id).info.artifact_uri), "checkpoints")
    assert sorted(p.name for p in root.iterdir()) == ["0", "2", "5", "8", "resume"]
    shutil.rmtree(root / "5")
    for f in (root / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "commit_success" not in f.name:
            f.write_bytes(b"\0garbage\0" * 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        analyze_main([run_id] + ANALYSIS)
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert "1 damaged (epoch 2)" in err and "missing: epoch 5:" in err
    assert [s for s, _ in metric_history(run_id, "ntk/entropy/train")] == [0, 8]


def test_evolution_figure_of_a_step_counted_run_has_a_log_step_axis():
    task = get_task("mnist_dense")
    points = {"ntk/entropy/train": [(0, 1.0), (1, 1.1), (2, 1.2), (16, 1.3)], "train/loss": [(0, 2.0), (16, 1.0)]}

    def axes(config):
        fig = task.evolution_figure(config, lambda key: points.get(key, []), ["model"], ["train"])
        return [(ax.get_xscale(), ax.get_xlabel()) for ax in fig.axes]

    assert set(axes(task.config(cv_steps="1,2"))) == {("symlog", "optimizer step (log scale)")}
    assert set(axes(task.config())) == {("linear", "epoch")}
