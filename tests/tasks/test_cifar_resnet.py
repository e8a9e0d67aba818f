"""cifar_resnet: CIFAR-10 loaders on fixtures in each real format, the ResNet, its NTK, the loop, end to end."""

from __future__ import annotations

import math
import pathlib
import pickle
import time

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking import NTK
from ntk_tracking.data import cifar10
from ntk_tracking.data.hub import HubUnreachableError
from ntk_tracking.models.resnet import ResNet18, _ResNetTiny, stage_channels
from ntk_tracking.tasks import get_task
from ntk_tracking.tasks.cifar_resnet import inference_apply_fn
from ntk_tracking.train import image_classifier
from real_format import hf_dict, random_split, write_binary, write_parquet

N_TRAIN, N_TEST = 40, 20


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


@pytest.fixture(scope="module")
def splits():
    return {"train": random_split(N_TRAIN, 1), "test": random_split(N_TEST, 2)}



@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, splits):
    return write_parquet(tmp_path_factory.mktemp("hub"), splits)


@pytest.mark.parametrize("fmt", ["parquet_folder", "parquet_file", "save_to_disk", "binary", "binary_no_ext"])
def test_every_local_format_loads_the_same_uint8_images(fmt, tmp_path, splits, parquet_dir):
    if fmt == "parquet_folder":
        path = parquet_dir
    elif fmt == "parquet_file":  # one file: a single pool, split 80/20 by seed
        path = parquet_dir / "plain_text" / "train-00000-of-00001.parquet"
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        hf_dict(splits).save_to_disk(str(path))
    else:
        path = write_binary(tmp_path, splits)
        if fmt == "binary_no_ext":  # the release's files renamed without .bin: judged by content
            for f in (path / "cifar-10-batches-bin").glob("*.bin"):
                f.rename(f.with_suffix(""))
    data = cifar10.load_images(str(path))
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (32, 32, 3)
    assert data.y_train.dtype == np.int32 and data.num_outputs == 10
    if fmt == "parquet_file":
        assert len(data.x_train) + len(data.x_test) == N_TRAIN
        return
    np.testing.assert_array_equal(data.x_train, splits["train"][0])
    np.testing.assert_array_equal(data.y_train, splits["train"][1])
    np.testing.assert_array_equal(data.x_test, splits["test"][0])
    mean = data.info["normalization"]["mean"]
    np.testing.assert_allclose(mean, (splits["train"][0] / 255).mean(axis=(0, 1, 2)), rtol=1e-6)


def test_the_hub_name_reads_through_datasets(monkeypatch, splits):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo: calls.append(repo) or hf_dict(splits))
    data = cifar10.load_images("uoft-cs/cifar10", train_size=20, test_size=10)
    assert calls == ["uoft-cs/cifar10"] and data.x_train.shape == (20, 32, 32, 3)


def test_offline_without_a_path_names_the_three_options(monkeypatch):
    import datasets

    def unreachable(repo):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HubUnreachableError, match="cifar-10-batches-bin") as err:
        cifar10.load_images("uoft-cs/cifar10")
    assert isinstance(err.value, ValueError)
    assert "save_to_disk" in str(err.value) and "parquet" in str(err.value) and "mnist5k" in str(err.value)


def test_bad_inputs_raise_clear_value_errors(tmp_path, splits):
    task = get_task("cifar_resnet")
    with pytest.raises(ValueError, match="No such file or folder"):
        task.load_data(task.config(dataset=str(tmp_path / "missing")))
    big = {k: random_split(len(v[1]), 3, side=64) for k, v in splits.items()}
    with pytest.raises(ValueError, match=r"shape \(64, 64, 3\)"):
        task.load_data(task.config(dataset=str(write_parquet(tmp_path / "big", big))))
    for width in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="width must be a positive"):
            task.load_data(task.config(dataset="mnist5k", width=width))
    pickled = tmp_path / "cifar-10-batches-py"
    pickled.mkdir()
    (pickled / "data_batch_1").write_bytes(pickle.dumps({"data": [1]}))
    for path in (pickled, tmp_path):
        with pytest.raises(ValueError, match="unpickling"):
            cifar10.load_images(str(path))
    with pytest.raises(ValueError, match="unpickling"):
        cifar10.load_images(str(pickled / "data_batch_1"))
    odd = write_binary(tmp_path / "odd", splits) / "cifar-10-batches-bin"
    (odd / "data_batch_3.bin").write_bytes(b"\x00" * 100)  # neither records of 3073 bytes nor a pickle
    with pytest.raises(ValueError, match=r"data_batch_3.bin.*expected data_batch_1.bin … data_batch_5.bin"):
        cifar10.load_images(str(odd.parent))


