"""Tasks by name, discovered: every module of this package that exports `TASKS = {name: Task}`,
the modules named in $NTK_TRACKING_TASK_MODULES (comma-separated, importable) and those that
installed packages register under the entry-point group `ntk_tracking.tasks`.

Adding a paper model: one module here, and its architecture's under ntk_tracking/models/ if it is
new (docs/contributing.md); nothing else lists it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import pkgutil

from ntk_tracking.tasks.base import (PRIMARY_NETWORK, Probe, ProbeContext, ProbeSet, Task, TaskConfig,
                                     metric_key)

MODULES_ENV = "NTK_TRACKING_TASK_MODULES"
ENTRY_POINT_GROUP = "ntk_tracking.tasks"
_NOT_TASKS = ("base", "__main__")
_found: dict[str, Task] | None = None


def task_modules() -> list[str]:
    """Where tasks are looked for: this package's modules, $NTK_TRACKING_TASK_MODULES, entry points."""
    modules = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS]
    modules += [m.strip() for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]
    modules += [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys(modules))


def all_tasks() -> dict[str, Task]:
    """Every discovered task by name (found once per process); ValueError on a name given twice."""
    global _found
    if _found is None:
        found, where = {}, {}
        for module_name in task_modules():
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ValueError(f"task module {module_name!r} ({MODULES_ENV} or entry point "
                                 f"{ENTRY_POINT_GROUP!r}) cannot be imported: {err}") from err
            for name, task in getattr(module, "TASKS", {}).items():
                if name in found:
                    raise ValueError(f"task {name!r} is defined by both {where[name]} and {module_name}")
                found[name], where[name] = task, module_name
        _found = dict(sorted(found.items()))
    return _found


def task_names() -> tuple[str, ...]:
    """The discovered tasks' names, sorted."""
    return tuple(all_tasks())


def get_task(name: str) -> Task:
    """The task `name`; ValueError listing the known tasks otherwise."""
    tasks = all_tasks()
    if name not in tasks:
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f"did you mean {close[0]!r}? Tasks: " if close else "choose one of "
        raise ValueError(f"unknown task {name!r}; {hint}{list(tasks)}")
    return tasks[name]


def __getattr__(name: str):
    if name == "TASK_NAMES":  # computed on first use: discovery imports the task modules
        return tuple(all_tasks())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRIMARY_NETWORK", "Probe", "ProbeContext", "ProbeSet", "TASK_NAMES", "Task", "TaskConfig",
           "all_tasks", "get_task", "metric_key", "task_names"]
