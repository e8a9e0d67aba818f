"""The data a run used, as MLflow dataset inputs (name, digest, source, schema): the training data of a
training run, the NTK probe sets of an analysis. One builder for every task: it reads the arrays out of
whatever the task's data object holds; nothing is copied into the store."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from ntk_tracking.confine import looks_like_path

TRAINING_CONTEXT = "training"
PROBE_CONTEXT = "ntk probe"


def arrays_in(value, path: str = "", depth: int = 0) -> dict:
    """Every array in `value` (dataclasses, named tuples, dicts, lists, tuples), by dotted path."""
    if hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"):  # NumPy, JAX
        return {path or "data": value}  # not copied: a device array stays on its device
    if depth > 6:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, tuple) and hasattr(value, "_asdict"):
        children = value._asdict()
    elif isinstance(value, dict):
        children = {str(k): v for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        children = {str(i): v for i, v in enumerate(value)}
    else:
        return {}
    found = {}
    for key, child in children.items():
        found.update(arrays_in(child, f"{path}.{key}" if path else key, depth + 1))
    return found


def dataset(name: str, source, arrays: dict, info: dict):
    """A metadata-only MLflow dataset. Its digest, as MLflow's own numpy datasets compute theirs, covers
    the first MAX_ROWS values of each array and every shape, plus the provenance."""
    from mlflow.data.digest_utils import MAX_ROWS, compute_numpy_digest, get_normalized_md5_digest
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    heads = {k: np.asarray(a.reshape(-1)[:MAX_ROWS]) for k, a in arrays.items()}  # only these leave a device
    layout = {k: [str(np.dtype(a.dtype)), list(a.shape)] for k, a in arrays.items()}
    text = json.dumps([layout, info], sort_keys=True, default=str)
    digest = get_normalized_md5_digest([(compute_numpy_digest(heads) if heads else "").encode(), text.encode()])
    schema = Schema([TensorSpec(np.dtype(a.dtype), (-1, *a.shape[1:]), k) for k, a in arrays.items()]) if arrays else None
    return MetaDataset(source, name=name, digest=digest, schema=schema)


def source_of(dataset_option: str, info: dict):
    """Where the data came from: a local folder or file, a hub repository, or the package's own data."""
    if looks_like_path(dataset_option):
        from mlflow.data.dataset_source_registry import get_registered_sources

        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        return local(os.path.abspath(os.path.expanduser(dataset_option)))
    if "/" in dataset_option:
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        return HuggingFaceDatasetSource(path=dataset_option)
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({k: str(info[k]) for k in ("source", "content", "env") if k in info}
                             or {"dataset": dataset_option})


def dataset_name(config) -> str:
    """The dataset's name as the MLflow UI shows it: the --dataset value (a path's last part), else the
    environment's (RL) or the task's."""
    value = config.dataset or ""
    if looks_like_path(value):
        return os.path.basename(os.path.abspath(os.path.expanduser(value)))
    return value or getattr(config, "env", "") or config.task


def log(client, run_id: str, datasets: list, context: str, attempts: int = 3) -> None:
    """Record `datasets` as inputs of the run (logging the same dataset again changes nothing)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    inputs = [DatasetInput(d._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]) for d in datasets]
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as err:
            # Runs starting at once (a sweep's workers) may each insert the experiment's dataset row;
            # the store's unique (experiment, name, digest) refuses all but one. The row exists then,
            # and logging again links it.
            if attempt == attempts - 1 or not re.search(r"unique|duplicate|integrity", str(err), re.IGNORECASE):
                raise


def log_training_data(client, run_id: str, config, data, info: dict) -> None:
    """The training run's dataset: every array of the task's data, named by the --dataset value."""
    log(client, run_id, [dataset(dataset_name(config), source_of(config.dataset or "", info), arrays_in(data),
                                 info)], TRAINING_CONTEXT)


def log_probe_sets(client, run_id: str, config, probe_sets: dict, info: dict) -> None:
    """An analysis's probe sets (the pools its measurement subsets are drawn from), one input each."""
    source = source_of(config.dataset or "", info)
    log(client, run_id, [dataset(f"{dataset_name(config)} · {split} probe", source, arrays_in(s.inputs, "inputs"),
                                 dict(info, probe_set=split)) for split, s in probe_sets.items()], PROBE_CONTEXT)
