"""Optional packages (pyproject's extras): the one-line error when a code path's extra is missing."""

from __future__ import annotations

import importlib.util


class MissingExtra(ValueError):
    """A code path needs an optional package that is not installed."""


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra naming the install command unless every module in `modules` imports."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs {' and '.join(missing)}, not installed here: "
                           f"pip install 'ntk_tracking[{extra}]'")
