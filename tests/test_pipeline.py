"""End to end: tracked training → CV checkpoints in the artifact store → analyzer → metrics."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import mlflow
from mlflow.entities import ViewType
import numpy as np
import pytest

from ntk_tracking import tracking
from ntk_tracking.analyze import AnalysisSettings, Analyzer
from ntk_tracking.keys import metric_key
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from conftest import interrupt_logging_at, metric_history

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--width", "8", "--depth", "1", "--epochs", "4", "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--cv-every", "2", "--no-progress"]
TINY_ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]


def test_train_checkpoint_analyze_end_to_end(store):
    run_id = train_main("mnist_dense", TINY)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["width"] == "8"
    # Per-epoch training metrics, epoch 0 = initialization.
    assert [s for s, _ in metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]
    assert [s for s, _ in metric_history(run_id, "test/accuracy")] == [0, 1, 2, 3, 4]
    # CV checkpoints at the cadence, epoch 0 and the last included, in the run's artifact store.
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 2, 4]
    listed = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/0", "checkpoints/2", "checkpoints/4"} <= listed
    assert tracking.load_json_artifact(run_id, "config.json")["width"] == 8
    # Training computed no NTK.
    assert not any(k.startswith("ntk/") for k in run.data.metrics)

    assert analyze_main([run_id] + TINY_ANALYSIS) == [0, 2, 4]
    for split in ("train", "test"):
        for name in ("entropy", "entropy_std", "entropy_effective", "trace", "trace_std",
                     "trace_per_point", "covariance_entropy"):
            steps = [s for s, _ in metric_history(run_id, metric_key("model", name, split))]
            assert steps == [0, 2, 4], (name, split)
    entropies = [v for _, v in metric_history(run_id, "ntk/entropy/train")]
    assert all(0 < v <= np.log(4) + 1e-9 for v in entropies)
    assert all(v > 0 for _, v in metric_history(run_id, "ntk/trace/test"))
    artifacts = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/evolution.png", "analysis/settings.json", "analysis/spectra"} <= artifacts
    spectra = {a.path for a in client.list_artifacts(run_id, "analysis/spectra")}
    assert len(spectra) == 3
    assert client.get_run(run_id).info.status == "FINISHED"  # the analyzer leaves the run state alone

    # Idempotent: a second analysis finds nothing to do and duplicates no metric point.
    before = {k: metric_history(run_id, k) for k in client.get_run(run_id).data.metrics}
    assert analyze_main([run_id] + TINY_ANALYSIS) == []
    after = {k: metric_history(run_id, k) for k in client.get_run(run_id).data.metrics}
    assert after == before

    # Other settings on an analyzed run are refused rather than mixed into its history.
    with pytest.raises(SystemExit):
        analyze_main([run_id, "--subsets", "3", "--points", "4", "--no-progress"])


def test_analyzer_matches_direct_measurement(store):
    """The logged trace equals the NTK engine on the restored checkpoint and the same subsets."""
    import jax

    from ntk_tracking.data import load_dataset
    from ntk_tracking.models import ntk_apply_fn
    from ntk_tracking.ntk import draw_subsets, empirical_ntk, trace

    run_id = train_main("fuel_efficiency", ["--width", "8", "--depth", "2", "--epochs", "2",
                                            "--cv-every", "1", "--no-progress"])
    analyze_main([run_id, "--subsets", "3", "--points", "5", "--splits", "test", "--no-progress"])
    analyzer = Analyzer(run_id, AnalysisSettings(num_subsets=3, subset_size=5, splits=("test",)))
    cfg = analyzer.config
    data = load_dataset(cfg.dataset, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
    model = analyzer.task.build_model(cfg, data)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), data.x_train[:1])
    variables = analyzer.store.restore_cv(2, abstract)
    subsets = draw_subsets(len(data.x_test), 3, 5, seed=0)
    traces = [trace(empirical_ntk(ntk_apply_fn(model), variables, data.x_test[idx])) for idx in subsets]
    logged = dict(metric_history(run_id, "ntk/trace/test"))[2]
    assert logged == pytest.approx(np.mean(traces), rel=1e-5)


@pytest.mark.parametrize("interval", [[], ["--resume-interval-seconds", "0"]], ids=["by-interval", "every-epoch"])
def test_resume_after_interruption_matches_uninterrupted(store, monkeypatch, interval, capsys):
    """By interval the resume step is epoch 0 and epochs 1–3 are replayed; every epoch it is
    epoch 3, whose metrics come from the checkpoint's metadata. Either way: identical metrics."""
    TINY = globals()["TINY"] + interval
    reference = train_main("mnist_dense", TINY)
    ref_final = {k: metric_history(reference, k) for k in ("train/loss", "test/loss", "test/accuracy")}

    real_log = interrupt_logging_at(monkeypatch, 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # Ctrl-C: one line and exit status 130
        train_main("mnist_dense", TINY)
    interrupted = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("Default").experiment_id], order_by=["attributes.start_time DESC"]
    )[0].info.run_id
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.startswith(f"interrupted: run {interrupted} stopped and is marked KILLED")
    assert interrupted != reference
    assert [s for s, _ in metric_history(interrupted, "train/loss")] == [0, 1, 2]
    monkeypatch.setattr(tracking, "log_metrics", real_log)

    monkeypatch.setenv("MLFLOW_RUN_ID", interrupted)  # what `mlflow run --run-id` does
    capsys.readouterr()
    assert train_main("mnist_dense", TINY) == interrupted
    assert f"after epoch {3 if interval else 0}" in capsys.readouterr().out
    for key, ref in ref_final.items():
        resumed = metric_history(interrupted, key)
        assert [s for s, _ in resumed] == [0, 1, 2, 3, 4], key  # no epoch logged twice
        np.testing.assert_allclose([v for _, v in resumed], [v for _, v in ref], rtol=1e-6, err_msg=key)
    assert CheckpointStore(interrupted, mlflow.MlflowClient()).cv_epochs() == [0, 2, 4]


