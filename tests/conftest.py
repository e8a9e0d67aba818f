"""Shared test helpers. The repository root goes first on sys.path so that `pipelines` and the
working tree's `ntk_tracking` import whatever way the project was installed."""

import contextlib
import functools
import os
import pathlib
import shutil
import sys

import mlflow
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Tests run in several processes at once (pytest-xdist): on a GPU none may take most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The tests compile hundreds of tiny programs, here and in the runs they start (which inherit
# this). XLA's CPU backend compiles them with far less CPU using its older fusion code generator
# in one LLVM module (docs/contributing.md, Tests: 395 -> 165 CPU-s for the two NTK test files); it changes how
# code is generated, not what is computed. Set before JAX starts its backend; flags already
# given in XLA_FLAGS win.
FAST_CPU_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] + [f for f in FAST_CPU_COMPILE if f.split("=")[0] not in _given]).strip()


@pytest.fixture(autouse=True)
def no_mlflow_state_between_tests():
    """MLflow keeps the active run and experiment in module globals; one test's must not reach the next
    (an experiment id set against one store names nothing, or something else, in the next store)."""
    routing = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    before = {k: os.environ[k] for k in routing if k in os.environ}
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.tracking.fluent._active_experiment_id = None
    after = {k: os.environ[k] for k in routing if k in os.environ}
    leaked = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    for key in leaked:
        os.environ.pop(key) if key not in before else os.environ.__setitem__(key, before[key])
    assert not leaked, f"the test left MLflow's routing variables changed: {leaked}"


_tmp_path_factory = None


@pytest.fixture(scope="session", autouse=True)
def _remember_tmp_path_factory(tmp_path_factory):
    global _tmp_path_factory
    _tmp_path_factory = tmp_path_factory
    # The data paths training records as trusted (ntk_tracking.confine) go to a folder of the
    # session, never the user's own ~/.ntk_tracking; runs the tests start inherit it.
    os.environ["NTK_TRACKING_HOME"] = str(tmp_path_factory.mktemp("ntk-home"))


@functools.cache
def empty_store_template() -> pathlib.Path:
    """A SQLite tracking store with MLflow's schema in place, made once per session: copying it
    costs milliseconds where creating a store runs every schema migration (about a second)."""
    path = _tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def use_tracking_store(mp, path, template: bool = True) -> None:
    """Point MLflow (this process and subprocesses) at a SQLite store in `path`, run from `path`;
    a new store starts as a copy of the empty template (`template=False`: no file until MLflow
    creates it)."""
    if template and not (pathlib.Path(path) / "mlflow.db").exists():
        shutil.copy(empty_store_template(), pathlib.Path(path) / "mlflow.db")
    mp.chdir(path)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{path}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


@contextlib.contextmanager
def tracking_store(path):
    """use_tracking_store for a module- or session-scoped fixture (no function-scoped monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        use_tracking_store(mp, path)
        try:
            yield path
        finally:
            if mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)


def child_config(spec, point, folder: pathlib.Path):
    """A sweep child's config as the child reads it (the config.json the sweep writes for it), and
    the `ntk-tracking train` options of the command the child prints to resume it."""
    import shlex

    from ntk_tracking.run import load_config, train_command_line, write_config

    path = write_config(spec.config(point), folder / f"{spec.key(point)}.json")
    config = load_config(path)
    return config, shlex.split(train_command_line(spec.definition, config))[3:], path


def metric_history(run_id, key, client=None) -> list[tuple[int, float]]:
    """[(step, value)] of a metric, by step (then time, where a step was logged twice), read through
    `client` (default: the current tracking store)."""
    client = client or mlflow.MlflowClient()
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


def interrupt_logging_at(monkeypatch, kill_step: int):
    """Ctrl-C (KeyboardInterrupt) when a run logs the metrics of `kill_step`: after that step's resume
    checkpoint was issued, before its metrics. Returns the real logger, to put back."""
    from ntk_tracking import tracking

    real_log = tracking.log_metrics

    def dying_log(client, run_id, metrics, step):
        if step == kill_step:
            raise KeyboardInterrupt
        real_log(client, run_id, metrics, step)

    monkeypatch.setattr(tracking, "log_metrics", dying_log)
    return real_log


@pytest.fixture(scope="session")
def shared_tracking_server(tmp_path_factory):
    """One real `mlflow server` (SQLite + proxied artifacts) for every test of the session that
    asks for it; started on first use, stopped at the end. Yields a tests.servers.MlflowServer."""
    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("shared-server")).start()
    try:
        yield server.wait_until_healthy()
    finally:
        server.stop()


@pytest.fixture
def store_dir(tmp_path):
    """The folder `store` opens: a fresh tmp_path. A module overrides it to share one store between
    its tests (a new store costs seconds) or to open a store a module-scoped fixture filled."""
    return tmp_path


@pytest.fixture
def store(store_dir, monkeypatch):
    """The SQLite tracking store and artifact root in store_dir (fresh: tmp_path), made current and
    run from as a user's working directory; the folder."""
    use_tracking_store(monkeypatch, store_dir)
    yield store_dir
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, request):
    """One SQLite store for a whole module, current while the module runs: its module-scoped
    fixtures train into it once and its tests read it; the folder."""
    with tracking_store(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])) as path:
        yield path


