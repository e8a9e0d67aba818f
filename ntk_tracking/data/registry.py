"""Every dataset a task reads, by name (DATASETS), collected from the modules of this package that
declare theirs: `DATASETS = {name: description}`, and `READ_BY = task` where that task's own loader
reads them (TASK_DATASETS) rather than load_dataset. A new data module declares its datasets; nothing
here lists them. load_dataset reads MNIST and Auto MPG by name or local path."""

from __future__ import annotations

import importlib
import os
import pkgutil

from ntk_tracking.data.autompg import load_autompg
from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.hub import MNIST_REPO, load_hub, load_path
from ntk_tracking.data.mnist import load_mnist5k
from ntk_tracking.data.splits import check_size


def _declared() -> tuple[dict[str, str], dict[str, str]]:
    """(every declared dataset's description, the task reading each that load_dataset does not)."""
    package = __name__.rpartition(".")[0]  # this module's package, by name: no import of it here
    datasets, readers, where = {}, {}, {}
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, text in getattr(module, "DATASETS", {}).items():
            if name in datasets:
                raise ValueError(f"dataset {name!r} is declared by both {where[name]} and {info.name}")
            datasets[name], where[name] = text, info.name
            if getattr(module, "READ_BY", None):
                readers[name] = module.READ_BY
    return datasets, readers


DATASETS, TASK_DATASETS = _declared()
_HUB_ALIASES = {MNIST_REPO: MNIST_REPO, "mnist": MNIST_REPO}
_PATH_HINT = (
    "or a local path (parquet file, CSV file with label + 784 pixel columns, save_to_disk folder)"
)


def load_dataset(
    name: str, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0
) -> Dataset:
    """Load a built-in dataset (DATASETS not in TASK_DATASETS) or an MNIST-format local path, split by seed."""
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
    if name in TASK_DATASETS:
        raise ValueError(f"dataset {name!r} is read by task {TASK_DATASETS[name]} (ntk-tracking train "
                         f"{TASK_DATASETS[name]} --dataset {name}), not by this one: expected one of "
                         f"{sorted(_loaded())}, {_PATH_HINT}")
    if _looks_like_path(name):
        raise ValueError(f"No such file or folder: {name!r} (dataset paths must exist)")
    others = ", ".join(f"{n} ({TASK_DATASETS[n]})" for n in sorted(TASK_DATASETS))
    raise ValueError(f"Unknown dataset {name!r}: expected one of {sorted(_loaded())}, {_PATH_HINT}; "
                     f"other tasks' datasets: {others}")


def _loaded() -> list[str]:
    """The names load_dataset reads."""
    return [n for n in DATASETS if n not in TASK_DATASETS]


def _looks_like_path(name: str) -> bool:
    """Whether a missing name was meant as a path rather than a dataset name."""
    return (
        name.startswith(("/", ".", "~"))
        or os.sep in name.removeprefix(MNIST_REPO)
        or name.lower().endswith((".parquet", ".csv", ".csv.gz", ".arrow"))
    )
