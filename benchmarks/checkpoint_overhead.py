"""Wall-time overhead of CV and resume checkpoints on training, per task at its default config.

    python benchmarks/checkpoint_overhead.py --tasks mnist_dense mnist_cnn fuel_efficiency --repeats 3

Each repeat trains the task's default configuration twice in this process, once with the
checkpoints a tracked run saves (CV at the task's cadence, resume as the tracked wrapper decides)
and once with saving disabled, alternating the order; it prints the median wall time of each and
their ratio. Metrics logging is left out of both: only checkpointing is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_once(task, config, data, save: bool, interval) -> float:
    import mlflow

    from ntk_tracking.checkpointing import CheckpointStore

    state = task.init_state(config, data)
    cv_epochs = set(config.cv_epochs())
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("overhead", artifact_location=f"{tmp}/artifacts")
        run_id = client.create_run(experiment).info.run_id
        store = CheckpointStore(run_id, client, resume_interval_seconds=interval or None)

        def on_epoch(epoch, state, metrics):
            if not save:
                return
            if epoch in cv_epochs:
                store.save_cv(epoch, task.cv_variables(state))
            store.save_resume(epoch, state, {"epoch": epoch, "metrics": metrics}, force=epoch == config.epochs)

        t0 = time.perf_counter()
        task.fit(config, data, state, 0, on_epoch, progress=False)
        store.wait()
        elapsed = time.perf_counter() - t0
        store.close()
    return elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mnist_dense", "mnist_cnn", "fuel_efficiency"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=0, help="override the task's epochs (0: its default)")
    p.add_argument("--resume-interval-seconds", type=int, nargs="+", default=[0, 60],
                   help="resume-checkpoint intervals to compare (0 = every epoch, the old behaviour)")
    args = p.parse_args(argv)
    from ntk_tracking.tasks import get_task

    print(f"{'task':<18} {'epochs':>6} {'CV ckpts':>8} {'resume every':>12} {'no saving s':>11} {'saving s':>9} {'overhead':>8}")
    for name in args.tasks:
        task = get_task(name)
        config = task.config(epochs=args.epochs or None).validate()
        data = task.load_data(config)
        train_once(task, config, data, False, None)  # compile once, outside the timings
        cases = [None] + list(args.resume_interval_seconds)  # None: no saving
        times = {c: [] for c in cases}
        for r in range(args.repeats):
            for case in (cases if r % 2 == 0 else cases[::-1]):
                save = case is not None
                times[case].append(train_once(task, config, data, save, case))
        base = statistics.median(times[None])
        for case in cases[1:]:
            saving = statistics.median(times[case])
            every = f"{case} s" if case else "epoch"
            print(f"{name:<18} {config.epochs:>6} {len(config.cv_epochs()):>8} {every:>12} {base:>11.2f} "
                  f"{saving:>9.2f} {100 * (saving / base - 1):>7.1f}%", flush=True)


if __name__ == "__main__":
    main()
