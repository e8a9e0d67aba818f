"""Auto MPG (Quinlan 1993) from mlxtend's wheel: predict fuel efficiency from 7 numeric features."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pandas as pd

from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.splits import split_indices, subsample

SOURCE = "mlxtend/data/data/autompg.csv.gz (UCI Auto MPG, Quinlan 1993)"
COLUMNS = [
    "cylinders", "displacement", "horsepower", "weight", "acceleration", "model_year", "origin",
    "car_name", "mpg",
]
FEATURES = COLUMNS[:7]  # origin stays the numeric code 1/2/3 (USA/Europe/Japan), standardized
TARGET = "mpg"
# The datasets this module reads for load_dataset (data/registry.py collects every module's).
DATASETS = {"autompg": "Auto MPG (UCI) in mlxtend: 392 cars, 7 numeric features, target MPG; offline"}


def load_autompg(*, train_size: int | None, test_size: int | None, seed: int) -> Dataset:
    """Auto MPG split 80/20 by seed; features standardized with train stats, target left in MPG."""
    resource = importlib.resources.files("mlxtend.data") / "data" / "autompg.csv.gz"
    with importlib.resources.as_file(resource) as path:
        table = pd.read_csv(path, header=None, names=COLUMNS, na_values="?")
    complete = table.dropna(subset=FEATURES + [TARGET])
    x = complete[FEATURES].to_numpy(np.float64)
    y = complete[[TARGET]].to_numpy(np.float64)

    train_idx, test_idx = split_indices(len(y), seed)
    available = {"train": len(train_idx), "test": len(test_idx)}
    train_idx = train_idx[subsample(len(train_idx), train_size, seed, "train")]
    test_idx = test_idx[subsample(len(test_idx), test_size, seed, "test")]

    mean, std = x[train_idx].mean(axis=0), x[train_idx].std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column (tiny train_size) is only centred
    info = {
        "source": SOURCE,
        "split": "plain shuffle 80%/20% by seed",
        "stratified": False,
        "seed": seed,
        "rows": len(table),
        "rows_dropped_missing": len(table) - len(complete),
        "available": available,
        "sizes": {"train": len(train_idx), "test": len(test_idx)},
        "feature_names": FEATURES,
        "target": "mpg (miles per US gallon), not standardized",
        "normalization": {
            "formula": "(feature - mean) / std per feature, mean and std over the train split",
            "mean": mean.tolist(),
            "std": std.tolist(),
        },
    }
    return Dataset(
        name="autompg",
        task="regression",
        x_train=((x[train_idx] - mean) / std).astype(np.float32),
        y_train=y[train_idx].astype(np.float32),
        x_test=((x[test_idx] - mean) / std).astype(np.float32),
        y_test=y[test_idx].astype(np.float32),
        num_outputs=1,
        info=info,
    )
