"""Tasks by name: one module per task family, imported only when its task is used.

Adding a paper model: a module here exporting `TASKS = {name: Task}` and its line below.
"""

from __future__ import annotations

import importlib

from ntk_tracking.tasks.base import (PRIMARY_NETWORK, Probe, ProbeContext, ProbeSet, Task, TaskConfig,
                                     metric_key)

_MODULES = {
    "fuel_efficiency": "ntk_tracking.tasks.supervised",
    "greek_pos": "ntk_tracking.tasks.greek_pos",
    "mnist_dense": "ntk_tracking.tasks.supervised",
    "mnist_cnn": "ntk_tracking.tasks.supervised",
    "molpcba_gnn": "ntk_tracking.tasks.molpcba",
    "cifar_resnet": "ntk_tracking.tasks.cifar_resnet",
    "mnist_vae": "ntk_tracking.tasks.mnist_vae",
    "pong_actor_critic": "ntk_tracking.tasks.pong_actor_critic",
}

TASK_NAMES = tuple(sorted(_MODULES))


def get_task(name: str) -> Task:
    """The task `name`; ValueError listing the known tasks otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASK_NAMES)}")
    return importlib.import_module(_MODULES[name]).TASKS[name]


__all__ = ["PRIMARY_NETWORK", "Probe", "ProbeContext", "ProbeSet", "TASK_NAMES", "Task", "TaskConfig",
           "get_task", "metric_key"]
