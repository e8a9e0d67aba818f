"""Sweep reports: a real 2×2 sweep (trained and analyzed), synthetic sweeps, bad inputs."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import time

import mlflow
import pytest
from mlflow.entities import Metric

from ntk_tracking import regimes, tracking
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from ntk_tracking.keys import REGIME_TAG
from ntk_tracking.cli.report import report_main
from ntk_tracking.report import report
from conftest import metric_history, use_tracking_store

TINY = ["--epochs", "2", "--train-size", "64", "--test-size", "32", "--batch-size", "16",
        "--cv-every", "1", "--no-progress"]
TINY_ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]
WIDTHS, DEPTHS = (4, 8), (1, 2)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One SQLite store for the synthetic sweeps (each test makes its own parent; conftest's `store`
    opens it): fresh stores cost seconds of schema migration each."""
    return tmp_path_factory.mktemp("synthetic")


def make_parent(client, grid, task="mnist_dense"):
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    parent = client.create_run(exp, tags={"ntk_tracking.kind": "sweep", "ntk_tracking.task": task}).info.run_id
    tracking.log_json_artifact(client, parent, {"task": task, "grid": grid, "fixed": {}}, "sweep.json")
    return exp, parent


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """A 2×2 width × depth sweep of mnist_dense, each child trained and analyzed for real."""
    path = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        use_tracking_store(mp, path)
        client = mlflow.MlflowClient()
        grid = {"width": list(WIDTHS), "depth": list(DEPTHS), "activation": ["relu"],
                "init": ["lecun_normal"], "seed": [0]}
        exp, parent = make_parent(client, grid)
        children = []
        for w in WIDTHS:
            for d in DEPTHS:
                child = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
                mp.setenv("MLFLOW_RUN_ID", child)  # what the sweep's `mlflow run` does
                assert train_main("mnist_dense", TINY + ["--width", str(w), "--depth", str(d)]) == child
                mp.delenv("MLFLOW_RUN_ID", raising=False)
                children.append(child)
        unanalyzed = report_error(parent)
        for child in children:
            analyze_main([child] + TINY_ANALYSIS)
        result = report(parent, progress=False)
        yield dict(client=client, parent=parent, children=children, result=result, path=path,
                   unanalyzed_error=unanalyzed)
        mlflow.set_tracking_uri(None)


@pytest.fixture
def sweep(real_sweep, monkeypatch):
    """The real sweep, its store made current again (other tests switch stores)."""
    use_tracking_store(monkeypatch, real_sweep["path"])
    return real_sweep


def report_error(parent):
    with pytest.raises(ValueError) as err:
        report(parent, progress=False)
    return str(err.value)


def read_csv(run_id, name):
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"report/{name}")
    with open(local, newline="") as f:
        return list(csv.DictReader(f))


# -- the real sweep -------------------------------------------------------------------------

def test_report_logs_figures_and_tables_to_the_parent(sweep):
    client, parent, result = sweep["client"], sweep["parent"], sweep["result"]
    listed = {a.path for a in client.list_artifacts(parent, "report")}
    expected = {"report/evolution.png", "report/scaling_relu.png", "report/history.csv", "report/runs.csv",
                "report/summary.json"}
    assert expected == listed == set(result.artifacts)
    for png in ("evolution.png", "scaling_relu.png"):
        local = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path=f"report/{png}")
        with open(local, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result.skipped == [] and set(result.regimes) == set(sweep["children"])


def test_history_csv_holds_exactly_the_logged_points(sweep):
    client, parent = sweep["client"], sweep["parent"]
    rows = read_csv(parent, "history.csv")
    for child in sweep["children"]:
        run = client.get_run(child)
        keys = [k for k in run.data.metrics if k.startswith(("train/", "test/", "ntk/"))]
        assert {"train/loss", "test/loss", "ntk/entropy/train", "ntk/trace/test"} <= set(keys)
        for key in keys:
            logged = [(m.step, m.timestamp, m.value)
                      for m in sorted(client.get_metric_history(child, key), key=lambda m: (m.step, m.timestamp))]
            table = [(int(r["step"]), int(r["timestamp"]), float(r["value"]))
                     for r in rows if r["run_id"] == child and r["metric"] == key]
            assert table == logged, key
        mine = [r for r in rows if r["run_id"] == child]
        assert {(r["width"], r["depth"]) for r in mine} == {(run.data.params["width"], run.data.params["depth"])}
    assert not any(r["metric"].startswith("regime/") for r in rows)  # the report's own output stays out


def test_runs_csv_and_regime_on_each_child(sweep):
    client, parent, result = sweep["client"], sweep["parent"], sweep["result"]
    rows = {r["run_id"]: r for r in read_csv(parent, "runs.csv")}
    assert set(rows) == set(sweep["children"])
    for child, regime in result.regimes.items():
        run = client.get_run(child)
        row = rows[child]
        assert run.data.tags[REGIME_TAG] == regime.label == row["regime"]
        assert regime.label in regimes.REGIMES
        ((step, recovery),) = metric_history(child, "regime/entropy_recovery/train", client)
        assert step == 2  # the last NTK epoch
        assert (math.isnan(recovery) and math.isnan(regime.recovery)) or recovery == regime.recovery
        assert metric_history(child, "regime/entropy_drop/train", client)[0][1] == pytest.approx(regime.drop)
        assert float(row["regime_drop"]) == pytest.approx(regime.drop)
        # The regime follows from the logged entropy and std alone.
        entropy = metric_history(child, "ntk/entropy/train", client)
        stds = dict(metric_history(child, "ntk/entropy_std/train", client))
        again = regimes.classify_entropy(entropy, regimes.standard_errors(stds, 2))
        assert again == regime
        # Summary columns are the logged values at epoch 0 and at the last step.
        for key in ("train/loss", "ntk/trace/test"):
            points = metric_history(child, key, client)
            assert float(row[f"{key}@epoch0"]) == points[0][1] and points[0][0] == 0
            assert float(row[f"{key}@last"]) == points[-1][1]
        # Evolution rows hold the other property at its reference (width 4, depth 1).
        in_evolution = row["width"] == "4" or row["depth"] == "1"
        assert row["figures"] == ("evolution;scaling_relu" if in_evolution else "scaling_relu")
        assert row["analyzed"] == "True"
        assert row["width"] == run.data.params["width"]
    summary = json.loads(pathlib.Path(mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="report/summary.json")).read_text())
    assert summary["references"]["width"] == "4" and summary["references"]["depth"] == "1"
    assert sum(summary["regime_counts"].values()) == 4