def test_resume_with_other_parameters_is_refused_and_changes_nothing(store, monkeypatch, capsys):
    run_id = train_main("mnist_dense", TINY)
    before = mlflow.MlflowClient().get_run(run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with pytest.raises(SystemExit):
        train_main("mnist_dense", [a if a != "8" else "9" for a in TINY])
    assert "other parameters" in capsys.readouterr().err
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == before.info.end_time
    assert run.data.tags == before.data.tags


def runs_in_store():
    return mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.search_experiments()])


@pytest.mark.parametrize("bad, message", [
    (["--width", "0"], "width"),
    (["--activation", "softplusplus"], "activation"),
    (["--cv-every", "0"], "cv_every"),
    (["--init", "zeros"], "init"),
    (["--learning-rate", "-1"], "learning_rate"),
])
def test_bad_training_parameters_create_no_run(store, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        train_main("mnist_dense", TINY + bad)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert runs_in_store() == []
    assert not (store / "mlruns").exists() or not any((store / "mlruns").rglob("checkpoints"))


def test_experiment_option_selects_the_experiment_and_leaves_no_global_state(store, capsys):
    """--experiment creates/uses that experiment for this run only (conftest checks that no
    MLFLOW_EXPERIMENT_ID is left in the environment); a deleted one is refused before any run."""
    client = mlflow.MlflowClient()
    run_id = train_main("mnist_dense", TINY + ["--experiment", "widths"])
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name("widths").experiment_id
    assert mlflow.tracking.fluent._get_experiment_id() == "0"  # the default experiment is still the default
    client.delete_experiment(client.get_experiment_by_name("widths").experiment_id)
    every = lambda: client.search_runs(  # noqa: E731
        [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)], run_view_type=ViewType.ALL)
    before = len(every())
    with pytest.raises(SystemExit):
        train_main("mnist_dense", TINY + ["--experiment", "widths"])
    assert "experiment 'widths' is deleted" in capsys.readouterr().err
    assert len(every()) == before


def test_analyzer_bad_inputs(store, capsys):
    with pytest.raises(SystemExit):
        analyze_main(["0123456789abcdef0123456789abcdef", "--no-progress"])
    assert "no MLflow run" in capsys.readouterr().err

    with mlflow.start_run() as foreign:  # a run not made by our training entry points
        mlflow.log_metric("x", 1.0)
    with pytest.raises(SystemExit):
        analyze_main([foreign.info.run_id, "--no-progress"])
    assert "config.json" in capsys.readouterr().err

    with mlflow.start_run() as other_kind:  # a task of a later (or other) version of this tool
        mlflow.log_dict({"task": "imagenet_vit"}, "config.json")
    with pytest.raises(SystemExit):
        analyze_main([other_kind.info.run_id, "--no-progress"])
    assert "imagenet_vit" in capsys.readouterr().err

    run_id = train_main("mnist_dense", TINY)
    with pytest.raises(SystemExit):
        analyze_main([run_id, "--points", "1", "--no-progress"])
    assert "≥ 2" in capsys.readouterr().err


