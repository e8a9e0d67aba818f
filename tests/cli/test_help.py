"""Every command's --help names the program it was called as, and every default it shows is the value used."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ntk_tracking import cli
from ntk_tracking.cli import analyze as analyze_cli, train as train_cli
from ntk_tracking.analyze import AnalysisSettings
from ntk_tracking.cli.quickstart import QUICKSTART_EPOCHS, quickstart_parser
from ntk_tracking.cli.report import report_parser
from ntk_tracking.cli.sweep import sweep_parser
from ntk_tracking.tasks import TASK_NAMES, get_task
from ntk_tracking.tasks import base
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    """One option per line, so that each help text can be read back whole."""
    monkeypatch.setenv("COLUMNS", "2000")


def shown_defaults(parser) -> dict[str, str]:
    """dest -> the default its --help line shows, for every option that shows one."""
    text = parser.format_help()
    shown = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        first = re.compile(r"\s+" + re.escape(action.option_strings[0]) + r"([ ,]|$)")
        lines = text.splitlines()
        start = next(i for i, l in enumerate(lines) if first.match(l))
        end = next((i for i in range(start + 1, len(lines))
                    if not lines[i].strip() or re.match(r"\s+-", lines[i])), len(lines))
        line = " ".join(lines[start:end])  # the option and its help (on the next line when the option is long)
        found = re.findall(r"\(default: ([^)]*)\)", line)
        assert len(found) <= 1, f"{action.option_strings} shows {len(found)} defaults: {line}"
        if found:
            shown[action.dest] = found[0]
    return shown


def as_shown(value) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else "0" if value is None else str(value)


def test_a_training_command_looks_its_task_up_once_and_passes_the_task_on(monkeypatch):
    """`ntk-tracking train TASK`: one get_task; the parser, the config, the data and training get that Task."""
    calls, seen = [], {}
    real = train_cli.get_task
    monkeypatch.setattr(train_cli, "get_task", lambda name: calls.append(name) or real(name))
    monkeypatch.setattr(train_cli, "prepare", lambda task, config: seen.update(prepared=task) or "data")

    def train(task, config, dataset, command, **options):
        seen.update(task=task, config=config, dataset=dataset, command=command)
        return "run-id"

    monkeypatch.setattr(train_cli, "train", train)
    assert train_cli.train_command(["mnist_dense", "--width", "8", "--train-size", "0", "--no-progress"]) == "run-id"
    assert calls == ["mnist_dense"]
    assert seen["task"] is seen["prepared"] is real("mnist_dense") and seen["dataset"] == "data"
    assert seen["config"].width == 8 and seen["config"].train_size is None
    assert seen["command"] == "ntk-tracking train mnist_dense --width 8 --train-size 0 --no-progress"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_train_help_shows_the_defaults_it_uses(task):
    parser = train_cli.train_parser(task)
    assert parser.format_usage().startswith(f"usage: ntk-tracking train {task} ")
    config = train_cli.config_from_args(task, parser.parse_args([]))
    assert config == get_task(task).default_config()
    shown = shown_defaults(parser)
    for field in base.cli_fields(get_task(task).config_class):
        assert shown[field.name] == as_shown(getattr(config, field.name)), field.name
        if base.field_type(get_task(task).config_class, field.name)[0] is bool:
            assert "{yes,no}" in parser.format_usage(), field.name
    assert "experiment" not in shown and "no_progress" not in shown
    assert shown["resume_interval_seconds"] == str(train_cli.RESUME_INTERVAL_SECONDS)
    assert "PPO" not in parser.format_help() or task == "pong_actor_critic"
    assert "No NTK is computed here" in parser.format_help()


def test_analyze_help_shows_the_defaults_it_uses():
    parser = analyze_cli.analyze_parser()
    assert parser.format_usage().startswith("usage: ntk-tracking analyze ")
    args = parser.parse_args(["RUN"])
    settings = analyze_cli.settings_from_args(args)
    assert settings == AnalysisSettings(splits=("auto",))
    shown = shown_defaults(parser)
    assert (shown["subsets"], shown["points"], shown["seed"], shown["implementation"], shown["splits"]) == (
        str(settings.num_subsets), str(settings.subset_size), str(settings.seed), settings.implementation, "auto")
    assert shown["poll_seconds"] == str(args.poll_seconds) and shown["stall_seconds"] == str(args.stall_seconds)
    assert "follow" not in shown and "allow_data_path" not in shown


def test_quickstart_help_is_the_quickstart_s_own():
    parser = quickstart_parser()
    text = parser.format_help()
    assert parser.format_usage().startswith("usage: ntk-tracking quickstart ")
    assert "No NTK is computed here" not in text and "mnist_dense" in text
    assert shown_defaults(parser) == {"epochs": str(QUICKSTART_EPOCHS), "seed": "0"}
    assert parser.parse_args([]).epochs == QUICKSTART_EPOCHS


def test_sweep_and_report_help_name_their_program():
    assert sweep_parser().format_usage().startswith("usage: ntk-tracking sweep ")
    assert report_parser().format_usage().startswith("usage: ntk-tracking report ")
    shown_defaults(sweep_parser())  # at most one default per option
    shown_defaults(report_parser())


def test_top_level_help_describes_every_command(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for command in ("quickstart", "train TASK", "analyze RUN_ID", "sweep", "report RUN_ID"):
        line = next(l for l in text.splitlines() if l.strip().startswith(command))
        assert len(line.split()) > 4, line  # a description follows the command
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(task in out for task in TASK_NAMES)
    with pytest.raises(SystemExit) as exit:
        cli.main(["trian"])
    assert exit.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_entry_scripts_name_themselves():
    """`python -m pipelines.X --help` says `python -m pipelines.X`; `ntk-tracking …` says itself."""
    calls = [["pipelines.train", t] for t in TASK_NAMES] + [[m] for m in (
        "pipelines.analyze", "pipelines.sweep", "pipelines.report", "pipelines.quickstart")]
    code = ("import contextlib, io, json, runpy, sys\n"
            "for call in json.loads(sys.argv[1]):\n"
            "    sys.argv = [call[0], *call[1:], '--help']\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        runpy.run_module(call[0], run_name='__main__')\n"
            "    print(out.getvalue().split(chr(10))[0])\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "COLUMNS": "2000"})
    usages = done.stdout.splitlines()
    assert [u.split()[1:3 + len(c)] for u, c in zip(usages, calls)] == [["python", "-m", *c] for c in calls]
    done = subprocess.run([sys.executable, "-m", "ntk_tracking.cli", "train", "cifar_resnet", "--help"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: ntk-tracking train cifar_resnet ")


def test_analyze_entry_point_parameters_are_analyze_options_with_the_same_defaults():
    import yaml

    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["analyze"]
    parser = analyze_cli.analyze_parser()
    options = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for name, spec in entry["parameters"].items():
        if name == "run_id":
            continue
        action = options[f"--{name.replace('_', '-')}"]
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name
        default = action.default if action.default != [] else ""
        assert str(spec["default"]) == str(default), name
