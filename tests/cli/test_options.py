"""Every advertised option runs and has an effect: activations, initializations, optimizers,
cv_log_points, the analyzer's --seed, --implementation and --memory-budget-mb, the
`ntk-tracking` dispatcher and `ntk-tracking quickstart` from the command line."""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import subprocess
import sys

import mlflow
import pytest

from ntk_tracking import tracking
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli import main
from ntk_tracking.cli.train import train_main
from conftest import metric_history

ROOT = pathlib.Path(__file__).resolve().parents[2]

BASE = ["--width", "8", "--depth", "1", "--epochs", "1", "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--learning-rate", "0.01", "--no-progress"]
ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]
ACTIVATIONS = ["sigmoid", "gelu", "elu", "swish"]  # relu is the reference
INITS = ["he_normal", "glorot_normal", "he_uniform"]  # lecun_normal is the reference
OPTIMIZERS = ["adamw", "sgd", "momentum"]  # adam is the reference
VARIANTS = {"reference": []}
VARIANTS.update({f"activation={a}": ["--activation", a] for a in ACTIVATIONS})
VARIANTS.update({f"init={i}": ["--init", i] for i in INITS})
VARIANTS.update({f"optimizer={o}": ["--optimizer", o] for o in OPTIMIZERS})


@pytest.fixture(scope="module")
def runs(module_store):
    """Run ids of the reference configuration and of one variant per option value, trained once."""
    return {name: train_main("mnist_dense", BASE + extra) for name, extra in VARIANTS.items()}


@pytest.fixture(scope="module")
def reference_analysis(runs):
    """The reference run analyzed with the default settings (seed 0, implementation auto)."""
    assert analyze_main([runs["reference"]] + ANALYSIS) == [0, 1]
    return runs["reference"]


def first(run_id, key):
    return metric_history(run_id, key)[0][1]


def assert_trained(run_id, **params):
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    for name, value in params.items():
        assert run.data.params[name] == value, name
    losses = metric_history(run_id, "train/loss")
    assert [s for s, _ in losses] == [0, 1] and all(math.isfinite(v) for _, v in losses)
    assert CheckpointStore(run_id, mlflow.MlflowClient()).cv_epochs() == [0, 1]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_changes_the_network(runs, activation):
    """Same seed, other activation: the initial network already computes something else."""
    run_id = runs[f"activation={activation}"]
    assert_trained(run_id, activation=activation)
    assert first(run_id, "train/loss") != pytest.approx(first(runs["reference"], "train/loss"), rel=1e-6)


@pytest.mark.parametrize("init", INITS)
def test_initialization_changes_the_initial_weights(runs, init):
    run_id = runs[f"init={init}"]
    assert_trained(run_id, init=init)
    assert first(run_id, "train/param_norm") != pytest.approx(
        first(runs["reference"], "train/param_norm"), rel=1e-6)
    assert first(run_id, "train/loss") != pytest.approx(first(runs["reference"], "train/loss"), rel=1e-6)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_changes_the_updates_only(runs, optimizer):
    """Same initial network (epoch 0 identical), other updates (after epoch 1 the weights differ
    from every other optimizer's)."""
    run_id = runs[f"optimizer={optimizer}"]
    assert_trained(run_id, optimizer=optimizer)
    assert metric_history(run_id, "train/loss")[0] == metric_history(runs["reference"], "train/loss")[0]
    others = [runs["reference"]] + [runs[f"optimizer={o}"] for o in OPTIMIZERS if o != optimizer]
    for other in others:
        assert metric_history(run_id, "train/param_norm")[-1][1] != pytest.approx(
            metric_history(other, "train/param_norm")[-1][1], rel=1e-7), other


def trained_through_dispatcher(capsys, argv) -> str:
    main(["train", "mnist_dense", *argv])
    return capsys.readouterr().out.split("ntk-tracking analyze ")[-1].split()[0]


def test_cv_log_points_adds_log_spaced_checkpoints(module_store, capsys):
    """Through `ntk-tracking train`: 10 epochs, cv_every 10 and 4 log points, 10^(0, 1/3, 2/3, 1),
    checkpoint epochs 0, 1, 2, 5 and 10."""
    run_id = trained_through_dispatcher(capsys, BASE + ["--epochs", "10", "--cv-every", "10", "--cv-log-points", "4"])
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["cv_log_points"] == "4" and run.data.params["epochs"] == "10"
    assert CheckpointStore(run_id, mlflow.MlflowClient()).cv_epochs() == [0, 1, 2, 5, 10]
    assert [s for s, _ in metric_history(run_id, "train/loss")] == list(range(11))


