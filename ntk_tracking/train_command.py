"""`ntk-tracking train TASK`: a training entry point's options (the task config's fields), checked
before any run exists, then tracked training."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from ntk_tracking.helpformat import (EXIT_INTERRUPTED, EXIT_SERVER_LOST, EXIT_STORE_UNWRITABLE, HelpFormatter,
                                     fail as _fail, yes_no)
from ntk_tracking.tasks import get_task, task_names

RESUME_INTERVAL_SECONDS = 60  # the tracked wrapper's default; kept here so --help needs no jax import


def train_parser(task: str, prog: str | None = None) -> argparse.ArgumentParser:
    """Parameters of a training entry point: the task config's fields, defaulted from the task."""
    from ntk_tracking.tasks import base

    t = get_task(task)
    d = t.default_config()
    p = argparse.ArgumentParser(
        prog=prog or f"ntk-tracking train {task}",
        description=f"Train {t.summary or task} tracked in MLflow, with Orbax checkpoints at the "
        "collective-variable cadence. No NTK is computed here: run `ntk-tracking analyze RUN_ID` "
        "afterwards (training prints the command).",
        formatter_class=HelpFormatter,
    )
    for field in base.cli_fields(t.config_class):
        kind, optional = base.field_type(t.config_class, field.name)
        default = getattr(d, field.name)
        names = dict.fromkeys([f"--{field.name.replace('_', '-')}", f"--{field.name}"])
        if optional:  # None (all / unset) is 0 on the command line
            default = 0 if default is None else default
        if kind is bool:
            p.add_argument(*names, dest=field.name, type=yes_no, default=default, metavar="{yes,no}",
                           help=field.metadata.get("help"))
        else:
            p.add_argument(*names, dest=field.name, type=kind, default=default, help=field.metadata.get("help"))
    p.add_argument("--experiment", default=None, help="MLflow experiment name; default: the active one "
                   "($MLFLOW_EXPERIMENT_NAME, or MLflow's Default)")
    p.add_argument("--resume-interval-seconds", "--resume_interval_seconds", dest="resume_interval_seconds",
                   type=int, default=RESUME_INTERVAL_SECONDS,
                   help="write the resume checkpoint at most this often (and after the last epoch); "
                   "0 = every epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(task: str, args: argparse.Namespace):
    """Validated task config from parsed arguments (0 means all / unset for optional fields)."""
    from ntk_tracking.tasks import base

    t = get_task(task)
    values = {}
    for field in base.cli_fields(t.config_class):
        value = getattr(args, field.name)
        if base.field_type(t.config_class, field.name)[1] and value == 0:
            value = None
        values[field.name] = value
    config = t.config(**values)
    # Optional fields given as 0 mean None even where the task's default is a number.
    config = dataclasses.replace(config, **{k: None for k, v in values.items() if v is None})
    return config.validate()


def prepare_training(task: str, argv=None, prog: str | None = None):
    """Parse, validate and load the data: every error here comes before any run or file."""
    try:
        t = get_task(task)
    except ValueError as err:
        _fail(str(err))
    args = train_parser(task, prog).parse_args(argv)
    try:
        config = config_from_args(task, args)
        dataset = t.load_data(config)
        t.check_cadence(config, dataset)
        from ntk_tracking.tracking import prepare_tracking

        prepare_tracking()  # a dead server is named now, not after minutes of retries
    except ValueError as err:
        _fail(str(err))
    from ntk_tracking.confine import remember_data_paths

    remember_data_paths(config)  # so that this user's analysis of the run reads them with no option
    return args, config, dataset


def train_main(task: str, argv=None, prog: str | None = None, closing: bool = True) -> str:
    """A training entry point (`prog`: how its usage line names it): returns the run id and prints it,
    with (`closing`) where to look in the MLflow UI and the analysis command to run next."""
    try:
        args, config, dataset = prepare_training(task, argv, prog)
    except KeyboardInterrupt:
        _interrupted_before_start()
    if args.resume_interval_seconds < 0:
        _fail(f"--resume-interval-seconds must be ≥ 0, got {args.resume_interval_seconds}")
    from ntk_tracking.tracking import RunError, redact
    from ntk_tracking.train.tracked import TrainingInterrupted, TrainingStopped, TrackingServerLost, run_training

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run_id = run_training(get_task(task), config, dataset, progress=not args.no_progress,
                              experiment=args.experiment, resume_interval_seconds=args.resume_interval_seconds)
    except TrainingInterrupted as err:
        print(f"interrupted: run {err.run_id} stopped and is marked KILLED; resume it with "
              f"{resume_commands(task, config, argv, err.run_id, prog)}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except TrainingStopped as err:
        lost = isinstance(err, TrackingServerLost)
        print(redact(f"error: {err}. {'Once the server is back' if lost else 'Once the store accepts writes'}, "
                     "resume the run (from its last resume checkpoint; no epoch is logged twice) with "
                     f"{resume_commands(task, config, argv, err.run_id, prog)}"), file=sys.stderr)
        raise SystemExit(EXIT_SERVER_LOST if lost else EXIT_STORE_UNWRITABLE) from None
    except RunError as err:
        _fail(str(err))
    except KeyboardInterrupt:  # before the run existed
        _interrupted_before_start()
    from ntk_tracking import ui_links

    print(f"run {run_id} finished")
    ui_links.announce(run_id, show=closing)
    if closing:
        print(f"measure its NTK with: ntk-tracking analyze {run_id}")
    return run_id


def _interrupted_before_start():
    print("interrupted before training started; no run was created or changed", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None


def resume_commands(task: str, config, argv: list[str], run_id: str, prog: str | None) -> str:
    """The exact commands that resume run `run_id`: this command line with MLFLOW_RUN_ID, and the
    `mlflow run` form with every option that differs from the task's default."""
    from ntk_tracking.tasks import base

    default = get_task(task).default_config()
    params = [f"-P {shlex.quote(f'{f.name}={0 if v is None else v}')}" for f in base.cli_fields(type(config))
              if (v := getattr(config, f.name)) != getattr(default, f.name)]
    here = f"MLFLOW_RUN_ID={run_id} {prog or f'ntk-tracking train {task}'} {shlex.join(argv)}".rstrip()
    return f"`{here}` (or `{' '.join(['mlflow run . -e', task, '--env-manager local --run-id', run_id, *params])}`)"


def train_command(argv: list[str], prog: str = "ntk-tracking train") -> str:
    """`PROG TASK [options]`: the task's training entry point; `PROG --help` lists the tasks."""
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {prog} TASK [options]\n\ntasks:\n" + "\n".join(
            f"  {name:<18} {get_task(name).summary}" for name in task_names())
            + f"\n\n`{prog} TASK --help` lists the task's options and defaults.")
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        _fail(f"{prog} needs a task, one of {list(task_names())}")
    # An unknown task is refused by train_main, with the closest known name.
    return train_main(argv[0], argv[1:], prog=f"{prog} {argv[0]}")


