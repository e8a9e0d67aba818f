"""What a sweep trains: the grid, the fixed training options, each point's config (the sweep's
command line is ntk_tracking/cli/sweep.py)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

from ntk_tracking.tasks import Task, get_task

SPEC_ARTIFACT = "sweep.json"
# (config field, sweep option, value type): one child per combination, in this order.
GRID = (("width", "widths", int), ("depth", "depths", int), ("activation", "activations", str),
        ("init", "inits", str), ("learning_rate", "learning_rates", float), ("seed", "seeds", int))
GRID_FIELDS = tuple(f for f, _, _ in GRID)  # the architecture scan's fields
# A scan in the spirit of the paper's width × depth × activation figures; the other axes default
# to the task's single value.
GRID_DEFAULTS = {"widths": "16,64,256", "depths": "1,2,4", "activations": "relu,tanh"}


def scans(task: Task) -> bool:
    """Whether the task's config has every field of the architecture scan (width × depth × …)."""
    return all(hasattr(task.default_config(), f) for f in GRID_FIELDS)


def child_key(point: dict) -> str:
    """The stable name of a point of the architecture scan, e.g. w64-d2-relu-lecun_normal-lr0.001-s0."""
    return (f"w{point['width']}-d{point['depth']}-{point['activation']}-{point['init']}"
            f"-lr{point['learning_rate']!r}-s{point['seed']}")


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@dataclasses.dataclass
class SweepSpec:
    """What a sweep trains: the task, the grid (field -> values) and the fixed training options."""

    task: str
    grid: dict[str, list]
    fixed: dict[str, object]

    @functools.cached_property
    def definition(self) -> Task:
        """The Task named `task`, looked up once."""
        return get_task(self.task)

    def points(self) -> list[dict]:
        """Every grid point as {field: value}, in grid order."""
        return [dict(zip(self.grid, v)) for v in itertools.product(*self.grid.values())]

    def varying(self) -> list[str]:
        """The grid fields with more than one value, in grid order."""
        return [f for f, values in self.grid.items() if len(values) > 1]

    def key(self, point: dict) -> str:
        """A child's stable name: the architecture scan's w64-d2-relu-…-s0 form, else the varying
        fields' values, e.g. latents=4-seed=1."""
        if set(self.grid) == set(GRID_FIELDS):
            return child_key(point)
        return "-".join(f"{f}={_text(point[f])}" for f in self.varying()) or "default"

    def grid_text(self) -> str:
        """The grid as one --grid value: 'latents=4,8 seed=0,1'."""
        return " ".join(f"{f}={','.join(map(_text, v))}" for f, v in self.grid.items())

    def config(self, point: dict):
        """The validated task config of one grid point, the config its child trains (ValueError naming the point)."""
        try:
            return self.definition.config_from_options({**self.fixed, **point})
        except ValueError as err:
            raise ValueError(f"grid point {self.key(point)}: {err}") from None

    def to_dict(self) -> dict:
        """The sweep.json document (JSON types only)."""
        return json.loads(json.dumps({"task": self.task, "grid": self.grid, "fixed": self.fixed}))
