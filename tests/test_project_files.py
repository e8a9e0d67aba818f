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

from ntk_tracking.cli.train import train_parser
from ntk_tracking.tasks import TASK_NAMES as TASKS
from ntk_tracking.tasks import get_task

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

    from ntk_tracking.cli.sweep import parse_sweep

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


# The commands, side by side in ntk_tracking/cli/: they parse command lines and may name the MLflow
# Project's scripts. The dispatcher (__init__.py, and __main__.py for `python -m ntk_tracking.cli`) and
# helpformat.py are no commands; every module outside cli/ is the library.
COMMAND_PACKAGE = "cli"
COMMAND_HELPERS = {"__init__.py", "__main__.py", "helpformat.py"}
COMMAND_MODULES = {"train.py", "analyze.py", "sweep.py", "report.py", "quickstart.py"}
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


def _in_commands(path: pathlib.Path, package: pathlib.Path) -> bool:
    return path.relative_to(package).parts[0] == COMMAND_PACKAGE


def launched_pipelines(package: pathlib.Path) -> list[str]:
    """Modules of `package` (those of the command package aside) that could launch a pipelines.* script: a module
    that starts processes and names `pipelines.` in its code, or any that holds a module name
    `pipelines.X` as a string of its own (an argument of `python -m`)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if _in_commands(path, package):
            continue
        tree = ast.parse(path.read_text())
        strings = [s for s in _code_strings(tree) if "pipelines." in s]
        if (strings and _launches_processes(tree)) or any(s.strip().startswith("pipelines.") for s in strings):
            found.append(f"{path.relative_to(package.parent)}: {strings}")
    return found


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    return ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: pathlib.Path, package: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, [names]) of every import in a module's code, deferred ones included, relative ones
    resolved: `import a.b` gives ("a.b", []), `from a.b import c, d` gives ("a.b", ["c", "d"])."""
    found = []
    here = _module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the module's package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            found.append((module, [a.name for a in node.names]))
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """What an import reaches: the module, and for `from M import n` each M.n (a name or a submodule)."""
    return [module] if not names else [f"{module}.{n}" for n in names]


def sweep_imports_of_commands(package: pathlib.Path) -> list[str]:
    """Imports of the command package (ntk_tracking.cli or any of its modules) in package/sweep."""
    found = []
    for path in sorted((package / "sweep").rglob("*.py")):
        for module, names in imports(path, package):
            found += [f"{path.relative_to(package.parent)}: {n}" for n in _targets(module, names) + [module] * bool(names)
                      if re.match(rf"ntk_tracking\.{COMMAND_PACKAGE}(\.|$)", n)]
    return found


