"""The measurement protocol (paper §4): K fixed subsets of m points, mean and std over them."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ntk_tracking.ntk.kernel import NTK, num_points, take
from ntk_tracking.ntk.stats import batch_variables


def draw_subsets(num_available: int, num_subsets: int, subset_size: int, seed: int) -> np.ndarray:
    """Indices of K subsets of m distinct points, shape (K, m); disjoint when the split allows.

    Draw once per run and reuse for every checkpoint: the same seed gives the same subsets.
    """
    if subset_size < 2:
        raise ValueError(f"subset_size (m) must be ≥ 2 for an entropy, got {subset_size}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets (K) must be ≥ 1, got {num_subsets}")
    if subset_size > num_available:
        raise ValueError(
            f"subset_size {subset_size} exceeds the {num_available} points available in the split"
        )
    rng = np.random.default_rng(seed)
    if num_subsets * subset_size <= num_available:
        chosen = rng.permutation(num_available)[: num_subsets * subset_size]
        return chosen.reshape(num_subsets, subset_size)
    return np.stack([rng.choice(num_available, subset_size, replace=False) for _ in range(num_subsets)])


class NonFiniteKernel(ArithmeticError):
    """A measured kernel holds NaN or Inf (non-finite parameters, or an overflow)."""


class Measurement:
    """Collective variables of one network on fixed subsets of one data split.

    ``run(params)`` yields ``(name, value)`` pairs with the design's metric names
    (``entropy``, ``entropy_std``, …) and keeps the per-subset spectra in ``last_spectra``.
    """

    def __init__(self, ntk: NTK, x, subsets: np.ndarray, output_mask=None):
        self.ntk = ntk
        subsets = np.asarray(subsets)
        n = num_points(x)
        if subsets.size and subsets.max() >= n:
            raise ValueError(f"subset indices reach {subsets.max()}, but the split holds {n} points")
        # Only the measured points are kept, in subset order; subset i is rows i·m … (i+1)·m − 1.
        self.points = take(x, subsets.reshape(-1))
        self.point_mask = take(output_mask, subsets.reshape(-1))
        self.subsets = np.arange(subsets.size).reshape(subsets.shape)
        self.last_spectra: np.ndarray | None = None
        self.last_kernels: np.ndarray | None = None  # (K, m, m), float64

    @property
    def inputs(self) -> list:
        """The points of each subset."""
        return [take(self.points, idx) for idx in self.subsets]

    @property
    def masks(self) -> list:
        """The output mask of each subset (None without a mask)."""
        return [take(self.point_mask, idx) for idx in self.subsets]

    def run(self, params) -> Iterator[tuple[str, float]]:
        """(name, value) of each collective variable; NonFiniteKernel if a kernel holds NaN or Inf."""
        kernels = self.ntk.subset_kernels(params, self.points, self.subsets, self.point_mask)
        self.last_kernels = np.asarray(kernels, dtype=np.float64)
        bad = int(np.sum(~np.isfinite(self.last_kernels).all(axis=(1, 2))))
        if bad:
            raise NonFiniteKernel(f"{bad} of {len(self.last_kernels)} kernels hold NaN or Inf")
        self.last_spectra, values = batch_variables(self.last_kernels)
        for name, vals in values.items():
            yield name, float(np.mean(vals))
            if name in ("entropy", "trace"):
                yield f"{name}_std", float(np.std(vals))