def test_rerun_repeats_no_regime_point(sweep):
    client = sweep["client"]
    report(sweep["parent"], progress=False)
    for child in sweep["children"]:
        assert len(metric_history(child, "regime/entropy_rise/train", client)) == 1


def test_unanalyzed_sweep_and_non_parent_runs_are_refused(sweep):
    message = sweep["unanalyzed_error"]
    assert "analyze them first" in message
    assert f"ntk-tracking analyze {sweep['parent']}" in message
    with pytest.raises(ValueError, match="not a sweep parent"):
        report(sweep["children"][0], progress=False)
    with pytest.raises(ValueError, match="no MLflow run"):
        report("0123456789abcdef0123456789abcdef", progress=False)
    with pytest.raises(ValueError, match="split"):
        report(sweep["parent"], split="validation", progress=False)


# -- synthetic sweeps (metrics logged by hand) ----------------------------------------------

def fake_child(client, exp, parent, params, entropy, loss=None, std=0.0, num_subsets=20, splits=("train", "test")):
    """A training child with hand-made histories: entropy/trace at the given epochs."""
    run_id = client.create_run(exp, tags={"mlflow.parentRunId": parent, "ntk_tracking.kind": "training"}).info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    now = int(time.time() * 1000)
    epochs = range(len(entropy) if entropy else 3)
    loss = loss or [2.3 / (1 + e) for e in epochs]
    metrics = [Metric(f"{s}/loss", v * (1.1 if s == "test" else 1), now, e)
               for e, v in zip(epochs, loss) for s in ("train", "test")]
    for e, s in zip(epochs, entropy or []):
        for split in splits:
            metrics += [Metric(f"ntk/entropy/{split}", s, now, e), Metric(f"ntk/entropy_std/{split}", std, now, e),
                        Metric(f"ntk/trace/{split}", 10.0 * 3 ** e, now, e)]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    if entropy:
        tracking.log_json_artifact(client, run_id, {"num_subsets": num_subsets}, "analysis/settings.json")
    return run_id


GRID = {"width": [16, 4, 64], "depth": [1], "activation": ["tanh", "relu"], "init": ["lecun_normal"], "seed": [0]}