def library_imports_of_the_commands(package: pathlib.Path) -> list[str]:
    """Imports of ntk_tracking.cli (any of its modules) or of argparse in a library module (outside
    package/cli): the library parses no command line and calls no command."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if _in_commands(path, package):
            continue
        for module, names in imports(path, package):
            if module == "argparse" or re.match(rf"ntk_tracking\.{COMMAND_PACKAGE}(\.|$)", module) \
                    or any(t == f"ntk_tracking.{COMMAND_PACKAGE}" for t in _targets(module, names)):
                found.append(f"{path.relative_to(package.parent)}: {module}" + (f" {names}" if names else ""))
    return found


def commands_importing_commands(package: pathlib.Path) -> list[str]:
    """Imports by a command module of package/cli of anything in the command package but helpformat
    (another command, the dispatcher): the commands stand on one floor, each on the library alone."""
    found = []
    prefix = f"ntk_tracking.{COMMAND_PACKAGE}"
    allowed = f"{prefix}.helpformat"
    for path in sorted((package / COMMAND_PACKAGE).glob("*.py")):
        if path.name in COMMAND_HELPERS:
            continue
        for module, names in imports(path, package):
            for target in _targets(module, names):
                if (target == prefix or target.startswith(prefix + ".")) and \
                        not (target == allowed or target.startswith(allowed + ".")):
                    found.append(f"{path.relative_to(package.parent)}: {target}")
    return found


def private_imports(package: pathlib.Path) -> list[str]:
    """`from ntk_tracking.X import _name`: a private name of one module taken by another (make it public)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for module, names in imports(path, package):
            if module.startswith("ntk_tracking"):
                found += [f"{path.relative_to(package.parent)}: {module}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    return found


def test_no_library_code_launches_a_pipelines_script_and_the_sweep_imports_no_command():
    """The sweep and the Ray executor hand a child its config and start `python -m ntk_tracking.run`;
    only MLproject runs pipelines/ scripts, and the sweep never parses a command's options."""
    assert launched_pipelines(ROOT / "ntk_tracking") == []
    assert sweep_imports_of_commands(ROOT / "ntk_tracking") == []


def test_the_checks_above_see_a_launch_and_an_import(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / "sweep").mkdir(parents=True)
    (package / COMMAND_PACKAGE).mkdir()
    (package / "sweep" / "run.py").write_text(
        '"""Launches `python -m pipelines.train` (a docstring: not code)."""\nimport subprocess, sys\n'
        "from ntk_tracking.cli.train import train_parser\n"
        'subprocess.Popen([sys.executable, "-m", "pipelines.train", "mnist_dense"])\n')
    (package / "executor.py").write_text('def argv(task):\n    return ["pipelines.analyze", task]\n')
    (package / "generator.py").write_text('def entry(name):\n    return f"command: python -m pipelines.train {name}"\n')
    (package / COMMAND_PACKAGE / "train.py").write_text('import subprocess\nsubprocess.run(["python", "-m", "pipelines.train"])\n')
    assert [line.split(":")[0] for line in launched_pipelines(package)] == [
        "ntk_tracking/executor.py", "ntk_tracking/sweep/run.py"]
    assert sweep_imports_of_commands(package) == ["ntk_tracking/sweep/run.py: ntk_tracking.cli.train.train_parser",
                                                  "ntk_tracking/sweep/run.py: ntk_tracking.cli.train"]


def test_the_commands_stand_on_one_floor():
    """No command module of ntk_tracking/cli/ imports another one (or the dispatcher): each calls the
    library, with helpformat for how it talks; only the dispatcher, __init__.py, names the commands."""
    commands = {p.name for p in (ROOT / "ntk_tracking" / COMMAND_PACKAGE).glob("*.py")} - COMMAND_HELPERS
    assert commands == COMMAND_MODULES
    assert commands_importing_commands(ROOT / "ntk_tracking") == []


def test_the_floor_check_sees_a_command_importing_a_command(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / COMMAND_PACKAGE).mkdir(parents=True)
    (package / COMMAND_PACKAGE / "__init__.py").write_text("def main():\n    from ntk_tracking.cli.train import train_command\n")
    (package / COMMAND_PACKAGE / "helpformat.py").write_text("import argparse\n")
    (package / COMMAND_PACKAGE / "report.py").write_text(
        "from ntk_tracking.cli.helpformat import HelpFormatter, fail\nfrom ntk_tracking.report import report\n")
    (package / COMMAND_PACKAGE / "quickstart.py").write_text(
        "import ntk_tracking.cli.analyze\n\n\ndef main():\n    from ntk_tracking.cli.train import train_main\n"
        "    from . import report\n    from ntk_tracking.cli import helpformat, main\n")
    assert commands_importing_commands(package) == [
        "ntk_tracking/cli/quickstart.py: ntk_tracking.cli.analyze",
        "ntk_tracking/cli/quickstart.py: ntk_tracking.cli.train.train_main",
        "ntk_tracking/cli/quickstart.py: ntk_tracking.cli.report",
        "ntk_tracking/cli/quickstart.py: ntk_tracking.cli.main"]


def test_the_library_imports_no_command_and_no_argparse():
    """Outside ntk_tracking/cli/ nothing imports argparse or the command package: the library (the
    child entry `python -m ntk_tracking.run` included) is called with values, never a command line."""
    assert (ROOT / "ntk_tracking" / "run.py").exists()
    assert library_imports_of_the_commands(ROOT / "ntk_tracking") == []


def test_the_library_check_sees_argparse_and_a_command_import(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / COMMAND_PACKAGE).mkdir(parents=True)
    (package / "sweep").mkdir()
    (package / COMMAND_PACKAGE / "train.py").write_text("import argparse\nfrom ntk_tracking.run import train\n")
    (package / "run.py").write_text("import argparse\n\n\ndef fail():\n    from ntk_tracking.cli.helpformat import fail\n")
    (package / "sweep" / "spec.py").write_text("from ntk_tracking import cli\nimport ntk_tracking.cli.sweep\n")
    (package / "sweep" / "plan.py").write_text("from ntk_tracking import tracking\nfrom .spec import SweepSpec\n")
    assert library_imports_of_the_commands(package) == [
        "ntk_tracking/run.py: argparse",
        "ntk_tracking/run.py: ntk_tracking.cli.helpformat ['fail']",
        "ntk_tracking/sweep/spec.py: ntk_tracking ['cli']",
        "ntk_tracking/sweep/spec.py: ntk_tracking.cli.sweep"]


def test_no_module_imports_a_private_name_of_another():
    """`from ntk_tracking.X import _name` nowhere in the package or the pipelines scripts: what two
    modules share (the Ray module's credentials, the sweep's Runner, …) is public."""
    assert private_imports(ROOT / "ntk_tracking") == []
    assert private_imports(ROOT / "pipelines") == []


def test_the_private_import_check_sees_one(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / "sweep").mkdir(parents=True)
    (package / "on_ray.py").write_text(
        "from __future__ import annotations\nfrom ntk_tracking.sweep.run import Runner, _tail\n\n\n"
        "def f():\n    from ntk_tracking.analyze import __doc__, _private\n")
    (package / "sweep" / "analysis.py").write_text("from .run import _Runner\nfrom ntk_tracking.on_ray import credentials\n")
    assert private_imports(package) == ["ntk_tracking/on_ray.py: ntk_tracking.sweep.run._tail",
                                        "ntk_tracking/on_ray.py: ntk_tracking.analyze._private",
                                        "ntk_tracking/sweep/analysis.py: ntk_tracking.sweep.run._Runner"]


def test_the_sweep_and_the_child_entry_load_no_command_module():
    """Importing the sweep, the Ray module and the child entry imports no command-line module."""
    import subprocess
    import sys

    code = ("import sys, ntk_tracking.sweep, ntk_tracking.on_ray, ntk_tracking.run; "
            "print(sorted(m for m in sys.modules if m == 'ntk_tracking.cli' or m.startswith('ntk_tracking.cli.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# Where the package may name a task besides its own module: the commands' default task.
DEFAULT_TASK_USERS = {"mnist_dense": {"cli/quickstart.py", "cli/sweep.py", "sweep/__init__.py", "tasks/__main__.py"}}


def modules_naming_task(package: pathlib.Path, name: str) -> set[str]:
    """The package's modules whose text names task `name` (as a whole word)."""
    word = re.compile(rf"\b{re.escape(name)}\b")
    return {str(p.relative_to(package)) for p in package.rglob("*.py") if word.search(p.read_text())}


@pytest.mark.parametrize("task", TASKS)
def test_a_task_is_named_only_by_its_own_modules(task):
    """A paper model is wiring: outside its task module, only a data module that says its task reads
    it (READ_BY) names it, and the commands name their default task; nothing lists the tasks."""
    package = ROOT / "ntk_tracking"
    own = {str(pathlib.Path(importlib.import_module(type(get_task(task)).__module__).__file__).relative_to(package))}
    readers = set()
    for path in (package / "data").glob("*.py"):
        module = importlib.import_module(f"ntk_tracking.data.{path.stem}")
        if getattr(module, "READ_BY", None) == task:
            readers.add(f"data/{path.name}")
    assert modules_naming_task(package, task) - own - readers - DEFAULT_TASK_USERS.get(task, set()) == set()


def test_the_naming_check_sees_a_listed_task(tmp_path):
    package = tmp_path / "ntk_tracking"
    (package / "sweep").mkdir(parents=True)
    (package / "sweep" / "plan.py").write_text('KNOWN = ["mnist_vae", "mnist_vaex"]\n')
    (package / "tasks.py").write_text('"""mnist_vae_like is another name."""\n')
    assert modules_naming_task(package, "mnist_vae") == {"sweep/plan.py"}


def test_no_private_orbax_import_and_one_store_fixture():
    """The package uses Orbax's public API only, and the tests define the tracking-store fixture once."""
    private = [str(p.relative_to(ROOT)) for p in (ROOT / "ntk_tracking").rglob("*.py")
               if re.search(r"orbax\.checkpoint\._src|orbax\.checkpoint import _", p.read_text())]
    assert private == []
    stores = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
              if re.search(r"^def store\(", p.read_text(), re.M)]
    assert stores == ["tests/conftest.py"]
