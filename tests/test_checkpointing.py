"""CheckpointStore against real MLflow stores (sqlite + local artifacts, and a proxied server)."""

import asyncio
import gc
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from mlflow.utils.file_utils import local_file_uri_to_path

from ntk_tracking import checkpointing
from ntk_tracking.checkpointing import CheckpointError, CheckpointStore, DamagedCheckpoint
from conftest import use_tracking_store


def make_variables(seed: int) -> dict:
    """A small flax-like variables tree with float and int leaves."""
    kernel = jax.random.normal(jax.random.key(seed), (3, 4))
    return {
        "params": {"dense": {"kernel": kernel, "bias": jnp.full((4,), seed, jnp.float32)},
                   "table": jnp.arange(5, dtype=jnp.int32) * seed},
        "batch_stats": {"mean": kernel.mean(0), "count": jnp.array(seed, jnp.int32)},
    }


def make_state(seed: int) -> dict:
    """A training-state-like tree: variables plus optimizer moments and a step counter."""
    variables = make_variables(seed)
    return {"variables": variables, "opt": jax.tree.map(jnp.zeros_like, variables["params"]),
            "step": jnp.array(10 * seed, jnp.int32)}


ABSTRACT_VARIABLES = jax.eval_shape(lambda: make_variables(0))
ABSTRACT_STATE = jax.eval_shape(lambda: make_state(0))


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert isinstance(a, jax.Array) and a.dtype == e.dtype and a.shape == e.shape
        assert a.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def use_tracking_uri(monkeypatch, uri: str):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


@pytest.fixture
def run_id(tmp_path, monkeypatch):
    """A fresh run in a per-test sqlite tracking store with local artifacts."""
    use_tracking_store(monkeypatch, tmp_path)
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("checkpointing"))
    assert local_file_uri_to_path(run.info.artifact_uri).startswith(str(tmp_path))
    yield run.info.run_id
    mlflow.set_tracking_uri(None)


def artifact_dir(run_id: str) -> str:
    return local_file_uri_to_path(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)


