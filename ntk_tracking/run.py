"""Training and analysis as the commands run them, for a config object, and the entry of a child process.

    python -m ntk_tracking.run --config config.json [--no-progress]
    python -m ntk_tracking.run --analyze RUN_ID --settings settings.json [--allow-data-path PATH] [--no-progress]

`--config` trains the task config in the file (a run's config.json document: its `task` field
names the task) exactly as `ntk-tracking train TASK` with the same options would: under
MLFLOW_RUN_ID the launched run is used, and a run with a resume checkpoint resumes. `--analyze`
measures the NTK of training run RUN_ID with the AnalysisSettings in the file, as `ntk-tracking
analyze RUN_ID` does. A sweep starts its children this way (sweep.run, on_ray): the child is
handed its config, never a command line to parse; the library writes these two forms itself, so
`main` reads them with a plain loop and refuses anything else (exit status 2).

`train`, `analyze_one` and `analysis_exits` are the bodies that `ntk-tracking train` and
`ntk-tracking analyze` share with this entry; no command-line parser is imported here.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from ntk_tracking.exits import (EXIT_HELD, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_SERVER_LOST,
                                EXIT_STORE_UNWRITABLE, fail)

RESUME_INTERVAL_SECONDS = 60  # the tracked wrapper's default; kept here so --help needs no jax import


def load_config(path):
    """The validated task config in a config.json file (ValueError naming the file otherwise)."""
    from ntk_tracking.tasks import get_task

    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the config file {path}: {err}") from None
    if not isinstance(saved, dict) or not saved.get("task"):
        raise ValueError(f"config file {path}: not a task config (a JSON object with a task field)")
    return get_task(saved["task"]).config_from_dict(saved).validate()


def write_config(config, path) -> Path:
    """`config` as a config.json file (the document a run's config.json artifact holds)."""
    path = Path(path)
    path.write_text(config.to_json())
    return path


def prepare(task, config):
    """The data of `config`, checked with the tracking store before any run exists (ValueError)."""
    from ntk_tracking.confine import remember_data_paths
    from ntk_tracking.tracking import prepare_tracking

    dataset = task.load_data(config)
    task.check_cadence(config, dataset)
    prepare_tracking()  # a dead server is named now, not after minutes of retries
    remember_data_paths(config)  # so that this user's analysis of the run reads them with no option
    return dataset


def train_command_line(task, config) -> str:
    """`ntk-tracking train TASK` with every option whose value differs from the task's default."""
    options, default = task.options(), task.default_config()
    words = ["ntk-tracking", "train", task.name]
    for name, option in options.items():
        value = getattr(config, name)
        if value == getattr(default, name):
            continue
        text = ("yes" if value else "no") if option.kind is bool else 0 if value is None else \
            repr(value) if isinstance(value, float) else value
        words += [option.flags[0], str(text)]
    return shlex.join(words)


def resume_commands(task, config, run_id: str, command: str) -> str:
    """The exact commands that resume run `run_id`: `command` with MLFLOW_RUN_ID, and the `mlflow run`
    form with every option that differs from the task's default."""
    from ntk_tracking.tasks import base

    default = task.default_config()
    params = [f"-P {shlex.quote(f'{f.name}={0 if v is None else v}')}" for f in base.cli_fields(type(config))
              if (v := getattr(config, f.name)) != getattr(default, f.name)]
    here = f"MLFLOW_RUN_ID={run_id} {command}".rstrip()
    return f"`{here}` (or `{' '.join(['mlflow run . -e', task.name, '--env-manager local --run-id', run_id, *params])}`)"


def interrupted_before_start():
    print("interrupted before training started; no run was created or changed", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None


def train(task, config, dataset, command: str, progress: bool = True, experiment: str | None = None,
          resume_interval_seconds: int = RESUME_INTERVAL_SECONDS, closing: bool = True) -> str:
    """Train `config` of `task` (a Task) tracked in MLflow, as `ntk-tracking train` does: returns the
    run id and prints it, with (`closing`) where to look in the MLflow UI and the analysis command.
    `command`: the command line that reruns this training, printed with the resume commands when
    training stops part-way (exit status 130, 6 or 7)."""
    from ntk_tracking.tracking import RunError, redact
    from ntk_tracking.train.tracked import TrainingInterrupted, TrainingStopped, TrackingServerLost, run_training

    try:
        run_id = run_training(task, config, dataset, progress=progress, experiment=experiment,
                              resume_interval_seconds=resume_interval_seconds)
    except TrainingInterrupted as err:
        print(f"interrupted: run {err.run_id} stopped and is marked KILLED; resume it with "
              f"{resume_commands(task, config, err.run_id, command)}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except TrainingStopped as err:
        lost = isinstance(err, TrackingServerLost)
        print(redact(f"error: {err}. {'Once the server is back' if lost else 'Once the store accepts writes'}, "
                     "resume the run (from its last resume checkpoint; no epoch is logged twice) with "
                     f"{resume_commands(task, config, err.run_id, command)}"), file=sys.stderr)
        raise SystemExit(EXIT_SERVER_LOST if lost else EXIT_STORE_UNWRITABLE) from None
    except RunError as err:
        fail(str(err))
    except KeyboardInterrupt:  # before the run existed
        interrupted_before_start()
    from ntk_tracking import ui_links

    print(f"run {run_id} finished")
    ui_links.announce(run_id, show=closing)
    if closing:
        print(f"measure its NTK with: ntk-tracking analyze {run_id}")
    return run_id


def analyze_one(analyzer, follow: bool = False, progress: bool = True, **waits) -> tuple[list[int], int]:
    """Analyze one training run with its checked `analyzer` and say what happened, as `ntk-tracking
    analyze RUN_ID` does: (epochs analyzed here, exit status 0, EXIT_INCOMPLETE or EXIT_HELD).
    `waits`: poll_seconds, stall_seconds, held_wait_seconds of Analyzer.run."""
    run_id = analyzer.run_id
    diverged = analyzer.diverged()
    if diverged:
        print(f"warning: run {run_id} diverged ({diverged}): its kernels measure a broken model", file=sys.stderr)
    epochs = analyzer.run(follow=follow, progress=progress, **waits)
    report = analyzer.report
    print(f"analyzed {len(epochs)} checkpoint(s) of run {run_id}: epochs {epochs}")
    if report.already:
        print(f"{len(report.already)} checkpoint(s) were already analyzed with these settings (epochs "
              f"{report.already})" + ("; nothing was left to do" if not epochs and report.ok else ""))
    if report.skipped:
        print(f"{len(report.skipped)} checkpoint(s) were logged by another process meanwhile: epochs "
              f"{sorted(report.skipped)}")
    if report.unverified:
        print(f"note: checkpoint(s) {report.unverified} were saved before checkpoints carried a digest: "
              "they cannot be verified")
    if not report.ok:
        print(report.summary(), file=sys.stderr)
    for line in report.held.values():
        print(f"held: {line}; not analyzed here: analyze again once it is released or expired", file=sys.stderr)
    return epochs, 0 if report.ok and not report.held else EXIT_INCOMPLETE if not report.ok else EXIT_HELD


def write_settings(settings, path) -> Path:
    """AnalysisSettings as a JSON file for `--analyze RUN_ID --settings FILE`."""
    path = Path(path)
    path.write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
    return path


def load_settings(path):
    """The validated AnalysisSettings in a file written by write_settings."""
    from ntk_tracking.analyze import AnalysisSettings

    try:
        saved = json.loads(Path(path).read_text())
        settings = AnalysisSettings(**{**saved, "splits": tuple(saved.get("splits", ()))})
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read the analysis settings file {path}: {err}") from None
    return settings.validate()


def _train_file(path: str, progress: bool, resume_interval_seconds: int) -> str:
    from ntk_tracking.tasks import get_task

    try:
        config = load_config(path)
        task = get_task(config.task)
        dataset = prepare(task, config)
    except ValueError as err:
        fail(str(err))
    except KeyboardInterrupt:
        interrupted_before_start()
    return train(task, config, dataset, train_command_line(task, config), progress=progress,
                 resume_interval_seconds=resume_interval_seconds)


@contextlib.contextmanager
def analysis_exits(again: str, logged: Callable[[], str],
                   lost_detail: Callable[[BaseException], str] | None = None) -> Iterator[None]:
    """How an analysis command ends when it cannot go on, for `ntk-tracking analyze` and the child
    entry alike: Ctrl-C prints `interrupted: LOGGED; AGAIN` (exit status 130); bad input (ValueError,
    RunError included) and an unwritable artifact store end through `fail` (2); a lost tracking
    server prints `error: lost the tracking server URI DETAIL; once the server is back, AGAIN` with
    credentials redacted (6), DETAIL being `lost_detail(err)`, by default `: LOGGED`. `logged()`
    says what was logged so far; `again`, how to continue. Any other error is raised as it is."""
    from ntk_tracking import tracking

    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {logged()}; {again}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ValueError as err:  # RunError included
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - re-raised unless the tracking server is gone
        if not tracking.server_lost():
            if isinstance(err, PermissionError):
                fail(f"cannot write to the run's artifact store at {err.filename or '?'} ({err.strerror}); make "
                     "it writable, or analyze from an account that can write there")
            raise
        uri = tracking.redact_uri(tracking.mlflow.get_tracking_uri())
        detail = lost_detail(err) if lost_detail is not None else f": {logged()}"
        print(tracking.redact(f"error: lost the tracking server {uri}{detail}; once the server is back, {again}"),
              file=sys.stderr)
        raise SystemExit(EXIT_SERVER_LOST) from None


def _analyze_run(run_id: str, path: str, data_paths: tuple[str, ...], progress: bool) -> int:
    from ntk_tracking import tracking, ui_links

    again = f"continue with `ntk-tracking analyze {run_id}` and the same settings (checkpoints already logged are skipped)"
    analyzer = None

    def logged() -> str:
        done = f"epochs {sorted(analyzer.report.analyzed)} logged" if analyzer is not None else "nothing was logged"
        return f"run {run_id}: {done}"

    with analysis_exits(again, logged, lost_detail=lambda err: f" ({type(err).__name__})"):
        tracking.prepare_tracking(reading=True)
        from ntk_tracking.analyze import Analyzer

        analyzer = Analyzer(run_id, load_settings(path), data_paths=data_paths)
        _, code = analyze_one(analyzer, progress=progress)
        ui_links.announce(run_id)
    return code


USAGE = """usage: python -m ntk_tracking.run --config FILE [--resume-interval-seconds N] [--no-progress]
       python -m ntk_tracking.run --analyze RUN_ID --settings FILE [--allow-data-path PATH]... [--no-progress]

Train a task config from a file (config.json), or analyze one training run with AnalysisSettings from
a file (how a sweep starts its children)."""


def _usage_error(message: str) -> NoReturn:
    print(f"{USAGE}\n\npython -m ntk_tracking.run: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def parse_entry(argv: list[str]) -> dict:
    """The child entry's arguments, in either fixed form (any order): {"config": FILE,
    "resume_interval_seconds": N, "progress": bool} or {"analyze": RUN_ID, "settings": FILE,
    "data_paths": (PATH, ...), "progress": bool}. Anything else: usage and exit status 2."""
    values: dict = {"data_paths": [], "progress": True}
    words = list(argv)
    while words:
        word = words.pop(0)
        match word:
            case "-h" | "--help":
                print(USAGE)
                raise SystemExit(0)
            case "--no-progress":
                values["progress"] = False
            case "--config" | "--analyze" | "--settings" | "--allow-data-path" | "--resume-interval-seconds":
                if not words or words[0].startswith("--"):
                    _usage_error(f"{word} needs a value")
                value = words.pop(0)
                if word == "--allow-data-path":
                    values["data_paths"].append(value)
                    continue
                name = word.removeprefix("--").replace("-", "_")
                if name in values:
                    _usage_error(f"{word} given twice")
                if name == "resume_interval_seconds":
                    try:
                        value = int(value)
                    except ValueError:
                        _usage_error(f"--resume-interval-seconds: not a whole number of seconds: {value!r}")
                values[name] = value
            case _:
                _usage_error(f"unrecognized argument {word!r}")
    if ("config" in values) == ("analyze" in values):
        _usage_error("give one of --config FILE and --analyze RUN_ID")
    if "config" in values:
        extra = (["--settings"] if "settings" in values else []) + (["--allow-data-path"] if values["data_paths"] else [])
        if extra:
            _usage_error(f"{', '.join(extra)}: only with --analyze")
        values.pop("data_paths")
        values.setdefault("resume_interval_seconds", RESUME_INTERVAL_SECONDS)
        return values
    if "resume_interval_seconds" in values:
        _usage_error("--resume-interval-seconds: only with --config")
    if "settings" not in values:
        fail("--analyze needs --settings FILE")
    values["data_paths"] = tuple(values["data_paths"])
    return values


def main(argv=None) -> None:
    """`python -m ntk_tracking.run --config FILE` or `--analyze RUN_ID --settings FILE`."""
    args = parse_entry(sys.argv[1:] if argv is None else argv)
    if "config" in args:
        if args["resume_interval_seconds"] < 0:
            fail(f"--resume-interval-seconds must be ≥ 0, got {args['resume_interval_seconds']}")
        _train_file(args["config"], args["progress"], args["resume_interval_seconds"])
        return
    raise SystemExit(_analyze_run(args["analyze"], args["settings"], args["data_paths"], args["progress"]))


if __name__ == "__main__":
    main()
