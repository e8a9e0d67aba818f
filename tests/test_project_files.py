"""MLproject, conda.yaml and pyproject.toml agree with each other and with the code."""

from __future__ import annotations

import ast
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


# The command modules: they parse command lines and may name the MLflow Project's scripts.
COMMAND_MODULES = {"cli.py", "train_command.py", "analyze_command.py", "report.py", "helpformat.py"}
_LAUNCHERS = {("subprocess", "Popen"), ("subprocess", "run"), ("subprocess", "call"), ("subprocess", "check_call"),
              ("subprocess", "check_output"), ("os", "system"), ("os", "popen"), ("sys", "executable")}


def _code_strings(tree) -> list[str]:
    """Every string constant of a module's code, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _launches_processes(tree) -> bool:
    """Whether a module starts processes: subprocess, os.system/exec*/spawn*, sys.executable."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            if pair in _LAUNCHERS or (node.value.id == "os" and node.attr.startswith(("exec", "spawn", "posix_spawn"))):
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            return True
    return False


def launched_pipelines(package: pathlib.Path) -> list[str]:
    """Modules of `package` (command modules aside) that could launch a pipelines.* script: a module
    that starts processes and names `pipelines.` in its code, or any that holds a module name
    `pipelines.X` as a string of its own (an argument of `python -m`)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.parent == package and path.name in COMMAND_MODULES:
            continue
        tree = ast.parse(path.read_text())
        strings = [s for s in _code_strings(tree) if "pipelines." in s]
        if (strings and _launches_processes(tree)) or any(s.strip().startswith("pipelines.") for s in strings):
            found.append(f"{path.relative_to(package.parent)}: {strings}")
    return found


def sweep_imports_of_commands(package: pathlib.Path) -> list[str]:
    """Imports of a command module (train_command, analyze_command, cli) in package/sweep."""
    found = []
    for path in sorted((package / "sweep").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{n}" for n in names] + [node.module or ""]
            found += [f"{path.relative_to(package.parent)}: {n}" for n in names
                      if re.match(r"ntk_tracking\.(train_command|analyze_command|cli)(\.|$)", n)]
    return found


def test_no_library_code_launches_a_pipelines_script_and_the_sweep_imports_no_command():
    """The sweep and the Ray executor hand a child its config and start `python -m ntk_tracking.run`;
    only MLproject runs pipelines/ scripts, and the sweep never parses a command's options."""
    assert launched_pipelines(ROOT / "ntk_tracking") == []
    assert sweep_imports_of_commands(ROOT / "ntk_tracking") == []


def test_the_checks_above_see_a_launch_and_an_import(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / "sweep").mkdir(parents=True)
    (package / "sweep" / "run.py").write_text(
        '"""Launches `python -m pipelines.train` (a docstring: not code)."""\nimport subprocess, sys\n'
        "from ntk_tracking.train_command import train_parser\n"
        'subprocess.Popen([sys.executable, "-m", "pipelines.train", "mnist_dense"])\n')
    (package / "executor.py").write_text('def argv(task):\n    return ["pipelines.analyze", task]\n')
    (package / "generator.py").write_text('def entry(name):\n    return f"command: python -m pipelines.train {name}"\n')
    (package / "train_command.py").write_text('import subprocess\nsubprocess.run(["python", "-m", "pipelines.train"])\n')
    assert [line.split(":")[0] for line in launched_pipelines(package)] == [
        "ntk_tracking/executor.py", "ntk_tracking/sweep/run.py"]
    assert sweep_imports_of_commands(package) == ["ntk_tracking/sweep/run.py: ntk_tracking.train_command.train_parser",
                                                  "ntk_tracking/sweep/run.py: ntk_tracking.train_command"]


def test_the_sweep_and_the_child_entry_load_no_command_module():
    """Importing the sweep, its Ray executor and the child entry imports no command-line module."""
    import subprocess
    import sys

    code = ("import sys, ntk_tracking.sweep, ntk_tracking.sweep.ray_executor, ntk_tracking.run; "
            "print(sorted(m for m in sys.modules if m in ('ntk_tracking.train_command', "
            "'ntk_tracking.analyze_command', 'ntk_tracking.cli')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
