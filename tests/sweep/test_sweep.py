"""Sweeps: a parent run with a child training run per grid point, relaunch, failures, analysis."""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import warnings

import mlflow
import pytest

from ntk_tracking import analyze, sweep, tracking
from ntk_tracking.analyze import AnalysisSettings
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.train import config_from_args, train_parser
from ntk_tracking.tasks import TASK_NAMES as TASKS
from ntk_tracking.sweep import analyze_sweep, find_children
from ntk_tracking.cli.sweep import parse_sweep, sweep_main
from conftest import child_config, use_tracking_store

TINY = ["--epochs", "2", "--train-size", "64", "--test-size", "32", "--batch-size", "16", "--no-progress"]
GRID = ["--widths", "4,8", "--depths", "1,2", "--activations", "relu"] + TINY
KEYS = {f"w{w}-d{d}-relu-lecun_normal-lr0.001-s0" for w in (4, 8) for d in (1, 2)}


def _use_store(monkeypatch, path):
    """The shared tracking store in `path`; children also skip probing for accelerators."""
    use_tracking_store(monkeypatch, path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def children_on_cpu(monkeypatch):
    """Sweep children here skip probing for accelerators (module-scoped fixtures: _use_store)."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    """One 2×2 sweep trained once (real subprocesses, 2 workers) and shared by the tests below."""
    path = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        _use_store(mp, path)
        parent = sweep_main(GRID + ["--workers", "2"])
    mlflow.set_tracking_uri(None)
    return path, parent


@pytest.fixture
def grid_sweep(grid_store, monkeypatch):
    path, parent = grid_store
    _use_store(monkeypatch, path)
    yield parent
    mlflow.set_tracking_uri(None)


def all_runs():
    return mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.search_experiments()])


def steps(run_id, key):
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_grid_sweep_is_a_parent_with_a_child_training_run_per_point(grid_sweep):
    client = mlflow.MlflowClient()
    parent = client.get_run(grid_sweep)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ntk_tracking.kind"] == "sweep"
    assert parent.data.tags["ntk_tracking.task"] == "mnist_dense"
    assert parent.data.params["widths"] == "4,8" and parent.data.params["epochs"] == "2"
    spec = tracking.load_json_artifact(grid_sweep, "sweep.json")
    assert spec["task"] == "mnist_dense"
    assert spec["grid"] == {"width": [4, 8], "depth": [1, 2], "activation": ["relu"], "init": ["lecun_normal"],
                            "learning_rate": [0.001], "seed": [0]}
    assert spec["fixed"]["epochs"] == 2 and spec["fixed"]["train_size"] == 64

    children = find_children(client, grid_sweep)
    assert set(children) == KEYS
    assert len(all_runs()) == 5
    for key, child in children.items():
        run_id = child.info.run_id
        assert child.info.status == "FINISHED", key
        assert child.data.tags["mlflow.parentRunId"] == grid_sweep
        assert child.data.tags["ntk_tracking.kind"] == "training"
        assert child.info.run_name == key
        config = tracking.load_json_artifact(run_id, "config.json")
        assert (config["width"], config["depth"], config["epochs"], config["train_size"]) == (
            int(key[1]), int(key.split("-")[1][1:]), 2, 64)
        assert steps(run_id, "train/loss") == [0, 1, 2]
        assert steps(run_id, "test/accuracy") == [0, 1, 2]
        assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2]
        assert "logs/train.log" in {a.path for a in client.list_artifacts(run_id, "logs")}
        assert "error" not in child.data.tags


def test_relaunch_skips_finished_children(grid_sweep, monkeypatch, capsys):
    client = mlflow.MlflowClient()

    def snapshot():
        return {k: (r.info.run_id, r.info.end_time, steps(r.info.run_id, "train/loss"))
                for k, r in find_children(client, grid_sweep).items()}

    before = snapshot()
    assert sweep_main(GRID + ["--parent-run-id", grid_sweep]) == grid_sweep
    out = capsys.readouterr().out
    assert "4 finished already, 0 to train" in out
    # Not analyzed: it ends with the links, then the analysis and report commands to run next.
    assert "  sweep charts:" in out and "  sweep comparison:" in out
    assert out.rstrip().splitlines()[-2:] == [
        f"measure the NTK of every finished child with: ntk-tracking analyze {grid_sweep}",
        f"then report the sweep with: ntk-tracking report {grid_sweep}"]
    monkeypatch.setenv("MLFLOW_RUN_ID", grid_sweep)  # what `mlflow run --run-id` does
    assert sweep_main(GRID) == grid_sweep
    assert snapshot() == before
    assert len(all_runs()) == 5
    assert client.get_run(grid_sweep).info.status == "FINISHED"

    # Another grid on the same parent is refused, and the parent keeps its state.
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["--widths", "4,16", "--depths", "1,2", "--activations", "relu", "--parent-run-id", grid_sweep]
                   + TINY)
    assert exit_info.value.code != 0
    assert "grid.width" in capsys.readouterr().err
    assert snapshot() == before and client.get_run(grid_sweep).info.status == "FINISHED"


def test_analyze_sweep_measures_every_child_under_one_progress_bar(grid_sweep, monkeypatch):
    bars = []

    class RecordingBar(sweep.analysis.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    def no_per_run_bar(*args, **kwargs):
        raise AssertionError("the per-run analyzer bar must not be used by a sweep")

    monkeypatch.setattr(sweep.analysis, "tqdm", RecordingBar)
    monkeypatch.setattr(analyze, "tqdm", no_per_run_bar)
    settings = AnalysisSettings(num_subsets=2, subset_size=4)
    analyzed = analyze_sweep(grid_sweep, settings, progress=True)
    children = find_children(mlflow.MlflowClient(), grid_sweep)
    assert analyzed == {c.info.run_id: [0, 1, 2] for c in children.values()}
    assert [b["total"] for b in bars] == [12]
    for child in children.values():
        for key in ("ntk/entropy/train", "ntk/trace/test"):
            assert steps(child.info.run_id, key) == [0, 1, 2]
        assert mlflow.MlflowClient().get_run(child.info.run_id).info.status == "FINISHED"

    bars.clear()
    assert analyze_sweep(grid_sweep, settings, progress=False) == {c.info.run_id: [] for c in children.values()}
    assert [b["total"] for b in bars] == [0]
    with pytest.raises(tracking.RunError, match="not a sweep"):
        analyze_sweep(next(iter(children.values())).info.run_id, settings)

    # What a Ray task runs for a child's analysis (here without Ray): the sweep's settings, handed
    # over as an object and read from a file by `python -m ntk_tracking.run --analyze`.
    from ntk_tracking.on_ray import run_child_process
    from ntk_tracking.sweep.run import child_variables

    child = next(iter(children.values()))
    job = {"analyze": child.info.run_id, "settings": settings.to_dict(), "data_paths": []}
    with warnings.catch_warnings():  # a Ray worker holds no JAX threads; this test process does, and
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # the child execs at once
        code, tail = run_child_process(job, child_variables(None, child.info.experiment_id), child.info.run_id, None)
    assert code == 0, tail
    assert "3 checkpoint(s) were already analyzed with these settings" in tail
    assert steps(child.info.run_id, "ntk/entropy/train") == [0, 1, 2]


# A child killed with no chance to clean up (as by the OOM killer) after its epoch-0 metrics.
KILLED_AT_EPOCH_1 = """
import os, signal, sys
from ntk_tracking import tracking
from ntk_tracking.run import main
real_log = tracking.log_metrics
def dying_log(client, run_id, metrics, step):
    if step == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    real_log(client, run_id, metrics, step)
tracking.log_metrics = dying_log
main(["--config", sys.argv[1], "--no-progress"])
"""


def test_failed_and_killed_children_then_relaunch(store, monkeypatch, capsys):
    """A diverging child fails with its error; a killed one is marked FAILED and resumed later."""
    good, bad = "w4-d1-relu-lecun_normal-lr0.001-s0", "w4-d1-relu-lecun_normal-lr1e+30-s0"
    # A learning rate of 1e30 passes validation (positive, finite) and makes training diverge:
    # fit raises FloatingPointError after epoch 1, an honest runtime failure.
    argv = ["--widths", "4", "--depths", "1", "--activations", "relu", "--learning-rates", "0.001,1e30",
            "--workers", "2"] + TINY
    real_command = sweep.run._child_command

    def command(config_path):  # the child's config.json, written by the sweep
        if json.loads(pathlib.Path(config_path).read_text())["learning_rate"] == 0.001:
            return [sys.executable, "-c", KILLED_AT_EPOCH_1, config_path]
        return real_command(config_path)

    monkeypatch.setattr(sweep.run, "_child_command", command)
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "FloatingPointError" in err and "last lines of its log" in err
    client = mlflow.MlflowClient()
    (parent,) = [r for r in all_runs() if r.data.tags.get("ntk_tracking.kind") == "sweep"]
    parent_id = parent.info.run_id
    assert parent.info.status == "FAILED"
    assert good in parent.data.tags["error"] and bad in parent.data.tags["error"]
    children = find_children(client, parent_id)
    assert children[bad].info.status == "FAILED"
    assert children[bad].data.tags["error"].startswith("FloatingPointError: training diverged")
    assert children[good].info.status == "FAILED"
    assert f"killed by {signal.SIGKILL.name}" in children[good].data.tags["error"]
    assert steps(children[good].info.run_id, "train/loss") == [0]
    assert "logs/train.log" in {a.path for a in client.list_artifacts(children[bad].info.run_id, "logs")}

    # Relaunch: both unfinished children run again; the killed one resumes and finishes, and
    # --analyze measures it (the only finished child).
    monkeypatch.setattr(sweep.run, "_child_command", real_command)
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(argv + ["--parent-run-id", parent_id, "--analyze", "--subsets", "2", "--points", "4"])
    assert exit_info.value.code == 1
    assert "0 finished already, 2 to train" in capsys.readouterr().out
    assert len(all_runs()) == 3
    children = find_children(client, parent_id)
    good_id = children[good].info.run_id
    assert children[good].info.status == "FINISHED" and "error" not in children[good].data.tags
    assert steps(good_id, "train/loss") == [0, 1, 2]  # no epoch logged twice
    assert CheckpointStore(good_id, client).cv_epochs() == [0, 1, 2]
    assert steps(good_id, "ntk/entropy/train") == [0, 1, 2]
    assert steps(children[bad].info.run_id, "ntk/entropy/train") == []
    assert children[bad].info.status == "FAILED"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert bad in parent.data.tags["error"] and good not in parent.data.tags["error"]
    assert parent.data.tags["ntk_tracking.sweep_failed"] == bad


@pytest.mark.parametrize("bad, message", [
    (["--task", "mnist_resnet"], "unknown task"),
    (["--widths", "4,0"], "width must be a positive integer"),
    (["--activations", "relu,softplusplus"], "unknown activation"),
    (["--inits", "zeros"], "unknown init"),
    (["--widths", "4,x"], "--widths"),
    (["--depths", "1,1"], "more than once"),
    (["--learning-rates", "0.1,-1"], "learning_rate"),
    (["--epochs", "-1"], "epochs"),
    (["--train-size", "999999"], "train_size"),
    (["--workers", "0"], "--workers"),
    (["--parent-run-id", "0123456789abcdef0123456789abcdef"], "no MLflow run"),
    (["--analyze", "--points", "1"], "≥ 2"),
    (["--cv-steps", "1,0"], "cv_steps must be positive integers"),
    (["--cv-steps", "100000"], "beyond the run's last optimizer step"),
])
def test_bad_input_creates_no_run(store, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(["--widths", "4", "--depths", "1", "--activations", "relu"] + TINY + bad)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    # Most checks fail before the tracking store is even opened; none leaves a run or artifact.
    assert not (store / "mlflow.db").exists() or all_runs() == []
    assert not (store / "mlruns").exists()


def test_bad_input_under_mlflow_run_ends_the_launched_run_failed(store, monkeypatch, capsys):
    launched = mlflow.MlflowClient().create_run("0").info.run_id  # what `mlflow run` creates first
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    with pytest.raises(SystemExit):
        sweep_main(["--widths", "8,0"] + TINY)
    run = mlflow.MlflowClient().get_run(launched)
    assert run.info.status == "FAILED"
    assert "width" in run.data.tags["error"]
    assert len(all_runs()) == 1

    launched = mlflow.MlflowClient().create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    with pytest.raises(SystemExit):  # a usage error from argparse ends it FAILED too
        sweep_main(["--workers", "two"] + TINY)
    run = mlflow.MlflowClient().get_run(launched)
    assert run.info.status == "FAILED" and "--workers" in run.data.tags["error"]

    training = mlflow.MlflowClient().create_run("0", tags={"ntk_tracking.kind": "training"}).info.run_id
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with pytest.raises(SystemExit):
        sweep_main(["--parent-run-id", training] + TINY)
    assert "not a sweep" in capsys.readouterr().err


def _scannable(task: str) -> bool:
    """Tasks with the width × depth × activation × init fields the sweep grid scans."""
    import dataclasses

    from ntk_tracking.tasks import get_task

    fields = {f.name for f in dataclasses.fields(get_task(task).config_class)}
    return {"width", "depth", "activation", "init"} <= fields


@pytest.mark.parametrize("task", sorted(t for t in TASKS if _scannable(t)))
def test_children_get_every_training_option(task, tmp_path):
    """Each child's config file holds the grid point's config, defaults included, and the command
    it prints to resume it parses back to that config."""
    spec, _ = parse_sweep(["--task", task, "--width", "8", "--depth", "2", "--activation", "tanh",
                                 "--learning-rates", "0.01,0.003",
                                 "--seeds", "0,1", "--epochs", "3", "--cv_every", "2"])
    points = spec.points()
    assert len(points) == 4
    for point in points:
        config, argv, _ = child_config(spec, point, tmp_path)
        assert config == spec.config(point)
        assert config_from_args(task, train_parser(task).parse_args(argv)) == spec.config(point)
    assert spec.config(points[-1]).learning_rate == 0.003 and spec.config(points[-1]).seed == 1
    assert spec.config(points[0]).cv_every == 2
    # Empty values (what MLproject passes for unset parameters) mean the task's defaults.
    spec, _ = parse_sweep(["--task", task, "--widths", "", "--depths", "", "--activations", "", "--epochs", ""])
    default = config_from_args(task, train_parser(task).parse_args([]))
    assert spec.config(spec.points()[0]) == default
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    # Without grid options: the width × depth × activation scan.
    spec, _ = parse_sweep(["--task", task])
    assert (spec.grid["width"], spec.grid["depth"], spec.grid["activation"]) == ([16, 64, 256], [1, 2, 4], ["relu", "tanh"])
    assert len(spec.points()) == 18


def test_a_task_without_the_scanned_fields_needs_a_grid_and_lists_its_options():
    with pytest.raises(ValueError, match="nothing to sweep: give --grid FIELD=V1,V2.*latents"):
        parse_sweep(["--task", "mnist_vae"])
    with pytest.raises(ValueError, match="--widths: task 'molpcba_gnn' has no option 'width' to sweep; its options: "):
        parse_sweep(["--task", "molpcba_gnn", "--widths", "4,8"])


@pytest.mark.parametrize("given, analyze", [([], False), (["--analyze"], True), (["--analyze", "yes"], True),
                                            (["--analyze", "no"], False), (["--analyze", ""], False)])
def test_analyze_takes_yes_or_no_and_empty_means_no(given, analyze):
    """--analyze as MLproject passes it: yes/no, or empty (the parameter left unset) for no."""
    assert parse_sweep(["--task", "mnist_dense", *given])[1].analyze is analyze


def test_analyze_refuses_other_words(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_sweep(["--task", "mnist_dense", "--analyze", "maybe"])
    assert exit_.value.code == 2 and "expected yes or no, got 'maybe'" in capsys.readouterr().err


def test_analyzing_a_sweep_with_a_damaged_checkpoint_names_it_and_exits_incomplete(store, capsys):
    """`analyze PARENT` exits 3, not 0, while a child's checkpoint is left unlogged; the rest are logged."""
    import pathlib

    from ntk_tracking.cli.analyze import EXIT_INCOMPLETE, analyze_main

    parent = sweep_main(["--task", "mnist_dense", "--grid", "width=4,8", "--depth", "1", "--cv-every", "1", *TINY])
    children = find_children(mlflow.MlflowClient(), parent)
    damaged = children["width=4"].info.run_id
    root = mlflow.utils.file_utils.local_file_uri_to_path(mlflow.MlflowClient().get_run(damaged).info.artifact_uri)
    arrays = [f for f in pathlib.Path(root, "checkpoints", "1").rglob("*") if f.is_file() and "d" in f.parts]
    target = max(arrays, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="checkpoint 1 not analyzed"), pytest.raises(SystemExit) as exit_info:
        analyze_main([parent, "--subsets", "2", "--points", "4", "--no-progress"])
    assert exit_info.value.code == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "skipped: 1 checkpoint(s) not logged: child width=4: checkpoint 1:" in err
    assert steps(damaged, "ntk/entropy/train") == [0, 2]
    assert steps(children["width=8"].info.run_id, "ntk/entropy/train") == [0, 1, 2]
