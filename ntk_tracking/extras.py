"""Optional packages (pyproject's extras): the one-line error when a code path's extra is missing."""

from __future__ import annotations

import importlib.util


class MissingExtra(ValueError):
    """A code path needs an optional package that is not installed."""


def missing(extra: str, *modules: str, what: str) -> str | None:
    """The one-line message naming the install command if a module in `modules` does not import, else None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{what} needs {' and '.join(absent)}, not installed here: pip install 'ntk_tracking[{extra}]'"
    return None


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra naming the install command unless every module in `modules` imports."""
    message = missing(extra, *modules, what=what)
    if message:
        raise MissingExtra(message)
