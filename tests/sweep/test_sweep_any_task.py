"""Sweeps of any task over any of its options (--grid), analyzed and reported."""

from __future__ import annotations

import csv

import mlflow
import pytest

from ntk_tracking import tracking
from ntk_tracking.cli.train import config_from_args, train_parser
from ntk_tracking.cli.report import report_main
from ntk_tracking.sweep import find_children
from ntk_tracking.cli.sweep import parse_sweep, sweep_main
from ntk_tracking.tasks import TASK_NAMES, get_task
from conftest import child_config, use_tracking_store
from real_format import random_split, write_binary


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_sweeps_over_seeds_and_children_parse_back(task, tmp_path):
    spec, _ = parse_sweep(["--task", task, "--grid", "seed=0,1", "--epochs", "3"])
    assert spec.grid == {"seed": [0, 1]} and [spec.key(p) for p in spec.points()] == ["seed=0", "seed=1"]
    for point in spec.points():
        config, argv, _ = child_config(spec, point, tmp_path)
        assert config == spec.config(point)
        assert config_from_args(task, train_parser(task).parse_args(argv)) == spec.config(point)
        assert spec.config(point).epochs == 3 and spec.config(point).seed == point["seed"]


def test_grid_values_take_the_option_s_type_and_keys_name_what_varies():
    spec, _ = parse_sweep(["--task", "cifar_resnet", "--grid", "width=0.25,0.5 learning_rate=0.1,0.05",
                                 "--grid", "augment=no", "--epochs", "1"])
    assert spec.grid == {"width": [0.25, 0.5], "learning_rate": [0.1, 0.05], "augment": [False]}
    assert spec.varying() == ["width", "learning_rate"]
    assert [spec.key(p) for p in spec.points()] == [
        "width=0.25-learning_rate=0.1", "width=0.25-learning_rate=0.05",
        "width=0.5-learning_rate=0.1", "width=0.5-learning_rate=0.05"]
    assert all(spec.config(p).augment is False for p in spec.points())
    assert "width" not in spec.fixed and spec.fixed["epochs"] == 1
    assert spec.grid_text() == "width=0.25,0.5 learning_rate=0.1,0.05 augment=False"


@pytest.mark.parametrize("argv, message", [
    (["--task", "mnist_vae", "--grid", "width=4,8"], "has no option 'width' to sweep; its options: batch_size"),
    (["--task", "mnist_vae", "--grid", "latents=four,8"], "--grid latents: 'four,8' is not a comma-separated list of int"),
    (["--task", "cifar_resnet", "--grid", "augment=yes,maybe"], "not a comma-separated list of yes/no values"),
    (["--task", "mnist_vae", "--grid", "latents"], "expected FIELD=V1,V2"),
    (["--task", "mnist_vae", "--grid", "latents=4,8", "--grid", "latents=16,32"], "given more than once"),
    (["--task", "mnist_vae", "--grid", "latents=4,8", "--latents", "3"], "both swept (--grid) and fixed"),
    (["--task", "mnist_vae", "--grid", "latents=4,4"], "4 given more than once"),
    (["--task", "mnist_vae", "--grid", "seed=1"], "nothing to sweep"),
])
def test_bad_grids_are_refused_before_any_run(argv, message, tmp_path, monkeypatch, capsys):
    use_tracking_store(monkeypatch, tmp_path)
    with pytest.raises(SystemExit):
        sweep_main(argv + ["--no-progress"])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() or not tracking.client().search_runs(
        [e.experiment_id for e in tracking.client().search_experiments()])


def test_a_bad_value_of_a_valid_type_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    use_tracking_store(monkeypatch, tmp_path)
    with pytest.raises(SystemExit):
        sweep_main(["--task", "mnist_vae", "--grid", "latents=4,-1", "--no-progress"])
    assert "grid point latents=-1" in capsys.readouterr().err


def test_the_architecture_scan_is_unchanged():
    spec, _ = parse_sweep(["--task", "mnist_dense"])
    assert len(spec.points()) == 18 and spec.key(spec.points()[0]) == "w16-d1-relu-lecun_normal-lr0.001-s0"
    spec, _ = parse_sweep(["--task", "mnist_dense", "--grid", "seed=0,1"])  # --grid: only what it names
    assert spec.grid == {"seed": [0, 1]} and spec.fixed["width"] == get_task("mnist_dense").default_config().width


def report_table(client, parent, name):
    local = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path=f"report/{name}")
    with open(local) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_vae_sweep_over_latents_and_seeds_trains_analyzes_and_reports(tmp_path, monkeypatch):
    use_tracking_store(monkeypatch, tmp_path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    parent = sweep_main(["--task", "mnist_vae", "--grid", "latents=4,8", "--grid", "seed=0,1", "--epochs", "2",
                         "--train-size", "300", "--test-size", "100", "--analyze", "--subsets", "2", "--points", "4",
                         "--workers", "2", "--no-progress"])
    client = mlflow.MlflowClient()
    children = find_children(client, parent)
    assert sorted(children) == sorted(f"latents={z}-seed={s}" for z in (4, 8) for s in (0, 1))
    for key, run in children.items():
        assert run.info.status == "FINISHED", key
        assert run.data.params["latents"] == key.split("-")[0].split("=")[1]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "ntk/entropy/train")]
        assert steps == [0, 1, 2], key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "ntk/encoder/trace/test")] == [0, 1, 2]
    result = report_main([parent, "--no-progress"])
    assert {"report/evolution.png", "report/against_latents.png", "report/runs.csv"} <= set(result.artifacts)
    assert not any(a.startswith("report/scaling_") for a in result.artifacts)
    rows = report_table(client, parent, "runs.csv")
    assert sorted((r["latents"], r["seed"]) for r in rows) == [("4", "0"), ("4", "1"), ("8", "0"), ("8", "1")]
    assert "against_latents" in rows[0]["figures"] and "evolution" in rows[0]["figures"]
    summary = tracking.load_json_artifact(parent, "report/summary.json")
    assert summary["values"]["latents"] == ["4", "8"] and summary["references"] == {"latents": "4"}


@pytest.mark.slow
def test_cifar_width_by_learning_rate_sweep_on_local_files(tmp_path, monkeypatch):
    use_tracking_store(monkeypatch, tmp_path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    data = write_binary(tmp_path / "cifar", {"train": random_split(20, 1), "test": random_split(10, 2)})
    parent = sweep_main(["--task", "cifar_resnet", "--dataset", str(data), "--grid",
                         "width=0.0625,0.125 learning_rate=0.1,0.05", "--epochs", "1", "--batch-size", "10",
                         "--augment", "no", "--analyze", "--subsets", "1", "--points", "2", "--workers", "2",
                         "--no-progress"])
    client = mlflow.MlflowClient()
    children = find_children(client, parent)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children.values())
    for run in children.values():
        assert [m.step for m in client.get_metric_history(run.info.run_id, "ntk/trace/train")] == [0, 1]
    result = report_main([parent, "--no-progress"])
    assert {"report/against_width.png", "report/against_learning_rate.png", "report/evolution.png"} <= set(
        result.artifacts)
    rows = report_table(client, parent, "runs.csv")
    assert sorted((r["width"], r["learning_rate"]) for r in rows) == [
        ("0.0625", "0.05"), ("0.0625", "0.1"), ("0.125", "0.05"), ("0.125", "0.1")]