def test_run_without_checkpoints_and_a_corrupt_step(store, capsys):
    with mlflow.start_run() as bare:
        tracking.log_json_artifact(mlflow.MlflowClient(), bare.info.run_id,
                                   {"task": "mnist_dense", "model": "mlp", "dataset": "mnist5k",
                                    "objective": "classification"}, "config.json")
    with pytest.raises(SystemExit):
        analyze_main([bare.info.run_id, "--no-progress"])
    assert "no CV checkpoints" in capsys.readouterr().err

    run_id = train_main("mnist_dense", TINY)
    root = mlflow.utils.file_utils.local_file_uri_to_path(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    step = pathlib.Path(root, "checkpoints", "2")
    for f in step.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "commit_success" not in f.name:
            f.write_bytes(b"\0garbage\0" * 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([run_id] + TINY_ANALYSIS)
    assert exit_info.value.code == 3
    assert [s for s, _ in metric_history(run_id, "ntk/entropy/train")] == [0, 4]
    err = capsys.readouterr().err
    assert "epoch 2:" in err and "skipped: 1 damaged (epoch 2)" in err


def test_mlflow_run_entry_point_with_bad_parameter_ends_failed(store):
    """Under `mlflow run` the run exists first: a bad parameter ends it FAILED with the reason."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "mnist_dense", "--env-manager", "local",
         "-P", "width=0", "-P", "epochs=1"],
        cwd=store, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    (run,) = runs_in_store()
    assert run.info.status == "FAILED"
    assert "width" in run.data.tags["error"]


PACED_TRAINING = """\
import pathlib, sys, time

import mlflow

from ntk_tracking import checkpointing
from ntk_tracking.cli.train import train_main

gates = pathlib.Path(sys.argv[1])
save_cv = checkpointing.CheckpointStore.save_cv


def analyzed_epochs(run_id):
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "ntk/entropy/test")}


def paced_save_cv(self, epoch, variables):
    # Each later CV checkpoint waits until the analyzer has analyzed every earlier one and then
    # had time to look again and find nothing pending; the test's "stop" file ends the waiting.
    if epoch > 0:
        self.wait_cv()  # the earlier CV steps are committed, so cv_epochs() lists them
        while not (gates / "stop").exists() and not set(self.cv_epochs()) <= analyzed_epochs(self.run_id):
            time.sleep(0.05)
        time.sleep(float(sys.argv[2]))
    (gates / f"saving-{epoch}").write_text(repr(time.time()))
    save_cv(self, epoch, variables)


