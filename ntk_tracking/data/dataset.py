"""The in-memory dataset every trainer and the NTK analyzer consume."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays plus JSON-serializable provenance in `info`.

    Images are float32 (n, h, w, 1), or uint8 (n, h, w, c) from `data.cifar10` (normalized on
    device by the trainer); tabular features float32 (n, features). Labels are int32 (n,)
    for classification and float32 (n, 1) for regression.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    info: dict
