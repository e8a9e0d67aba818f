"""What a run's recorded config may make the analyzer read: data paths confined to trusted places.

A run's config.json can come from anyone who can write to the tracking store. Its string fields
(the dataset above all) are handed to the task's loader, so a path in them would make the
analyzer read, and log kernels of, a file of the analyzing user's choosing by someone else.
The analyzer therefore reads a path-like value only if it resolves (symlinks followed) under

- the current directory;
- a path this user trained on here: training records the data paths it read in
  `$NTK_TRACKING_HOME/trusted_data_paths.txt` (default `~/.ntk_tracking`), so a run you trained
  on `/data/cifar` is analyzed with no option, whichever tracking store holds it;
- a root named in `NTK_TRACKING_DATA_ROOTS` (os.pathsep-separated) or with `--allow-data-path`;
- the path given with `--data`, which replaces the recorded one (the data moved, or lives
  elsewhere on this machine).

Names that are not paths (built-in datasets, hub repositories) are unaffected.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable

HOME_ENV = "NTK_TRACKING_HOME"
ROOTS_ENV = "NTK_TRACKING_DATA_ROOTS"
TRUST_FILE = "trusted_data_paths.txt"


def looks_like_path(value: str) -> bool:
    """Whether a config string would be read from the file system."""
    if not value:
        return False
    expanded = os.path.expanduser(value)
    return (os.path.isabs(expanded) or value.startswith("~") or ".." in Path(value).parts
            or os.path.lexists(expanded))


def _resolve(value: str) -> Path:
    return Path(os.path.expanduser(value)).resolve()


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def home() -> Path:
    """This user's ntk_tracking folder (settings that belong to the user, not to a run)."""
    return Path(os.path.expanduser(os.environ.get(HOME_ENV) or "~/.ntk_tracking"))


def path_fields(config) -> dict[str, str]:
    """The config's string fields that name files or folders."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if isinstance(getattr(config, f.name), str) and looks_like_path(getattr(config, f.name))}


def remembered_paths() -> list[Path]:
    try:
        lines = (home() / TRUST_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [Path(line) for line in lines if line.strip()]


def remember_data_paths(config) -> None:
    """Record the data paths this user trains on, so their analysis needs no option."""
    new = [str(_resolve(v)) for v in path_fields(config).values()]
    new = [p for p in dict.fromkeys(new) if Path(p) not in remembered_paths()]
    if not new:
        return
    try:
        home().mkdir(parents=True, exist_ok=True)
        with open(home() / TRUST_FILE, "a", encoding="utf-8") as f:  # one short append per line: atomic
            for p in new:
                f.write(p + "\n")
    except OSError as err:  # training goes on; the analysis will then ask for --allow-data-path
        import warnings

        warnings.warn(f"could not record the trusted data path in {home() / TRUST_FILE} ({err}); "
                      "its analysis will need --allow-data-path", RuntimeWarning, stacklevel=2)


def trusted_roots(allowed: Iterable[str] = ()) -> list[Path]:
    env = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    return ([Path.cwd().resolve()] + [_resolve(a) for a in [*allowed, *env] if a]
            + remembered_paths())


def check_data_paths(config, allowed: Iterable[str] = (), run_id: str = "") -> None:
    """ValueError if a string field of `config` is a path outside every trusted root."""
    roots = trusted_roots(allowed)
    for name, value in path_fields(config).items():
        resolved = _resolve(value)
        if any(_within(resolved, root) for root in roots):
            continue
        rid = run_id or "RUN_ID"
        raise ValueError(
            f"run {run_id or '?'} names the data path {value!r} (config field {name!r}), which resolves "
            f"to {str(resolved)!r}, outside the current directory and not trained on by you here: a "
            "run's recorded config may not make the analyzer read arbitrary files. If you trust this "
            f"run, pass --allow-data-path {str(resolved)!r} (ntk-tracking analyze {rid} --allow-data-path "
            f"{str(resolved)!r}; mlflow run . -e analyze -P run_id={rid} -P allow_data_path={str(resolved)!r}) "
            f"or add a folder containing it to {ROOTS_ENV}; if the data lives elsewhere on this machine, "
            "pass --data PATH (-P data=PATH) to read it from there")
