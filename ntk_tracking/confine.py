"""What a run's recorded config may make the analyzer read: data paths confined to trusted places.

A run's config.json can come from anyone who can write to the tracking server. Its string fields
(the dataset above all) are handed to the task's loader, so a path in them would make the
analyzer read, and log kernels of, a file of the analyzing user's choosing by someone else.
The analyzer therefore accepts a path-like value only if it resolves (symlinks followed) under
the current directory or under a path the user allows explicitly (`--allow-data-path`).
Names that are not paths (built-in datasets, hub repositories) are unaffected.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable


def looks_like_path(value: str) -> bool:
    """Whether a config string would be read from the file system."""
    if not value:
        return False
    expanded = os.path.expanduser(value)
    return (os.path.isabs(expanded) or value.startswith("~") or ".." in Path(value).parts
            or os.path.lexists(expanded))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_data_paths(config, allowed: Iterable[str] = (), run_id: str = "") -> None:
    """ValueError if a string field of `config` is a path outside the current directory and `allowed`."""
    roots = [Path.cwd().resolve()] + [Path(os.path.expanduser(a)).resolve() for a in allowed if a]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, str) or not looks_like_path(value):
            continue
        resolved = Path(os.path.expanduser(value)).resolve()
        if any(_within(resolved, root) for root in roots):
            continue
        raise ValueError(
            f"run {run_id or '?'} names the data path {value!r} (config field {field.name!r}), which "
            f"resolves to {str(resolved)!r}, outside the current directory: a run's recorded config "
            "may not make the analyzer read arbitrary files. If you trust this run, pass "
            f"--allow-data-path {value!r} (or a folder containing it), or run from a directory that "
            "contains the data")
