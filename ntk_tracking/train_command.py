"""`ntk-tracking train TASK`: a training entry point's options (the task config's fields), checked
before any run exists, then tracked training."""

from __future__ import annotations

import argparse
import dataclasses

from ntk_tracking.helpformat import HelpFormatter, fail as _fail, yes_no
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
        from ntk_tracking.tracking import prepare_tracking

        prepare_tracking()  # a dead server is named now, not after minutes of retries
    except ValueError as err:
        _fail(str(err))
    from ntk_tracking.confine import remember_data_paths

    remember_data_paths(config)  # so that this user's analysis of the run reads them with no option
    return args, config, dataset


def train_main(task: str, argv=None, prog: str | None = None) -> str:
    """A training entry point (`prog`: how its usage line names it): prints and returns the run id."""
    args, config, dataset = prepare_training(task, argv, prog)
    if args.resume_interval_seconds < 0:
        _fail(f"--resume-interval-seconds must be ≥ 0, got {args.resume_interval_seconds}")
    from ntk_tracking.tracking import RunError
    from ntk_tracking.train.tracked import run_training

    try:
        run_id = run_training(get_task(task), config, dataset, progress=not args.no_progress,
                              experiment=args.experiment, resume_interval_seconds=args.resume_interval_seconds)
    except RunError as err:
        _fail(str(err))
    print(f"run {run_id} finished; measure its NTK with: ntk-tracking analyze {run_id}")
    return run_id


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


