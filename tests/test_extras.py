"""The light core install: a code path whose optional extra is missing names it, before any run exists;
an unknown task name is refused with the closest known one."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

import mlflow
import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli_without(modules: list[str], argv: list[str], cwd) -> subprocess.CompletedProcess:
    """`ntk-tracking ARGV` in a fresh interpreter where `modules` cannot be imported (as if not installed)."""
    code = ("import sys\n"
            f"for name in {modules!r}:\n"
            "    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec gives None\n"
            "from ntk_tracking.cli import main\n"
            f"main({argv!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def no_runs(cwd) -> bool:
    db = pathlib.Path(cwd) / "mlflow.db"
    if not db.exists():
        return True
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("blocked, argv, extra", [
    (["rdkit", "datamol"], ["train", "molpcba_gnn", "--dataset", "molecules-offline", "--epochs", "1"], "molecules"),
    (["datamol"], ["train", "molpcba_gnn", "--dataset", "molecules-offline", "--epochs", "1"], "molecules"),
    (["rdkit"], ["sweep", "--task", "molpcba_gnn", "--dataset", "molecules-offline", "--grid", "seed=0,1"],
     "molecules"),
    (["ray"], ["sweep", "--task", "mnist_dense", "--grid", "width=8,16", "--epochs", "1", "--executor", "ray"], "ray"),
    (["ray"], ["analyze", "0123456789abcdef0123456789abcdef", "--executor", "ray"], "ray"),
], ids=["train-molecules", "train-datamol-only", "sweep-molecules", "sweep-ray", "analyze-ray"])
def test_a_missing_extra_is_named_in_one_line_before_any_run(tmp_path, blocked, argv, extra):
    proc = cli_without(blocked, argv, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(f"pip install 'ntk_tracking[{extra}]'")
    assert blocked[-1] in lines[0]
    assert no_runs(tmp_path)


def test_every_extra_the_code_names_is_declared_and_dev_installs_them_all():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"molecules", "ray"} <= set(extras)
    (self_ref,) = [r for r in extras["dev"] if r.startswith("ntk_tracking[")]
    assert set(self_ref[len("ntk_tracking["):-1].split(",")) == set(extras) - {"dev"}
    core = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert not core & {"ray", "rdkit", "datamol", "jupyter", "notebook", "nglview", "gcsfs", "s3fs"}


def test_unknown_task_names_the_closest_one(capsys):
    from ntk_tracking.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "cifar_resnett"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'cifar_resnett'; did you mean 'cifar_resnet'?"), err
    assert "needs a task" not in err
    with pytest.raises(SystemExit):
        main(["train"])
    assert "needs a task" in capsys.readouterr().err