def test_a_folder_with_several_formats_is_refused_with_each_named(tmp_path, splits):
    """The binary release, the hub's parquet files and the pickled copy side by side: which to read is
    the user's choice; each part of the folder is named, and the data.json of a single one records it."""
    write_binary(tmp_path, splits)
    write_parquet(tmp_path, splits)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({"data": [1]}))
    task = get_task("cifar_resnet")
    with pytest.raises(ValueError) as err:
        task.load_data(task.config(dataset=str(tmp_path)))
    message = str(err.value)
    assert "holds the data in several formats" in message and "\n" not in message
    for part in ("cifar-10-batches-bin/ (CIFAR-10 binary release)", "plain_text/ (parquet)",
                 "cifar-10-batches-py/ (pickled python release, never read)",
                 f"--dataset {tmp_path / 'cifar-10-batches-bin'}"):
        assert part in message, part
    binary = task.data_info(task.load_data(task.config(dataset=str(tmp_path / "cifar-10-batches-bin"))))
    assert binary["format"] == "CIFAR-10 binary release"
    assert [pathlib.Path(f).name for f in binary["files"]] == [*cifar10.BINARY_TRAIN, cifar10.BINARY_TEST]
    parquet = task.data_info(task.load_data(task.config(dataset=str(tmp_path / "plain_text"))))
    assert parquet["format"] == "parquet" and sorted(pathlib.Path(f).name for f in parquet["files"]) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    hf_dict(splits).save_to_disk(str(tmp_path / "plain_text" / "saved"))
    with pytest.raises(ValueError) as err:
        cifar10.load_images(str(tmp_path / "plain_text"))
    assert "saved/ (save_to_disk)" in str(err.value) and "train-00000-of-00001.parquet (parquet)" in str(err.value)
    assert f"--dataset {tmp_path / 'plain_text' / 'saved'}" in str(err.value)


def test_the_binary_release_beside_the_pickled_one_is_read_and_recorded(tmp_path, splits):
    write_binary(tmp_path, splits)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({"data": [1]}))
    data = cifar10.load_images(str(tmp_path))
    np.testing.assert_array_equal(data.x_test, splits["test"][0])
    assert data.info["format"] == "CIFAR-10 binary release"
    assert all("cifar-10-batches-bin" in f for f in data.info["files"])


def test_mnist5k_smoke_test_data_is_uint8_digits():
    data = get_task("cifar_resnet").load_data(get_task("cifar_resnet").config(dataset="mnist5k", train_size=100,
                                                                               test_size=50))
    assert data.x_train.dtype == np.uint8 and data.x_train.shape == (100, 28, 28, 1)
    assert data.x_train.max() == 255 and data.x_train.min() == 0


def test_resnet18_has_11_2_million_parameters_and_scales_with_width():
    def count(width):
        v = jax.eval_shape(lambda: ResNet18(width=width).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
        return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(v["params"])), v

    n, variables = count(1.0)
    assert n == 11_173_962
    assert set(variables) == {"params", "batch_stats"}
    assert count(0.25)[0] < n / 10
    assert stage_channels(1 / 16, 4) == [4, 8, 16, 32]


def test_random_crop_flip_takes_shifted_windows_of_the_padded_image():
    x = jnp.asarray(np.random.default_rng(0).integers(1, 255, (6, 8, 8, 2)), jnp.uint8)
    out = np.asarray(image_classifier.random_crop_flip(jax.random.PRNGKey(3), x))
    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(len(x)):
        windows = [w for dy in range(9) for dx in range(9) for w in
                   (padded[i, dy:dy + 8, dx:dx + 8], padded[i, dy:dy + 8, dx:dx + 8][:, ::-1])]
        assert any(np.array_equal(out[i], w) for w in windows)
    assert not np.array_equal(out, np.asarray(x))


