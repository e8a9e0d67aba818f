"""MLproject, conda.yaml and pyproject.toml agree with each other and with the code."""

from __future__ import annotations

import importlib
import pathlib
import re
import tomllib

import pytest
import yaml

from ntk_tracking.cli import train_parser
from ntk_tracking.configs import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert MLPROJECT["conda_env"] == "conda.yaml"
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(project["dependencies"])
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.split("=")[-1] >= project["requires-python"].lstrip(">=")


@pytest.mark.parametrize("name", sorted(MLPROJECT["entry_points"]))
def test_entry_point_runs_a_pipeline_module(name):
    command = MLPROJECT["entry_points"][name]["command"]
    module = re.match(r"python -m (\S+)", command).group(1)
    assert module == f"pipelines.{name}"
    importlib.import_module(module)
    for param in MLPROJECT["entry_points"][name].get("parameters", {}):
        assert "{" + param + "}" in command, f"{name}: parameter {param} is not passed on"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_training_entry_point_defaults_match_the_task_config(task):
    params = MLPROJECT["entry_points"][task]["parameters"]
    defaults = vars(train_parser(task).parse_args([]))
    for name, spec in params.items():
        assert spec["default"] == defaults[name], f"{task}.{name}"


def test_readme_usage_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "empirical_ntk" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    K = namespace["K"]
    assert K.shape == (20, 20)