checkpointing.CheckpointStore.save_cv = paced_save_cv
train_main("mnist_dense", sys.argv[3:])
"""


def test_follow_analyzes_checkpoints_while_training_writes_them(store):
    """Training is paced so that every CV checkpoint after epoch 0 appears only once the analyzer
    has caught up and polled again: a --follow that stops when nothing is pending (rather than
    when training has ended) misses them."""
    poll = 0.2
    gates = store / "gates"
    gates.mkdir()
    script = store / "paced_training.py"
    script.write_text(PACED_TRAINING)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert runs_in_store() == []  # creates the store's tables now: two processes must not race to
    argv = [*TINY[:-1], "--epochs", "12", "--cv-every", "3", "--train-size", "256", "--no-progress"]
    with open(store / "training.log", "wb") as log, subprocess.Popen(
        [sys.executable, str(script), str(gates), str(5 * poll), *argv],
        cwd=store, env=env, stdout=log, stderr=subprocess.STDOUT,
    ) as proc:
        try:
            run_id = None
            for _ in range(600):  # wait for the run and its epoch-0 checkpoint
                runs = runs_in_store()
                if runs and CheckpointStore(runs[0].info.run_id, mlflow.MlflowClient()).cv_epochs():
                    run_id = runs[0].info.run_id
                    break
                assert proc.poll() is None, (store / "training.log").read_text()
                time.sleep(0.2)
            assert run_id is not None
            analyzed = analyze_main([run_id, "--subsets", "2", "--points", "4", "--follow",
                                     "--poll-seconds", str(poll), "--no-progress"])
        finally:
            (gates / "stop").touch()  # a --follow that returned early must not keep training waiting
            proc.wait(timeout=300)
    assert proc.returncode == 0, (store / "training.log").read_text()
    assert sorted(analyzed) == [0, 3, 6, 9, 12]
    assert [s for s, _ in metric_history(run_id, "ntk/entropy/test")] == [0, 3, 6, 9, 12]
    # Every later checkpoint was written after the analyzer had logged the one before it (so at
    # that moment nothing was pending), and was analyzed by the same --follow afterwards.
    logged_at = {m.step: m.timestamp / 1000 for m in mlflow.MlflowClient().get_metric_history(run_id, "ntk/entropy/test")}
    for before, epoch in zip([0, 3, 6, 9], [3, 6, 9, 12]):
        saved_at = float((gates / f"saving-{epoch}").read_text())
        assert logged_at[before] < saved_at < logged_at[epoch], (before, epoch)


def test_config_json_of_an_older_version_still_loads():
    """A config.json written before a field existed loads with that field's default."""
    from ntk_tracking.tasks import get_task

    task = get_task("mnist_dense")
    saved = task.default_config().to_dict()
    del saved["cv_log_points"]
    assert task.config_from_dict(saved) == task.default_config()
    with pytest.raises(ValueError, match="does not know"):
        task.config_from_dict({**saved, "future_field": 1})


def test_analyzer_guard_records_the_check_and_stops_a_wrong_fast_path(store, monkeypatch, capsys):
    """The first kernel is compared with ntvp: exact → recorded; a planted error → stopped, nothing logged."""
    run_id = train_main("mnist_dense", TINY)
    good = train_main("mnist_dense", TINY + ["--seed", "1"])
    assert analyze_main([good] + TINY_ANALYSIS) == [0, 2, 4]
    check = tracking.load_json_artifact(good, "analysis/settings.json")["check"]
    assert check["ok"] and check["implementation"] == "structured" and check["reference"] == "ntvp"
    assert check["relative_diff"] <= check["tolerance"]

    from ntk_tracking.ntk import structured

    exact = structured.contract
    monkeypatch.setattr(structured, "contract", lambda fa, fb, full: exact(fa, fb, full) * 1.01)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_main([run_id] + TINY_ANALYSIS)
    assert "differs from the ntvp reference" in capsys.readouterr().err
    assert not any(k.startswith("ntk/") for k in mlflow.MlflowClient().get_run(run_id).data.metrics)


def test_analyzer_says_what_runs_while_the_first_checkpoint_waits(store):
    """Stages reach the progress bar: data, compiling, the engine check on the first checkpoint only, logging."""
    run_id = train_main("mnist_dense", TINY)
    analyzer = Analyzer(run_id, AnalysisSettings(num_subsets=2, subset_size=4))
    stages = []
    analyzer.on_stage = stages.append
    first, second = analyzer.pending_epochs()[:2]
    for epoch in (first, second):
        analyzer.analyze_epoch(epoch)
    assert stages == [
        "loading data and probe sets",
        f"epoch {first}: restoring", f"epoch {first}: compiling and measuring model on train",
        f"epoch {first}: compiling and measuring model on test",
        f"epoch {first}: checking the fast-path kernel against ntvp", f"epoch {first}: logging",
        f"epoch {second}: restoring", f"epoch {second}: measuring model on train",
        f"epoch {second}: measuring model on test", f"epoch {second}: logging",
    ]
    assert analyzer.check["checked_points"] == [0, 1, 2, 3]


def test_several_runs_are_all_checked_before_any_is_analyzed(store, capsys):
    """A bad second run id refuses the whole command: the first run gets no metric."""
    run_id = train_main("mnist_dense", TINY)
    with pytest.raises(SystemExit):
        analyze_main([run_id, "0123456789abcdef0123456789abcdef"] + TINY_ANALYSIS)
    assert "0123456789abcdef0123456789abcdef" in capsys.readouterr().err
    assert not any(k.startswith("ntk/") for k in mlflow.MlflowClient().get_run(run_id).data.metrics)
    assert analyze_main([f"{run_id},{run_id}"] + TINY_ANALYSIS) == [0, 2, 4]  # one list, duplicates once
