"""Every command README.md and docs/ show names an entry point, a command and options that exist."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRIES = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
STARTS = re.compile(r"(ntk-tracking\s+[a-z]|python -m pipelines\.[a-z_]+|mlflow run \. -e )")


def commands(text: str) -> list[str]:
    """Command lines in a page: `\\`-continued lines joined, each cut at a comment, a closing
    backtick or a shell operator."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        for match in STARTS.finditer(line):
            command = re.split(r"\s#\s|`|\s\|\s|&&|;|\)\s|\)$", line[match.start():])[0]
            found.append(command.strip())
    return found


def tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in prose: split on spaces
        return command.split()


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2 and w[2].isalpha()]


def options_of(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def parser_for(words: list[str]):
    """The argparse parser of `ntk-tracking …` / `python -m pipelines.…` (None: not one of ours)."""
    from ntk_tracking.cli.analyze import analyze_parser
    from ntk_tracking.cli.quickstart import quickstart_parser
    from ntk_tracking.cli.report import report_parser
    from ntk_tracking.cli.sweep import sweep_parser
    from ntk_tracking.tasks import task_names
    from ntk_tracking.cli.train import train_parser

    if words[0] == "ntk-tracking":
        command, rest = words[1], words[2:]
    else:
        command, rest = words[2].removeprefix("pipelines."), words[3:]
        assert (ROOT / "pipelines" / f"{command}.py").exists(), f"no script pipelines/{command}.py"
    if command == "train":
        task = rest[0] if rest and rest[0] in task_names() else None
        if task is None:  # TASK as a placeholder: an option of some task
            merged = set().union(*(options_of(train_parser(t)) for t in task_names()))
            return merged
        return options_of(train_parser(task))
    if command == "sweep":
        task = rest[rest.index("--task") + 1] if "--task" in rest else "mnist_dense"
        return options_of(sweep_parser(task if task in task_names() else "mnist_dense"))
    return {"analyze": lambda: options_of(analyze_parser()), "report": lambda: options_of(report_parser()),
            "quickstart": lambda: options_of(quickstart_parser())}[command]()


def all_commands():
    return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page.read_text())]


def test_the_pages_show_commands():
    found = all_commands()
    assert len(found) > 30
    assert any(c.startswith("mlflow run . -e ") for _, c in found)


@pytest.mark.parametrize("page, command", all_commands())
def test_a_shown_command_exists(page, command):
    words = tokens(command)
    if words[0] == "mlflow":
        entry = words[4]
        assert entry in ENTRIES, f"{page}: `{command}` names no MLproject entry point {entry!r}"
        params = set(ENTRIES[entry].get("parameters", {}))
        given = [words[i + 1].split("=", 1)[0] for i, w in enumerate(words[:-1]) if w == "-P"]
        # Undeclared parameters fail here: `mlflow run` would append them to the command unchecked.
        unknown = [p for p in given if p not in params]
        assert not unknown, f"{page}: `{command}`: entry point {entry!r} has no parameter {unknown}"
        return
    known = parser_for(words)
    if words[0] == "ntk-tracking":
        assert words[1] in ("train", "analyze", "sweep", "report", "quickstart"), f"{page}: `{command}`"
    unknown = [f for f in flags(words) if f not in known]
    assert not unknown, f"{page}: `{command}` uses options that do not exist: {unknown}"


def test_the_commands_test_catches_a_wrong_flag_and_entry():
    assert commands("run `ntk-tracking analyze RUN --subsets 2` then") == ["ntk-tracking analyze RUN --subsets 2"]
    assert "--no-such-flag" not in parser_for(tokens("ntk-tracking analyze RUN --no-such-flag"))
    assert "no_such_entry" not in ENTRIES


def test_shown_mlflow_ui_and_server_commands_use_their_options():
    """`mlflow ui …` and `mlflow server …` lines (the one the commands print included) use options of
    MLflow's own command line."""
    import click
    from mlflow.cli import cli

    shown = [(page.relative_to(ROOT).as_posix(), m.group(1), m.group(0))
             for page in PAGES for m in re.finditer(r"mlflow (ui|server)\b[^`\n#|;]*",
                                                     re.sub(r"\\\n\s*", " ", page.read_text()))]
    assert any(kind == "ui" for _, kind, _ in shown) and any(kind == "server" for _, kind, _ in shown)
    for page, kind, command in shown:
        options = {o for p in cli.get_command(click.Context(cli), kind).params for o in p.opts}  # ui: server
        unknown = [f for f in flags(tokens(command)) if f not in options]
        assert not unknown, f"{page}: `{command}` uses options that `mlflow {kind}` lacks: {unknown}"


def test_the_commands_test_catches_an_undeclared_mlflow_parameter():
    """`mlflow run` appends undeclared -P values to the command unchecked; the docs may not rely on it."""
    test_a_shown_command_exists("page", "mlflow run . -e sweep --env-manager local -P epochs=5 -P train_size=300")
    with pytest.raises(AssertionError, match="no parameter"):
        test_a_shown_command_exists("page", "mlflow run . -e sweep --env-manager local -P learning_rate=0.1")
