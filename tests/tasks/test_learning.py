"""Every task learns. Each task in the registry declares a LearningCheck (ntk_tracking/tasks/base.py):
a tiny configuration, trained here through the tracked loop, and what must improve in its run (a
loss falls to a fraction of where it started, an accuracy rises, ends above a bar). A new task
without one fails here."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest

from ntk_tracking.keys import TEST_LOSS, TRAIN_LOSS
from ntk_tracking.run import prepare, train
from ntk_tracking.tasks import get_task, task_names
from ntk_tracking.tasks.base import LearningCheck
from conftest import metric_history

MNIST_CLASSES = 10
_runs: dict[tuple[str, str], str] = {}  # (tracking store, task name) -> its check's run, trained once


def check_run(name: str, request) -> str:
    """The run of task `name`'s learning check, trained on first use in the current tracking store."""
    key = (mlflow.get_tracking_uri(), name)
    if key not in _runs:
        task = get_task(name)
        check = task.learning_check
        assert isinstance(check, LearningCheck), f"task {name} declares no learning check (Task.learning_check)"
        options = dict(check.options)
        if check.dataset_fixture:
            options["dataset"] = str(request.getfixturevalue(check.dataset_fixture))
        config = task.config(**options).validate()
        _runs[key] = train(task, config, prepare(task, config), f"the learning check of {name}", progress=False,
                            closing=False)
    return _runs[key]


def learning_failures(check: LearningCheck, history) -> list[str]:
    """What the run (history: key -> [(step, value)]) fails of `check`; empty when it learned."""
    failures = []
    for kind, bars in (("falls", check.falls), ("rises", check.rises), ("above", check.above)):
        for key, bar in bars.items():
            values = [v for _, v in history(key)]
            if len(values) < 2 * check.window or not all(math.isfinite(v) for v in values):
                failures.append(f"{key}: {len(values)} values {values[:6]}, need {2 * check.window} finite ones")
                continue
            first, last = np.mean(values[:check.window]), np.mean(values[-check.window:])
            ok = {"falls": last < bar * first, "rises": last > first + bar, "above": last > bar}[kind]
            if not ok:
                failures.append(f"{key} {kind} {bar:g}: from {first:.4g} to {last:.4g}")
    return failures


def assert_learns(name: str, run_id: str) -> None:
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    failures = learning_failures(get_task(name).learning_check, lambda key: metric_history(run_id, key))
    assert not failures, f"{name} did not learn: {failures}"


@pytest.mark.parametrize("name", task_names())
def test_every_task_declares_a_learning_check_and_learns(module_store, request, name):
    assert_learns(name, check_run(name, request))


def test_the_check_fails_a_run_that_did_not_learn():
    check = LearningCheck({}, falls={TRAIN_LOSS: 0.5}, rises={"train/accuracy": 0.3}, above={"test/accuracy": 0.4},
                          window=2)
    learned = {TRAIN_LOSS: [1.0, 1.0, 0.3, 0.3], "train/accuracy": [0.1, 0.1, 0.5, 0.5],
               "test/accuracy": [0.1, 0.1, 0.5, 0.5]}
    assert learning_failures(check, lambda k: list(enumerate(learned[k]))) == []
    stuck = {TRAIN_LOSS: [1.0, 1.0, 0.6, 0.6], "train/accuracy": [0.1, 0.1, 0.3, 0.3],
             "test/accuracy": [0.1, 0.1, 0.4, 0.4]}
    assert [f.split()[0] for f in learning_failures(check, lambda k: list(enumerate(stuck[k])))] == [
        TRAIN_LOSS, "train/accuracy", "test/accuracy"]
    short = {TRAIN_LOSS: [1.0, 0.1], "train/accuracy": [0.1, 0.9, 0.9, float("nan")], "test/accuracy": []}
    assert len(learning_failures(check, lambda k: list(enumerate(short[k])))) == 3


@pytest.mark.parametrize("name", ["fuel_efficiency", "mnist_dense", "mnist_cnn"])
def test_beats_the_trivial_predictor(module_store, request, name):
    """Classification: accuracy above chance (1/10) by 0.3, from a guess at the start; regression:
    test MSE under half of predicting the training mean."""
    run_id = check_run(name, request)
    values = {key: [v for _, v in metric_history(run_id, key)] for key in (TEST_LOSS, "test/accuracy", "train/accuracy")}
    if name == "fuel_efficiency":
        from ntk_tracking.data import load_dataset

        params = mlflow.MlflowClient().get_run(run_id).data.params
        data = load_dataset(params["dataset"], train_size=int(params["train_size"]),
                            test_size=int(params["test_size"]), seed=int(params["seed"]))
        predict_mean = float(np.mean((data.y_test - data.y_train.mean()) ** 2))
        assert values[TEST_LOSS][-1] < 0.5 * predict_mean, f"test MSE {values[TEST_LOSS][-1]:.3g}, mean {predict_mean:.3g}"
        assert not values["test/accuracy"]  # no accuracy for a regression
    else:
        chance = 1 / MNIST_CLASSES
        assert values["test/accuracy"][0] < chance + 0.15  # an untrained network guesses
        assert values["test/accuracy"][-1] > chance + 0.3
        assert values["train/accuracy"][-1] > chance + 0.3
        epochs = int(mlflow.MlflowClient().get_run(run_id).data.params["epochs"])
        assert len(values[TEST_LOSS]) == epochs + 1


def test_cnn_run_is_analyzed(module_store, request):
    """The dense tasks' NTK is analyzed in test_pipeline.py; the CNN's here."""
    from ntk_tracking.analyze import AnalysisSettings, Analyzer
    from ntk_tracking.run import analyze_one

    run_id = check_run("mnist_cnn", request)
    epochs, code = analyze_one(Analyzer(run_id, AnalysisSettings(num_subsets=2, subset_size=4).validate()),
                               progress=False)
    assert (epochs, code) == ([0, 3], 0)
    for key in ("ntk/entropy/train", "ntk/entropy/test", "ntk/trace/train", "ntk/trace/test"):
        history = metric_history(run_id, key)
        assert [s for s, _ in history] == [0, 3], key
        assert all(math.isfinite(v) for _, v in history), key
    assert all(0 < v <= math.log(4) + 1e-9 for _, v in metric_history(run_id, "ntk/entropy/train"))
    assert all(v > 0 for _, v in metric_history(run_id, "ntk/trace/test"))