@pytest.mark.parametrize("impl", ["jacobian", "ntvp", "structured"])
def test_ntk_of_the_tiny_resnet_with_fixed_batchnorm_matches_float64_brute_force(impl, x64):
    model = _ResNetTiny(num_classes=3, width=1 / 16)
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    # Non-trivial running statistics, as after training.
    _, updates = model.apply(variables, jnp.asarray(x, jnp.float32) / 255, train=True, mutable=["batch_stats"])
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       {"params": variables["params"], "batch_stats": updates["batch_stats"]})
    apply_fn = inference_apply_fn(model, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    flat, unravel = ravel_pytree(variables["params"])

    def f(theta):
        return apply_fn({"params": unravel(theta), "batch_stats": variables["batch_stats"]}, x).reshape(-1)

    jac = jax.jit(jax.jacfwd(f))(flat).reshape(3, -1, flat.size)
    expected = np.einsum("iok,jok->ij", jac, jac)
    kernel = np.asarray(NTK(apply_fn, impl, block_size=2)(variables, x))
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_tiny_resnet_learns_and_a_resumed_run_repeats_an_uninterrupted_one():
    task = get_task("cifar_resnet")
    config = task.config(dataset="fixture", model="resnet_tiny", width=0.125, epochs=2, batch_size=20,
                         learning_rate=0.05, warmup_epochs=0.5).validate()
    # 8×8 images whose class sets their brightness: learnable in a few steps.
    data = cifar10.uint8_dataset("fixture", random_split(120, 1, side=8, classes=4),
                                 random_split(60, 2, side=8, classes=4), num_classes=4, source="test", train_size=None, test_size=None, seed=0)
    model = task.build_model(config, data)
    state = task.init_state(config, data, model)
    log, states = {}, {}

    def record(epoch, s, metrics):
        log[epoch], states[epoch] = metrics, s

    final = task.fit(config, data, model, state, 0, record, progress=False)
    assert sorted(log) == [0, 1, 2]
    assert log[2]["train/loss"] < log[0]["train/loss"]
    assert log[2]["test/accuracy"] >= 0.5 > log[0]["test/accuracy"]  # chance is 0.25
    # Resume from the state after epoch 1: the same final variables, bit for bit.
    resumed = task.fit(config, data, model, states[1], 1, lambda *a: None, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(task.cv_variables(final)),
                    jax.tree_util.tree_leaves(task.cv_variables(resumed))):
        np.testing.assert_array_equal(a, b)


def test_tiny_resnet_stops_inside_an_epoch_without_changing_training():
    from conftest import fit_in_stretches

    task = get_task("cifar_resnet")
    config = task.config(dataset="fixture", model="resnet_tiny", width=0.125, epochs=1, batch_size=20,
                         cv_steps="1,2").validate()
    data = cifar10.uint8_dataset("fixture", random_split(60, 1, side=8, classes=4),
                                 random_split(20, 2, side=8, classes=4), num_classes=4, source="test", train_size=None, test_size=None, seed=0)
    assert task.steps_per_epoch(config, data) == 3
    assert fit_in_stretches(task, config, data, [1, 2]) == [(0, 0.0, True), (1, 1 / 3, False), (2, 2 / 3, False),
                                                            (3, 1.0, True)]


@pytest.mark.slow  # a whole run through MLflow in processes of its own: the fast tier leaves it out
def test_resnet18_train_checkpoint_analyze_end_to_end(store, splits):
    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    path = write_parquet(store / "cifar_hub", splits)
    t0 = time.perf_counter()
    run_id = train_main("cifar_resnet", ["--dataset", str(path), "--width", "0.0625", "--epochs", "1",
                                         "--train-size", "20", "--test-size", "10", "--batch-size", "10",
                                         "--no-progress"])
    t1 = time.perf_counter()
    client = mlflow.MlflowClient()
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 1]
    assert [m.step for m in client.get_metric_history(run_id, "test/accuracy")] == [0, 1]
    assert analyze_main([run_id, "--subsets", "1", "--points", "2", "--no-progress"]) == [0, 1]
    print(f"train {t1 - t0:.1f} s, analyze {time.perf_counter() - t1:.1f} s")
    metrics = client.get_run(run_id).data.metrics
    assert metrics["ntk/trace/train"] > 0 and 0 < metrics["ntk/entropy/test"] <= np.log(2) + 1e-9
