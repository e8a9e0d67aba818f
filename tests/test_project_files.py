"""MLproject, conda.yaml and pyproject.toml agree with each other and with the code."""

from __future__ import annotations

import importlib
import pathlib
import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ntk_tracking.train_command import train_parser
from ntk_tracking.tasks import TASK_NAMES as TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert MLPROJECT["conda_env"] == "conda.yaml"
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(project["dependencies"])
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python"))
    # As versions, not strings: "3.9" >= "3.11" holds for strings.
    assert Version(python.split("=")[-1]) in SpecifierSet(project["requires-python"])


@pytest.mark.parametrize("python, ok", [("3.9", False), ("3.10", False), ("3.11", True), ("3.12", True)])
def test_python_versions_compare_as_versions(python, ok):
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert (Version(python) in SpecifierSet(requires)) is ok


def declared(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [r for r in map(Requirement, project["dependencies"]) if r.name.lower() == name]
    return req


def test_sqlalchemy_is_bounded_below_the_release_that_drops_noload():
    """MLflow's SQLite store maps a relationship with lazy="noload", deprecated in SQLAlchemy
    2.1 and due for removal; mlflow itself allows any SQLAlchemy < 3. Our bound keeps the next
    minor release out until it is tested, and the installed version must satisfy it."""
    from importlib.metadata import requires, version

    ours = declared("sqlalchemy").specifier
    installed = Version(version("sqlalchemy"))
    assert installed in ours, f"installed SQLAlchemy {installed} is outside the declared {ours}"
    assert Version("2.2.0") not in ours and Version("3.0") not in ours  # an upper bound below mlflow's
    mlflow_wants = [Requirement(r) for r in requires("mlflow") if r.lower().startswith("sqlalchemy")]
    assert mlflow_wants and all(installed in r.specifier for r in mlflow_wants)


def test_mlflow_sqlite_store_works_with_the_installed_sqlalchemy(tmp_path):
    """A fresh SQLite tracking store: schema migration, a run, params, a metric history, search."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("sqlalchemy"))
    client.log_param(run.info.run_id, "width", "8")
    for step in range(3):
        client.log_metric(run.info.run_id, "train/loss", 1.0 / (step + 1), step=step)
    client.set_terminated(run.info.run_id)
    (found,) = client.search_runs([run.info.experiment_id], "params.width = '8'")
    assert found.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 1 / 3)]


@pytest.mark.parametrize("name", sorted(MLPROJECT["entry_points"]))
def test_entry_point_runs_a_pipeline_module(name):
    command = MLPROJECT["entry_points"][name]["command"]
    module = re.match(r"python -m (\S+)", command).group(1)
    assert module == ("pipelines.train" if name in TASKS else f"pipelines.{name}")
    if name in TASKS:
        assert command.startswith(f"python -m pipelines.train {name} ")
    importlib.import_module(module)
    for param in MLPROJECT["entry_points"][name].get("parameters", {}):
        assert "{" + param + "}" in command, f"{name}: parameter {param} is not passed on"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_training_entry_point_defaults_match_the_task_config(task):
    params = MLPROJECT["entry_points"][task]["parameters"]
    defaults = vars(train_parser(task).parse_args([]))
    for name, spec in params.items():
        assert spec["default"] == defaults[name], f"{task}.{name}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_training_entry_point_parameters_are_exactly_the_config_fields(task):
    from ntk_tracking.tasks import base, get_task

    params = set(MLPROJECT["entry_points"][task]["parameters"])
    fields = {f.name for f in base.cli_fields(get_task(task).config_class)}
    assert params == fields, f"{task}: MLproject lacks {fields - params}, has extra {params - fields}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_help_lists_every_task_parameter_with_its_default(task):
    from ntk_tracking.tasks import base, get_task

    t = get_task(task)
    text = " ".join(train_parser(task).format_help().split())
    for field in base.cli_fields(t.config_class):
        assert f"--{field.name.replace('_', '-')}" in text, f"{task}: --help lacks {field.name}"
    assert text.count("(default:") >= len(base.cli_fields(t.config_class))


def test_readme_usage_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "empirical_ntk" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    K = namespace["K"]
    assert K.shape == (20, 20)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_mlproject_entry_is_the_one_generated_from_the_task_config(task):
    """`python -m ntk_tracking.tasks TASK` prints the entry; MLproject holds exactly it."""
    from ntk_tracking.tasks.__main__ import mlproject_entry

    generated = yaml.safe_load(mlproject_entry(task))[task]
    assert MLPROJECT["entry_points"][task] == generated


def test_the_sweep_entry_defaults_leave_the_task_defaults():
    """The sweep entry's declared training options, left at '', give every child the task's own defaults."""
    import shlex

    from ntk_tracking.sweep.spec import parse_sweep

    entry = MLPROJECT["entry_points"]["sweep"]
    values = {k: v["default"] for k, v in entry["parameters"].items()} | {"task": "mnist_vae", "grid": "latents=4,8"}
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()}))[3:]
    launched, _ = parse_sweep(argv)
    plain, _ = parse_sweep(["--task", "mnist_vae", "--grid", "latents=4,8"])
    assert launched.fixed == plain.fixed and launched.fixed["epochs"] == 50
    assert {"dataset", "epochs", "train_size", "cv_every"} <= set(entry["parameters"])


@pytest.mark.slow
def test_the_quickstart_runs_under_mlflow_run_with_uv_instead_of_conda(tmp_path):
    """`mlflow run . -e quickstart --env-manager uv`: a fresh virtual environment from conda.yaml's pip
    list, no conda (uv comes with the dev extra; a missing uv fails here rather than skipping)."""
    import os
    import shutil
    import subprocess
    import sys

    import mlflow

    uv = shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")
    assert uv, "uv is not installed; it comes with the dev extra: pip install -e '.[dev]'"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.path.dirname(uv) + os.pathsep + env.get("PATH", ""),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", MLFLOW_ENV_ROOT=str(tmp_path / "envs"))
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "quickstart", "--env-manager", "uv"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.env"] == "uv"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "ntk/entropy/train")) == list(range(11))
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs}
    assert contexts["mnist5k"] == "training"
    venvs = list((tmp_path / "envs").iterdir())
    assert len(venvs) == 1 and not (venvs[0] / "bin" / "conda").exists()


def test_metric_keys_are_built_only_in_keys_py():
    """NTK keys and the training loss key are spelled once, in ntk_tracking/keys.py."""
    spelled = {}
    for path in sorted((ROOT / "ntk_tracking").rglob("*.py")):
        if path.name == "keys.py" and path.parent.name == "ntk_tracking":
            continue
        text = path.read_text()
        hits = [s for s in ('f"ntk/', "f'ntk/", '"train/loss"', "'train/loss'") if s in text]
        if hits:
            spelled[str(path.relative_to(ROOT))] = hits
    assert not spelled