def test_synthetic_sweep_regimes_rows_and_maps(store):
    client = mlflow.MlflowClient()
    exp, parent = make_parent(client, GRID)
    shapes = {"4": [2.0, 1.0, 1.02, 1.03], "16": [2.0, 1.0, 1.5, 1.9], "64": [1.0, 1.5, 2.0, 2.5]}
    ids = {}
    for act in GRID["activation"]:
        for w, s in shapes.items():
            entropy = s if act == "relu" else [2.0, 1.0, math.nan, math.nan] if w == "64" else s
            ids[act, w] = fake_child(client, exp, parent, dict(width=w, depth="1", activation=act,
                                                               init="lecun_normal", seed="0"), entropy)
    result = report(parent, progress=False)
    labels = {key: result.regimes[rid].label for key, rid in ids.items()}
    assert labels["relu", "4"] == regimes.COMPRESSION
    assert labels["relu", "16"] == regimes.STRUCTURE_FORMATION
    assert labels["relu", "64"] == regimes.STRUCTURE_FORMATION  # no compression phase
    assert labels["tanh", "64"] == regimes.DIVERGED
    assert result.regimes[ids["relu", "16"]].recovery == pytest.approx(0.9)
    listed = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/scaling_relu.png", "report/scaling_tanh.png", "report/evolution.png"} <= listed
    summary = json.loads(pathlib.Path(mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="report/summary.json")).read_text())
    # Numbers: the lower middle; names: the first listed.
    assert summary["references"] == {"width": "16", "depth": "1", "activation": "tanh", "init": "lecun_normal",
                                     "learning_rate": ""}  # not a param of these runs
    assert summary["values"]["width"] == ["4", "16", "64"]  # numbers ascending, whatever sweep.json's order
    rows = {r["run_id"]: r for r in read_csv(parent, "runs.csv")}
    # Width row: tanh at every width; activation row: both activations at the reference width.
    assert rows[ids["tanh", "4"]]["figures"] == "evolution;scaling_tanh"
    assert rows[ids["relu", "4"]]["figures"] == "scaling_relu"
    assert rows[ids["relu", "16"]]["figures"] == "evolution;scaling_relu"
    assert [rows[i]["width"] for i in rows][:3] == ["4", "16", "64"]  # numbers sorted numerically


def test_learning_rate_axis_gets_its_own_maps(store):
    client = mlflow.MlflowClient()
    exp, parent = make_parent(client, {"width": [4], "depth": [1], "learning_rate": [0.01, 0.001]})
    for lr, entropy in (("0.001", [2.0, 1.0, 1.01]), ("0.01", [2.0, 1.0, 1.9])):
        fake_child(client, exp, parent, dict(width="4", depth="1", activation="relu", init="lecun_normal",
                                             learning_rate=lr, seed="0"), entropy)
    result = report(parent, progress=False)
    assert {"report/scaling_relu_0.001.png", "report/scaling_relu_0.01.png", "report/evolution.png"} <= set(
        result.artifacts)
    rows = read_csv(parent, "runs.csv")
    assert [(r["learning_rate"], r["regime"]) for r in rows] == [("0.001", "compression"),
                                                                 ("0.01", "structure_formation")]


def test_partly_analyzed_sweep_skips_with_a_warning(store):
    client = mlflow.MlflowClient()
    exp, parent = make_parent(client, {"width": [4, 8], "depth": [1]})
    done = fake_child(client, exp, parent, dict(width="4", depth="1", activation="relu", init="lecun_normal",
                                                seed="0"), [2.0, 1.0, 1.5])
    pending = fake_child(client, exp, parent, dict(width="8", depth="1", activation="relu", init="lecun_normal",
                                                   seed="0"), None)
    with pytest.warns(RuntimeWarning, match=pending):
        result = report(parent, progress=False)
    assert result.skipped == [pending] and list(result.regimes) == [done]
    rows = {r["run_id"]: r for r in read_csv(parent, "runs.csv")}
    assert rows[pending]["analyzed"] == "False" and rows[pending]["regime"] == ""
    assert REGIME_TAG not in client.get_run(pending).data.tags
    # A sweep analyzed on train only has nothing to report on test.
    train_only = make_parent(client, {"width": [4]})[1]
    fake_child(client, exp, train_only, dict(width="4"), [2.0, 1.0, 1.5], splits=("train",))
    with pytest.raises(ValueError, match="ntk/entropy/test"):
        report(train_only, split="test", progress=False)
    assert report(train_only, split="train", progress=False).skipped == []


def test_parent_without_sweep_json_or_children(store):
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("Default").experiment_id
    bare = client.create_run(exp, tags={"ntk_tracking.kind": "sweep"}).info.run_id
    with pytest.raises(ValueError, match="sweep.json"):
        report(bare, progress=False)
    _, lonely = make_parent(client, {"width": [4]})
    with pytest.raises(ValueError, match="no training child runs"):
        report(lonely, progress=False)


def test_report_command_line(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main(["--help"])
    assert exit_info.value.code == 0 and "sweep" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        report_main(["0123456789abcdef0123456789abcdef", "--no-progress"])
    assert exit_info.value.code == 2 and "no MLflow run" in capsys.readouterr().err
    client = mlflow.MlflowClient()
    exp, parent = make_parent(client, {"width": [4]})
    fake_child(client, exp, parent, dict(width="4", depth="1", activation="relu", init="lecun_normal", seed="0"),
               [2.0, 1.0, 1.01])
    result = report_main([parent, "--recovery-threshold", "0.5", "--no-progress"])
    assert "1 compression" in capsys.readouterr().out
    assert result.artifacts and os.path.basename(result.artifacts[0]) == "evolution.png"
