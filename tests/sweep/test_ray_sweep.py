"""Sweeps on Ray: a local cluster, a real tracking server, a worker killed mid-child."""

from __future__ import annotations

import os
import pathlib
import textwrap

import mlflow
import pytest

from ntk_tracking.sweep import find_children
from ntk_tracking.cli.sweep import sweep_main
from conftest import metric_history

ray = pytest.importorskip("ray")
ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--epochs", "2", "--train-size", "64", "--test-size", "32", "--batch-size", "16", "--no-progress"]
GRID = ["--widths", "4,8", "--depths", "1,2", "--activations", "relu"] + TINY
VICTIM = "w8-d2-relu-lecun_normal-lr0.001-s0"

# Imported by every Python process the test's Ray workers start: in the victim child's training
# process (`python -m ntk_tracking.run --config FILE`, FILE the child's config), kill the Ray worker
# that runs it (its parent) right after epoch 1's metrics are logged, once per run (a marker file).
# The training process dies with its worker (PR_SET_DEATHSIG).
KILL_WORKER = textwrap.dedent("""
    import os, sys
    if os.environ.get("NTK_TEST_KILL_DIR") and "ntk_tracking.run" in sys.orig_argv and "--config" in sys.orig_argv:
        import json
        argv = sys.orig_argv
        config = json.load(open(argv[argv.index("--config") + 1]))
        if config["width"] == 8 and config["depth"] == 2:
            from ntk_tracking import tracking
            marker = os.path.join(os.environ["NTK_TEST_KILL_DIR"], os.environ["MLFLOW_RUN_ID"])
            real_log = tracking.log_metrics
            def log_then_kill(client, run_id, metrics, step):
                real_log(client, run_id, metrics, step)
                if step == 1 and not os.path.exists(marker):
                    open(marker, "w").write(str(os.getppid()))
                    os.kill(os.getppid(), 9)
                    import time; time.sleep(60)  # dies with the worker
            tracking.log_metrics = log_then_kill
    elif os.environ.get("NTK_TEST_KILL_DIR") and any("default_worker" in a for a in sys.orig_argv):
        # A Ray worker (an analysis actor): killed once, as it is about to record and log the
        # checkpoint that the file analysis-victim names ("RUN_ID EPOCH"), holding its claim.
        from ntk_tracking import claims
        real_log = claims.log_points_once
        def log_or_die(client, run_id, name, metrics, step):
            request = os.path.join(os.environ["NTK_TEST_KILL_DIR"], "analysis-victim")
            marker = request + ".killed"
            if any(k.startswith("ntk/") for k in metrics) and os.path.exists(request) \
                    and open(request).read().split() == [run_id, str(step)] and not os.path.exists(marker):
                open(marker, "w").write(str(os.getpid()))
                os.kill(os.getpid(), 9)
            return real_log(client, run_id, name, metrics, step)
        claims.log_points_once = log_or_die
""")


@pytest.fixture(scope="module")
def cluster(shared_tracking_server, tmp_path_factory):
    """A 2-CPU Ray on this machine whose workers import this checkout and the kill hook."""
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(KILL_WORKER)
    kill_dir = tmp_path_factory.mktemp("killed")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "NTK_TEST_KILL_DIR", "JAX_PLATFORMS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), str(ROOT), saved["PYTHONPATH"]]))
    os.environ["NTK_TEST_KILL_DIR"] = str(kill_dir)
    os.environ["JAX_PLATFORMS"] = "cpu"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield kill_dir
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _use_server(monkeypatch, server, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)


