"""Deterministic, seeded splitting and subsampling shared by all sources."""

from __future__ import annotations

import numpy as np

TEST_FRACTION = 0.2

# Independent random streams per purpose: asking for a train subsample never moves the test one.
_SPLIT, _TRAIN, _TEST = 0, 1, 2


def check_size(size: int | None, what: str) -> None:
    """Reject a requested split size ≤ 0 before any data is read."""
    if size is not None and size <= 0:
        raise ValueError(f"{what} must be a positive number of examples, got {size}")


def shuffled_order(
    n: int, rng: np.random.Generator, labels: np.ndarray | None = None
) -> np.ndarray:
    """A random permutation of range(n); with labels, every prefix keeps the class proportions."""
    perm = rng.permutation(n)
    if labels is None:
        return perm
    _, cls, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    # The r-th example of a class sits at fraction (r + ½) / count: classes interleave evenly.
    return perm[np.argsort((rank + 0.5) / counts[cls], kind="stable")]


def split_indices(
    n: int, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices: 80/20, stratified by labels when given."""
    order = shuffled_order(n, np.random.default_rng([seed, _SPLIT]), labels)
    num_test = int(round(n * TEST_FRACTION))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def subsample(
    n: int, size: int | None, seed: int, split: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """Sorted indices of `size` of n examples (all when None), stratified by labels when given."""
    if size is None:
        return np.arange(n)
    if size > n:
        raise ValueError(
            f"{split}_size={size} asked for, but the {split} split has only {n} examples"
        )
    stream = _TRAIN if split == "train" else _TEST
    order = shuffled_order(n, np.random.default_rng([seed, stream]), labels)
    return np.sort(order[:size])
