"""`ntk-tracking train TASK`: a training entry point's options (the task config's fields), checked
before any run exists, then tracked training."""

from __future__ import annotations

import argparse
import sys

from ntk_tracking.cli.helpformat import HelpFormatter, argument_type, fail as _fail
from ntk_tracking.run import RESUME_INTERVAL_SECONDS, interrupted_before_start, prepare, train
from ntk_tracking.tasks import Task, get_task, task_names


def _task(task: str | Task) -> Task:
    """The Task itself, or the one a name names (ValueError for an unknown name)."""
    return task if isinstance(task, Task) else get_task(task)


def train_parser(task: str | Task, prog: str | None = None) -> argparse.ArgumentParser:
    """Parameters of a training entry point: the task config's fields, defaulted from the task."""
    t = _task(task)
    p = argparse.ArgumentParser(
        prog=prog or f"ntk-tracking train {t.name}",
        description=f"Train {t.summary or t.name} tracked in MLflow, with Orbax checkpoints at the "
        "collective-variable cadence. No NTK is computed here: run `ntk-tracking analyze RUN_ID` "
        "afterwards (training prints the command).",
        formatter_class=HelpFormatter,
    )
    for option in t.options().values():
        if option.kind is bool:
            p.add_argument(*option.flags, dest=option.name, type=argument_type(option.convert),
                           default=option.default, metavar="{yes,no}", help=option.help)
        else:
            p.add_argument(*option.flags, dest=option.name, type=argument_type(option.convert),
                           default=option.default, help=option.help)
    p.add_argument("--experiment", default=None, help="MLflow experiment name; default: the active one "
                   "($MLFLOW_EXPERIMENT_NAME, or MLflow's Default)")
    p.add_argument("--resume-interval-seconds", "--resume_interval_seconds", dest="resume_interval_seconds",
                   type=int, default=RESUME_INTERVAL_SECONDS,
                   help="write the resume checkpoint at most this often (and after the last epoch); "
                   "0 = every epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(task: str | Task, args: argparse.Namespace):
    """Validated task config from parsed arguments (0 means all / unset for optional fields)."""
    t = _task(task)
    return t.config_from_options({name: getattr(args, name) for name in t.options()})


def prepare_training(task: str | Task, argv=None, prog: str | None = None):
    """Parse, validate and load the data: every error here comes before any run or file is created."""
    try:
        t = _task(task)
    except ValueError as err:
        _fail(str(err))
    args = train_parser(t, prog).parse_args(argv)
    try:
        config = config_from_args(t, args)
        dataset = prepare(t, config)
    except ValueError as err:
        _fail(str(err))
    return args, config, dataset


def train_main(task: str | Task, argv=None, prog: str | None = None, closing: bool = True) -> str:
    """A training entry point (`prog`: how its usage line names it): returns the run id and prints it,
    with (`closing`) where to look in the MLflow UI and the analysis command to run next."""
    try:
        t = _task(task)  # looked up once; the Task object is passed on
    except ValueError as err:
        _fail(str(err))
    try:
        args, config, dataset = prepare_training(t, argv, prog)
    except KeyboardInterrupt:
        interrupted_before_start()
    if args.resume_interval_seconds < 0:
        _fail(f"--resume-interval-seconds must be ≥ 0, got {args.resume_interval_seconds}")
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"{prog or f'ntk-tracking train {t.name}'} {shlex.join(argv)}"
    return train(t, config, dataset, command, progress=not args.no_progress, experiment=args.experiment,
                 resume_interval_seconds=args.resume_interval_seconds, closing=closing)


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