def analysis_settings(run_id) -> dict:
    return tracking.load_json_artifact(run_id, "analysis/settings.json")


def test_default_analysis_records_its_settings(reference_analysis):
    """auto picks the structured engine for a small dense network."""
    settings = analysis_settings(reference_analysis)
    assert settings["seed"] == 0 and settings["implementation"] == "auto"
    assert settings["memory_budget"] is None
    assert settings["check"]["ok"] and settings["check"]["implementation"] == "structured"


# The optimizer variants start from the reference's initial network, so their epoch-0 kernels
# are the reference's: each is analyzed once with other settings and compared at epoch 0.
@pytest.mark.parametrize("variant, options, recorded", [
    ("optimizer=sgd", ["--implementation", "jacobian"], {"implementation": "jacobian"}),
    ("optimizer=momentum", ["--implementation", "ntvp", "--memory-budget-mb", "1"],
     {"implementation": "ntvp", "memory_budget": 2**20}),
], ids=["jacobian", "ntvp-1MiB"])
def test_implementation_and_memory_budget_are_recorded_and_agree(runs, reference_analysis, variant,
                                                                  options, recorded):
    run_id = runs[variant]
    assert analyze_main([run_id] + ANALYSIS + options) == [0, 1]
    settings = analysis_settings(run_id)
    for name, value in recorded.items():
        assert settings[name] == value, name
    assert settings["check"]["ok"] and settings["check"]["implementation"] == recorded["implementation"]
    for key in ("ntk/trace/train", "ntk/trace/test", "ntk/entropy/train", "ntk/entropy/test"):
        assert first(run_id, key) == pytest.approx(first(reference_analysis, key), rel=1e-4), key


def test_analyzer_seed_draws_other_subsets(runs, reference_analysis):
    """--seed 1 on the reference's initial network: other measurement subsets, other values
    (with seed 0 the same network gives the same values: the test above)."""
    run_id = runs["optimizer=adamw"]
    assert analyze_main([run_id] + ANALYSIS + ["--seed", "1"]) == [0, 1]
    assert analysis_settings(run_id)["seed"] == 1
    for key in ("ntk/trace/train", "ntk/trace/test"):
        assert first(run_id, key) != pytest.approx(first(reference_analysis, key), rel=1e-3), key


@pytest.mark.parametrize("argv, code, stream", [([], 2, "out"), (["--help"], 0, "out"), (["bogus"], 2, "err")],
                         ids=["none", "help", "unknown"])
def test_dispatcher_usage(capsys, argv, code, stream):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    out, err = capsys.readouterr()
    text = out if stream == "out" else err
    assert "usage: ntk-tracking" in text and "mnist_cnn" in text


def test_dispatcher_analyzes(runs, capsys):
    """`ntk-tracking analyze RUN_ID …` (training through it: the cv_log_points test)."""
    run_id = runs["init=glorot_normal"]
    main(["analyze", run_id, *ANALYSIS, "--splits", "test"])
    assert f"run {run_id}: epochs [0, 1]" in capsys.readouterr().out
    assert [s for s, _ in metric_history(run_id, "ntk/entropy/test")] == [0, 1]
    assert not metric_history(run_id, "ntk/entropy/train")  # --splits test only
    with pytest.raises(SystemExit):
        main(["train", "no_such_task"])


def test_quickstart_from_the_command_line(tmp_path):
    """The `ntk-tracking` console script runs the quickstart end to end into a fresh store."""
    script = shutil.which("ntk-tracking", path=os.path.dirname(sys.executable)) or shutil.which("ntk-tracking")
    assert script, "the ntk-tracking console script is not installed: pip install -e ."
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.run([script, "quickstart", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quickstart done" in proc.stdout
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id in proc.stdout and run.info.status == "FINISHED"
    # The run is analyzed already: no analysis hint; where to look in the UI instead, last.
    assert "ntk-tracking analyze" not in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f"  Model metrics: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "/model-metrics?workflowType=machine_learning")
    assert f"mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']} --port 5000" in proc.stdout

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    for key in ("train/loss", "test/accuracy", "ntk/entropy/train", "ntk/trace/test"):
        assert steps(key) == list(range(11)), key
    accuracy = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/accuracy"))
    assert accuracy[-1][1] > 0.8  # 10 epochs on 2,000 digits
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert "analysis/evolution.png" in listed