def test_cv_round_trip_in_place(run_id):
    saved = {epoch: make_variables(epoch) for epoch in (0, 1, 3)}
    with CheckpointStore(run_id) as store:
        for epoch, variables in saved.items():
            store.save_cv(epoch, variables)
        store.wait()
        assert store.cv_epochs() == [0, 1, 3]
        for epoch, variables in saved.items():
            assert_trees_equal(store.restore_cv(epoch, ABSTRACT_VARIABLES), variables)
    checkpoints = os.path.join(artifact_dir(run_id), "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["0", "1", "3"]
    assert os.path.isfile(os.path.join(checkpoints, "3", "commit_success.txt"))
    listed = mlflow.MlflowClient().list_artifacts(run_id, "checkpoints")
    assert [f.path for f in listed] == ["checkpoints/0", "checkpoints/1", "checkpoints/3"]


def test_existing_epoch_is_kept(run_id):
    with CheckpointStore(run_id) as store:
        store.save_cv(1, make_variables(1))
        store.save_cv(1, make_variables(7))
    with CheckpointStore(run_id) as store:
        store.save_cv(1, make_variables(8))
        store.wait()
        assert_trees_equal(store.restore_cv(1, ABSTRACT_VARIABLES), make_variables(1))


def test_resume_keeps_only_latest(run_id):
    with CheckpointStore(run_id) as store:
        assert store.latest_resume(ABSTRACT_STATE) is None
        for epoch in (1, 2, 3):
            store.save_resume(epoch, make_state(epoch), {"epoch": epoch, "rng": [1, 2]})
        store.wait()
        assert sorted(os.listdir(os.path.join(artifact_dir(run_id), "checkpoints", "resume"))) \
            == ["3"]
        state, meta = store.latest_resume(ABSTRACT_STATE)
    assert_trees_equal(state, make_state(3))
    assert meta == {"epoch": 3, "rng": [1, 2]}
    with CheckpointStore(run_id) as store:
        assert store.cv_epochs() == []
        assert store.latest_resume(ABSTRACT_STATE)[1]["epoch"] == 3


def test_stale_tmp_dir_is_ignored_and_replaced(run_id):
    stale = os.path.join(artifact_dir(run_id), "checkpoints", "5.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(stale, "variables"))
    with CheckpointStore(run_id) as store:
        assert store.cv_epochs() == []
        store.save_cv(0, make_variables(0))
        store.save_cv(5, make_variables(5))
        store.wait()
        assert store.cv_epochs() == [0, 5]
        assert_trees_equal(store.restore_cv(5, ABSTRACT_VARIABLES), make_variables(5))
    assert not os.path.exists(stale)


def test_corrupt_or_missing_step_raises(run_id):
    with CheckpointStore(run_id) as store:
        for epoch in (0, 1, 2):
            store.save_cv(epoch, make_variables(epoch))
    data = os.path.join(artifact_dir(run_id), "checkpoints", "1", "variables", "d")
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    reader = CheckpointStore(run_id)
    with pytest.raises(CheckpointError, match=r"epoch 1: .*checkpoints/1"):
        reader.restore_cv(1, ABSTRACT_VARIABLES)
    with pytest.raises(CheckpointError, match="epoch 4"):
        reader.restore_cv(4, ABSTRACT_VARIABLES)
    for epoch in (0, 2):
        assert_trees_equal(reader.restore_cv(epoch, ABSTRACT_VARIABLES), make_variables(epoch))
    reader.close()


def test_failed_restores_leave_no_read_behind_a_closed_event_loop(run_id, monkeypatch, caplog):
    """A restore that fails on one array must not close Orbax's event loop under the reads of
    the other arrays: their late completion callbacks raised 'RuntimeError: Event loop is
    closed', unraisable, in TensorStore's threads, and asyncio logged 'Task exception was never
    retrieved' (intermittently, hence the repetitions). The store relies on Orbax creating that
    loop with `asyncio.new_event_loop()` on the restoring thread; if Orbax stops doing so, no
    settling loop is closed here and this test says so."""
    ignored, closed = [], []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    close = checkpointing._SettlingEventLoop.close
    monkeypatch.setattr(checkpointing._SettlingEventLoop, "close",
                        lambda loop: (closed.append(loop), close(loop))[1])
    policy = asyncio.get_event_loop_policy()
    caplog.set_level(logging.ERROR, logger="asyncio")
    with CheckpointStore(run_id) as store:
        store.save_cv(0, make_variables(0))
    data = os.path.join(artifact_dir(run_id), "checkpoints", "0", "variables", "d")
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    with CheckpointStore(run_id) as reader:
        for _ in range(25):
            with pytest.raises(DamagedCheckpoint, match="epoch 0: .*its files cannot be read back"):
                reader.restore_cv(0, ABSTRACT_VARIABLES)
    time.sleep(0.5)  # reads still in flight would complete now
    gc.collect()
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in ignored] == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert len(closed) >= 25, "Orbax no longer restores on an event loop made by asyncio.new_event_loop()"
    assert asyncio.get_event_loop_policy() is policy


def late_read_after_a_failed_one(loop: asyncio.AbstractEventLoop, thread_errors: list) -> None:
    """What a damaged step does to Orbax's restore loop: one read fails at once while another is
    still in flight and completes later from a foreign thread (TensorStore's), after the loop
    was closed. Runs it the way Orbax runs a synchronous restore: run_until_complete, close."""
    async def restore():
        pending = loop.create_future()

        async def other_read():
            return await pending

        asyncio.ensure_future(other_read())

        def complete_late():
            try:
                loop.call_soon_threadsafe(pending.set_exception, OSError("late read failed too"))
            except RuntimeError as error:
                thread_errors.append(str(error))

        threading.Timer(0.05, complete_late).start()
        raise ValueError("one read failed")

    with pytest.raises(ValueError, match="one read failed"):
        loop.run_until_complete(restore())
    loop.close()
    time.sleep(0.2)


def test_a_settling_loop_waits_for_reads_still_in_flight_before_it_closes(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    plain, settling = [], []
    late_read_after_a_failed_one(asyncio.new_event_loop(), plain)
    gc.collect()  # asyncio logs the read left pending on the closed loop
    caplog.clear()
    late_read_after_a_failed_one(checkpointing._SettlingEventLoop(), settling)
    gc.collect()
    assert plain == ["Event loop is closed"]  # what the store guards against, without it
    assert settling == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_only_loops_made_on_the_restoring_thread_settle_and_the_policy_comes_back():
    policy = asyncio.get_event_loop_policy()
    other = []
    with checkpointing._settled_event_loops():
        with checkpointing._settled_event_loops():  # nested: still this thread's
            inner = asyncio.new_event_loop()
        mine = asyncio.new_event_loop()
        thread = threading.Thread(target=lambda: other.append(asyncio.new_event_loop()))
        thread.start()
        thread.join()
        assert asyncio.get_event_loop_policy().inner is policy
    after = asyncio.new_event_loop()
    for loop in (inner, mine, *other, after):
        loop.close()
    assert isinstance(inner, checkpointing._SettlingEventLoop)
    assert isinstance(mine, checkpointing._SettlingEventLoop)
    assert not isinstance(other[0], checkpointing._SettlingEventLoop)
    assert not isinstance(after, checkpointing._SettlingEventLoop)
    assert asyncio.get_event_loop_policy() is policy


def test_no_private_orbax_module_is_imported_or_patched():
    """Orbax is used through its public API only (`orbax.checkpoint` as `ocp`, its public
    submodules): no `_src` module, no private name, nothing of Orbax's replaced."""
    root = pathlib.Path(__file__).resolve().parents[1]
    private = re.compile(r"orbax[\w.]*\._\w|from orbax[\w.]* import[^#]*\b_\w|\bocp\.(\w+\.)*_\w")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}"
                 for folder in ("ntk_tracking", "pipelines", "benchmarks", "studies", "tests")
                 for path in sorted((root / folder).rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == [], "private Orbax use:\n" + "\n".join(offenders)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def tracking_server(tmp_path_factory):
    """A real `mlflow server` with proxied artifacts on loopback; yields (uri, artifacts dir).

    Module-scoped and autouse so that its ~20 s boot overlaps the local-store tests.
    """
    root, port = tmp_path_factory.mktemp("server"), free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{root}/srv.db", "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner delays shutdown ~15 s
    with open(root / "server.log", "wb") as server_log:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=server_log,
                                  stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", root / "artifacts", server, root / "server.log"
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_healthy(uri, server, log_path, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text()[-2000:])
            time.sleep(0.3)


def test_remote_store_uploads_and_restores(tracking_server, tmp_path, monkeypatch):
    uri, artifacts, server, log_path = tracking_server
    wait_until_healthy(uri, server, log_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    use_tracking_uri(monkeypatch, uri)
    (tmp_path / "trainer").mkdir()
    monkeypatch.chdir(tmp_path / "trainer")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("remote")).info.run_id
    try:
        with CheckpointStore(run_id) as store:
            assert store.remote
            store.save_cv(0, make_variables(0))
            store.save_resume(1, make_state(1), {"epoch": 1})
            store.save_cv(2, make_variables(2))
            store.save_resume(2, make_state(2), {"epoch": 2})
            store.wait()
            staged = store._dir("cv")
            assert not list(staged.rglob("commit_success.txt"))  # uploaded steps leave staging
        assert not staged.exists() and not os.listdir(tmp_path / "trainer")
        assert not list(artifacts.rglob("*orbax-checkpoint-tmp*"))
        assert [f.path for f in client.list_artifacts(run_id, "checkpoints/resume")] \
            == ["checkpoints/resume/2"]

        (tmp_path / "analyzer").mkdir()
        monkeypatch.chdir(tmp_path / "analyzer")
        with CheckpointStore(run_id, mlflow.MlflowClient()) as reader:
            assert reader.cv_epochs() == [0, 2]
            for epoch in (0, 2):
                assert_trees_equal(reader.restore_cv(epoch, ABSTRACT_VARIABLES),
                                   make_variables(epoch))
            state, meta = reader.latest_resume(ABSTRACT_STATE)
            assert_trees_equal(state, make_state(2))
            assert meta == {"epoch": 2}
            with pytest.raises(CheckpointError, match="epoch 1"):
                reader.restore_cv(1, ABSTRACT_VARIABLES)
        assert not os.listdir(tmp_path / "analyzer")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow  # a whole run through MLflow in processes of its own: the fast tier leaves it out
def test_train_and_analyze_against_a_tracking_server(tracking_server, tmp_path, monkeypatch):
    """The whole loop with a remote store: checkpoints uploaded, downloaded by the analyzer."""
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    uri, artifacts, server, log_path = tracking_server
    wait_until_healthy(uri, server, log_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    use_tracking_uri(monkeypatch, uri)
    monkeypatch.chdir(tmp_path)
    try:
        run_id = train_main("mnist_dense", ["--width", "8", "--depth", "1", "--epochs", "2",
                                            "--train-size", "64", "--test-size", "32",
                                            "--batch-size", "16", "--no-progress"])
        assert not os.listdir(tmp_path)  # nothing left behind locally: all went to the server
        assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == [0, 1, 2]
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run_id, "ntk/entropy/train")] == [0, 1, 2]
        listed = {a.path for a in client.list_artifacts(run_id, "analysis")}
        assert "analysis/evolution.png" in listed
        assert list(artifacts.rglob("checkpoints/2/commit_success.txt"))
    finally:
        mlflow.set_tracking_uri(None)
