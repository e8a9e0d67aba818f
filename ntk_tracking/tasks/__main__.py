"""Print a task's MLproject entry point, generated from its config fields:

    python -m ntk_tracking.tasks mnist_dense
"""

import sys

from ntk_tracking.tasks import task_names, get_task
from ntk_tracking.tasks.base import cli_fields, field_type

_TYPES = {int: "int", float: "float", str: "string", bool: "string"}


def mlproject_entry(name: str) -> str:
    """The YAML of `name`'s entry point: one typed, defaulted parameter per config field."""
    task = get_task(name)
    default = task.default_config()
    lines, flags = [f"  {name}:", "    parameters:"], []
    for field in cli_fields(task.config_class):
        kind, optional = field_type(task.config_class, field.name)
        value = getattr(default, field.name)
        value = 0 if optional and value is None else value
        text = repr(value) if kind is float else str(value).lower() if kind is bool else str(value)
        lines.append(f"      {field.name}: {{type: {_TYPES[kind]}, default: {text}}}")
        flags.append(f"--{field.name.replace('_', '-')} {{{field.name}}}")
    lines.append(f'    command: "python -m pipelines.train {name} {" ".join(flags)}"')
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:] or task_names():
        print(mlproject_entry(name) + "\n")
