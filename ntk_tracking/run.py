"""Training and analysis as the commands run them, for a config object, and the entry of a child process.

    python -m ntk_tracking.run --config config.json [--no-progress]
    python -m ntk_tracking.run --analyze RUN_ID --settings settings.json [--allow-data-path PATH] [--no-progress]

`--config` trains the task config in the file (a run's config.json document: its `task` field
names the task) exactly as `ntk-tracking train TASK` with the same options would: under
MLFLOW_RUN_ID the launched run is used, and a run with a resume checkpoint resumes. `--analyze`
measures the NTK of training run RUN_ID with the AnalysisSettings in the file, as `ntk-tracking
analyze RUN_ID` does. A sweep starts its children this way (sweep.run, sweep.ray_executor): the
child is handed its config, never a command line to parse.

`train` and `analyze_one` are the bodies that `ntk-tracking train` and `ntk-tracking analyze` share
with this entry; no command-line parser is imported here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ntk_tracking.helpformat import (EXIT_HELD, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_SERVER_LOST,
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


def _analyze_run(run_id: str, path: str, data_paths: tuple[str, ...], progress: bool) -> int:
    from ntk_tracking import tracking, ui_links

    again = f"continue with `ntk-tracking analyze {run_id}` and the same settings (checkpoints already logged are skipped)"
    analyzer = None
    try:
        tracking.prepare_tracking(reading=True)
        from ntk_tracking.analyze import Analyzer

        analyzer = Analyzer(run_id, load_settings(path), data_paths=data_paths)
        _, code = analyze_one(analyzer, progress=progress)
        ui_links.announce(run_id)
    except KeyboardInterrupt:
        done = f"epochs {sorted(analyzer.report.analyzed)} logged" if analyzer is not None else "nothing was logged"
        print(f"interrupted: run {run_id}: {done}; {again}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ValueError as err:  # RunError included
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - re-raised unless the tracking server is gone
        if not tracking.server_lost():
            raise
        print(tracking.redact(f"error: lost the tracking server {tracking.redact_uri(tracking.mlflow.get_tracking_uri())}"
                              f" ({type(err).__name__}); once the server is back, {again}"), file=sys.stderr)
        raise SystemExit(EXIT_SERVER_LOST) from None
    return code


def main(argv=None) -> None:
    """`python -m ntk_tracking.run --config FILE` or `--analyze RUN_ID --settings FILE`."""
    p = argparse.ArgumentParser(prog="python -m ntk_tracking.run",
                                description="Train a task config from a file, or analyze one training run "
                                "with settings from a file (how a sweep starts its children).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="FILE", help="a task config (config.json) to train")
    what.add_argument("--analyze", metavar="RUN_ID", help="a training run to measure the NTK of")
    p.add_argument("--settings", metavar="FILE", help="with --analyze: the AnalysisSettings as JSON")
    p.add_argument("--allow-data-path", dest="allow_data_path", action="append", default=[],
                   help="with --analyze: a file or folder the run's recorded dataset may name (repeatable)")
    p.add_argument("--resume-interval-seconds", type=int, default=RESUME_INTERVAL_SECONDS,
                   help="with --config: write the resume checkpoint at most this often; 0 = every epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.config:
        if args.resume_interval_seconds < 0:
            fail(f"--resume-interval-seconds must be ≥ 0, got {args.resume_interval_seconds}")
        _train_file(args.config, not args.no_progress, args.resume_interval_seconds)
        return
    if not args.settings:
        fail("--analyze needs --settings FILE")
    raise SystemExit(_analyze_run(args.analyze, args.settings, tuple(args.allow_data_path), not args.no_progress))


if __name__ == "__main__":
    main()