def test_unreachable_ray_address_fails_fast(shared_tracking_server, tmp_path, monkeypatch, capsys):
    import time

    if ray.is_initialized():
        pytest.skip("a Ray is already connected in this process")
    _use_server(monkeypatch, shared_tracking_server, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        sweep_main(GRID + ["--executor", "ray", "--ray-address", "127.0.0.1:1", "--experiment", "never"])
    assert time.monotonic() - t0 < 30
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in capsys.readouterr().err
    assert mlflow.MlflowClient().get_experiment_by_name("never") is None


def test_grid_on_ray_survives_a_killed_worker(cluster, shared_tracking_server, tmp_path, monkeypatch, capsys):
    from ntk_tracking.cli.train import train_main

    _use_server(monkeypatch, shared_tracking_server, tmp_path)
    parent = sweep_main(GRID + ["--executor", "ray", "--cpus-per-run", "1", "--experiment", "ray-grid",
                                "--analyze", "yes", "--subsets", "2", "--points", "4"])
    client = mlflow.MlflowClient()
    children = find_children(client, parent)
    assert sorted(children) == sorted(f"w{w}-d{d}-relu-lecun_normal-lr0.001-s0" for w in (4, 8) for d in (1, 2))
    assert client.get_run(parent).info.status == "FINISHED"
    victim = children[VICTIM].info.run_id
    assert (cluster / victim).exists(), "the worker of the victim child was not killed"
    for key, run in children.items():
        run_id = run.info.run_id
        assert client.get_run(run_id).info.status == "FINISHED", key
        for metric in ("train/loss", "test/loss"):
            assert [s for s, _ in metric_history(run_id, metric, client)] == [0, 1, 2], (key, metric)
        assert [s for s, _ in metric_history(run_id, "ntk/entropy/train", client)] == [0, 1, 2], key  # analyzed on Ray
        logs = {a.path for a in client.list_artifacts(run_id, "logs")}
        assert {"logs/train.log", "logs/analyze.log"} <= logs, key
    assert "killed" not in client.get_run(victim).data.tags.get("error", "")

    # The killed child's metrics equal an uninterrupted run's (the same config trained locally).
    reference = train_main("mnist_dense", ["--width", "8", "--depth", "2", "--activation", "relu",
                                           "--experiment", "ray-reference"] + TINY)
    for metric in ("train/loss", "test/loss", "test/accuracy"):
        assert [v for _, v in metric_history(victim, metric, client)] == \
            [v for _, v in metric_history(reference, metric, client)]

    # A relaunch skips the finished children (and finds nothing left to analyze).
    capsys.readouterr()
    assert sweep_main(GRID + ["--executor", "ray", "--parent-run-id", parent]) == parent
    assert "4 finished already, 0 to train" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--executor", "spark"], "unknown --executor 'spark'"),
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be > 0"),
    (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be ≥ 0"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
    (["--task", "no_such_task", "--executor", "ray"], "unknown task 'no_such_task'"),
])
def test_bad_options_fail_before_any_run(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    with pytest.raises(SystemExit):
        sweep_main(GRID + extra)
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_ray_refuses_a_local_store(tmp_path, monkeypatch, capsys):
    from conftest import use_tracking_store

    use_tracking_store(monkeypatch, tmp_path, template=False)
    with pytest.raises(SystemExit):
        sweep_main(GRID + ["--executor", "ray"])
    err = capsys.readouterr().err
    assert "needs a tracking server that every worker can reach" in err and "mlflow server" in err
    assert os.listdir(tmp_path) == []


def test_analysis_on_ray_equals_the_local_analyzer_once_each(cluster, shared_tracking_server, tmp_path,
                                                             monkeypatch, capsys):
    """A sweep's children analyzed by Ray workers, one worker killed as it was about to log: the
    metrics equal the local analyzer's on the same configuration, every checkpoint logged once, and
    a rerun adds nothing."""
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    _use_server(monkeypatch, shared_tracking_server, tmp_path)
    grid = ["--widths", "4,8", "--depths", "1", "--activations", "relu"] + TINY
    parent = sweep_main(grid + ["--experiment", "ray-analysis"])
    client = mlflow.MlflowClient()
    children = {k: r.info.run_id for k, r in find_children(client, parent).items()}
    victim = children["w8-d1-relu-lecun_normal-lr0.001-s0"]
    (cluster / "analysis-victim").write_text(f"{victim} 1")
    analysis = ["--subsets", "2", "--points", "4", "--no-progress"]
    capsys.readouterr()
    analyzed = analyze_main([parent] + analysis + ["--executor", "ray", "--cpus-per-task", "1"])
    assert (cluster / "analysis-victim.killed").exists(), "no analysis worker was killed"
    assert analyzed == {run_id: [0, 1, 2] for run_id in children.values()}
    keys = ("ntk/entropy/train", "ntk/entropy/test", "ntk/trace/train", "ntk/trace/test", "ntk/entropy_std/train")
    for run_id in children.values():
        for key in keys:
            assert [s for s, _ in metric_history(run_id, key, client)] == [0, 1, 2], (run_id, key)  # once each
        assert "analysis/evolution.png" in {a.path for a in client.list_artifacts(run_id, "analysis")}

    # The local analyzer on the same configuration, trained alone, measures the same values.
    reference = train_main("mnist_dense", ["--width", "8", "--depth", "1", "--activation", "relu",
                                           "--experiment", "ray-analysis-reference"] + TINY)
    assert analyze_main([reference] + analysis) == [0, 1, 2]
    for key in keys:
        ray_values = [v for _, v in metric_history(victim, key, client)]
        assert ray_values == pytest.approx([v for _, v in metric_history(reference, key, client)], rel=1e-5), key

    # A rerun finds nothing to do and logs nothing.
    capsys.readouterr()
    assert analyze_main([parent, "--executor", "ray"] + analysis) == {run_id: [] for run_id in children.values()}
    assert "3 already analyzed" in capsys.readouterr().out
    for run_id in children.values():
        assert [s for s, _ in metric_history(run_id, "ntk/entropy/train", client)] == [0, 1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--executor", "ray", "--cpus-per-task", "0"], "--cpus-per-task must be > 0"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
    (["--executor", "ray", "--follow"], "--follow follows one training run"),
])
def test_bad_ray_analysis_options_are_refused(extra, message, tmp_path, monkeypatch, capsys):
    from ntk_tracking.cli.analyze import analyze_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    with pytest.raises(SystemExit):
        analyze_main(["0123456789abcdef"] + extra)
    assert message in capsys.readouterr().err


def test_ray_analysis_needs_a_tracking_server(tmp_path, monkeypatch, capsys):
    from ntk_tracking.cli.analyze import analyze_main
    from conftest import use_tracking_store

    use_tracking_store(monkeypatch, tmp_path)
    mlflow.MlflowClient().search_experiments()  # the store exists
    with pytest.raises(SystemExit):
        analyze_main(["0123456789abcdef", "--executor", "ray"])
    assert "needs a tracking server that every worker can reach" in capsys.readouterr().err
