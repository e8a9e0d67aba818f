"""A new paper model is one module: a toy task outside the package is trained, analyzed, swept and
reported through the product's own commands, with no edit anywhere else."""

from __future__ import annotations

import os
import pathlib

import mlflow
import numpy as np
import pytest

from ntk_tracking import tasks
from conftest import use_tracking_store

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parents[1]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    use_tracking_store(monkeypatch, tmp_path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(tasks.MODULES_ENV, "toy_task")
    # The sweep's children are processes of their own: they find the module on their path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(tasks, "_found", None)  # discover again, now with the toy module
    yield tmp_path
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_toy_task_trains_analyzes_sweeps_and_reports(toy, capsys):
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli import main
    from ntk_tracking.cli.train import train_main
    from ntk_tracking.cli.report import report_main
    from ntk_tracking.sweep import find_children
    from ntk_tracking.cli.sweep import sweep_main

    assert "toy_sine" in tasks.task_names()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy_sine" in capsys.readouterr().out

    run_id = train_main("toy_sine", ["--epochs", "3", "--hidden", "6", "--no-progress"])
    client = mlflow.MlflowClient()
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it learns
    assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == [0, 1, 2, 3]
    trace = client.get_run(run_id).data.metrics["ntk/trace/train"]
    assert np.isfinite(trace) and trace > 0

    parent = sweep_main(["--task", "toy_sine", "--grid", "hidden=4,8", "--epochs", "2", "--analyze",
                         "--subsets", "2", "--points", "4", "--no-progress"])
    children = find_children(client, parent)
    assert sorted(children) == ["hidden=4", "hidden=8"]
    for run in children.values():
        assert [m.step for m in client.get_metric_history(run.info.run_id, "ntk/entropy/test")] == [0, 1, 2]
    result = report_main([parent, "--no-progress"])
    assert "report/against_hidden.png" in result.artifacts


def test_the_toy_task_declares_a_learning_check_and_learns(toy, request):
    """What tests/tasks/test_learning.py asks of every task in the registry, asked of this one."""
    from test_learning import assert_learns, check_run

    assert_learns("toy_sine", check_run("toy_sine", request))


def test_a_task_module_that_cannot_be_imported_is_named(monkeypatch):
    monkeypatch.setenv(tasks.MODULES_ENV, "no_such_task_module")
    monkeypatch.setattr(tasks, "_found", None)
    with pytest.raises(ValueError, match="task module 'no_such_task_module'.*cannot be imported"):
        tasks.task_names()