@pytest.fixture(params=["sqlite", "server"])
def any_store(request, tmp_path, monkeypatch):
    """A SQLite store in tmp_path, or the session's real `mlflow server` (run from tmp_path): the URI."""
    if request.param == "sqlite":
        use_tracking_store(monkeypatch, tmp_path)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
    else:
        uri = request.getfixturevalue("shared_tracking_server").uri
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def fast_compile():
    """Tiny models: XLA optimization passes cost more than they save (flax's tests do this).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def x64():
    """Float64 for the duration of one test, restored afterwards."""
    import jax

    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# The files that take longest (measured one after another: many processes and servers, the
# engine's float64 checks, trained sweeps) start first, so that the parallel workers finish at
# about the same time (pyproject's --no-loadscope-reorder keeps this order); order within a file stays.
SLOW_FIRST = ("test_ray_sweep.py", "test_faults.py", "test_midway_faults.py", "test_stalls.py",
              "test_mlflow_ui.py", "test_step_checkpoints.py", "test_sweep_any_task.py", "test_ntk_structured.py", "test_ntk_kernel.py", "test_pipeline.py",
              "test_pong_actor_critic.py", "test_sweep.py", "test_cifar_resnet.py", "test_options.py")


# The fast tier (`python -m pytest -m "not slow"`, docs/contributing.md) leaves out these files:
# trained sweeps, Ray clusters, tracking servers killed and restarted, many processes at once.
# Single slow tests elsewhere carry @pytest.mark.slow themselves.
SLOW_FILES = ("test_ray_sweep.py", "test_faults.py", "test_midway_faults.py", "test_stalls.py",
              "test_pipeline.py", "test_one_writer.py", "test_sweep.py", "test_pong_actor_critic.py",
              "test_options.py", "test_data_paths.py", "test_report.py", "test_molecules_offline.py",
              "test_security.py", "test_learning.py", "test_step_checkpoints.py", "test_extras.py",
              "test_init_scale.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def cifar_binary(tmp_path):
    """CIFAR-10's binary release (cifar-10-batches-bin) of 120 training and 60 test images of 4
    classes whose class sets their brightness: learnable in a few steps (tests/real_format.py)."""
    from real_format import random_split, write_binary

    return write_binary(tmp_path, {"train": random_split(120, 1, classes=4), "test": random_split(60, 2, classes=4)})


@pytest.fixture
def treebank(tmp_path):
    """A UD folder with train, dev and test files (tests/real_format.py)."""
    from real_format import write_treebank

    return write_treebank(tmp_path / "UD_Tiny")


def fit_in_stretches(task, config, data, stops):
    """Trains with a StepCadence stopping at `stops` and without; asserts both end at the same
    variables and returns the stepped run's (step, epoch, epoch_end) points."""
    import jax
    import numpy as np

    from ntk_tracking.train.loop import StepCadence

    points = []
    cadence = StepCadence(tuple(stops), 0, lambda step, epoch, state, metrics, end: points.append((step, epoch, end)))
    model = task.build_model(config, data)
    stepped = task.fit(config, data, model, task.init_state(config, data, model), 0, cadence, progress=False)
    plain = task.fit(config, data, model, task.init_state(config, data, model), 0, lambda *args: None, progress=False)
    for a, b in zip(*(jax.tree_util.tree_leaves(task.cv_variables(s)) for s in (stepped, plain)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    return points
