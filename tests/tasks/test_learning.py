"""Every training entry point learns: a tiny configuration trained through the real loop must
beat chance (classification) or predicting the mean (regression) by a clear margin."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest

from ntk_tracking.analyze_command import analyze_main
from ntk_tracking.train_command import train_main
from conftest import metric_history

COMMON = ["--depth", "1", "--train-size", "256", "--test-size", "128", "--batch-size", "32", "--no-progress"]
LEARNERS = {
    # Auto MPG: the target is in MPG (mean ≈ 23), so a larger step size gets there in 20 epochs.
    "fuel_efficiency": ["--width", "32", "--depth", "1", "--epochs", "20", "--learning-rate", "0.05",
                        "--batch-size", "32", "--train-size", "200", "--test-size", "64", "--cv-every", "20",
                        "--no-progress"],
    "mnist_dense": ["--width", "32", "--epochs", "3", "--learning-rate", "0.003", "--cv-every", "3", *COMMON],
    "mnist_cnn": ["--width", "8", "--epochs", "3", "--learning-rate", "0.003", "--cv-every", "3",
                  *COMMON[2:], "--depth", "2"],
}
MNIST_CLASSES = 10


@pytest.fixture(scope="module")
def trained(module_store):
    """trained(task) -> the run id of the task's tiny run, trained once per module."""
    runs: dict[str, str] = {}

    def run_of(task: str) -> str:
        if task not in runs:
            runs[task] = train_main(task, LEARNERS[task])
        return runs[task]

    return run_of


def values(run_id, key):
    return [v for _, v in metric_history(run_id, key)]


@pytest.mark.parametrize("task", sorted(LEARNERS))
def test_loss_falls_clearly(trained, task):
    run_id = trained(task)
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    epochs = int(mlflow.MlflowClient().get_run(run_id).data.params["epochs"])
    for split in ("train", "test"):
        losses = values(run_id, f"{split}/loss")
        assert len(losses) == epochs + 1 and all(math.isfinite(v) for v in losses)
        ratio = 0.5 if split == "train" else 0.7
        assert losses[-1] < ratio * losses[0], f"{task}: {split}/loss {losses[0]:.4g} → {losses[-1]:.4g}"


@pytest.mark.parametrize("task", sorted(LEARNERS))
def test_beats_the_trivial_predictor(trained, task):
    """Classification: accuracy above chance (1/10) by 0.3; regression: test MSE under half of
    predicting the training mean."""
    run_id = trained(task)
    if task == "fuel_efficiency":
        from ntk_tracking.data import load_dataset

        params = mlflow.MlflowClient().get_run(run_id).data.params
        data = load_dataset(params["dataset"], train_size=int(params["train_size"]),
                            test_size=int(params["test_size"]), seed=int(params["seed"]))
        predict_mean = float(np.mean((data.y_test - data.y_train.mean()) ** 2))
        test_mse = values(run_id, "test/loss")[-1]
        assert test_mse < 0.5 * predict_mean, f"test MSE {test_mse:.3g}, predicting the mean {predict_mean:.3g}"
        assert not metric_history(run_id, "test/accuracy")  # no accuracy for a regression
    else:
        chance = 1 / MNIST_CLASSES
        assert values(run_id, "test/accuracy")[0] < chance + 0.15  # an untrained network guesses
        assert values(run_id, "test/accuracy")[-1] > chance + 0.3
        assert values(run_id, "train/accuracy")[-1] > chance + 0.3


def test_cnn_run_is_analyzed(trained):
    """The dense tasks' NTK is analyzed in test_pipeline.py; the CNN's here."""
    run_id = trained("mnist_cnn")
    assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == [0, 3]
    for key in ("ntk/entropy/train", "ntk/entropy/test", "ntk/trace/train", "ntk/trace/test"):
        history = metric_history(run_id, key)
        assert [s for s, _ in history] == [0, 3], key
        assert all(math.isfinite(v) for _, v in history), key
    assert all(0 < v <= math.log(4) + 1e-9 for v in values(run_id, "ntk/entropy/train"))
    assert all(v > 0 for v in values(run_id, "ntk/trace/test"))
