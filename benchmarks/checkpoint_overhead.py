"""Wall-time overhead of CV and resume checkpoints on training, per task.

    python benchmarks/checkpoint_overhead.py --tasks mnist_dense mnist_cnn fuel_efficiency mnist_vae --repeats 3
    python benchmarks/checkpoint_overhead.py --tasks greek_pos --args greek_pos "--dataset PATH_TO_TREEBANK"
    python benchmarks/checkpoint_overhead.py --tasks cifar_resnet \\
        --args cifar_resnet "--dataset mnist5k --train-size 256 --test-size 128 --epochs 2"

Each repeat trains the task's configuration (its defaults, changed only by `--args TASK "…"`,
which takes the task's own command-line options) twice in this process: once with the
checkpoints a tracked run saves (CV at the task's cadence, the resume checkpoint as the tracked
wrapper decides) and once with saving disabled, alternating the order. It prints the median wall
time of each, their difference per CV step and their ratio. Metrics logging is left out of both:
only checkpointing is measured. A task whose data cannot be loaded here (a hub dataset offline)
is reported as skipped with the loader's error.

A run shortened by `--args` (fewer epochs or points) over-states the overhead of the default
configuration: each save costs about the same, but training between saves is shorter and the
CV steps are denser (epoch 0, the last epoch and the log-spaced early epochs crowd together).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_once(task, config, data, save: bool, interval) -> tuple[float, int]:
    """Wall seconds of one training run (saves included and waited for) and its resume saves."""
    import mlflow

    from ntk_tracking.checkpointing import CheckpointStore

    model = task.build_model(config, data)
    state = task.init_state(config, data, model)
    cv_epochs = set(config.cv_epochs())
    resumes = 0
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("overhead", artifact_location=f"{tmp}/artifacts")
        run_id = client.create_run(experiment).info.run_id
        store = CheckpointStore(run_id, client, resume_interval_seconds=interval or None)

        def on_epoch(epoch, state, metrics):
            nonlocal resumes
            if not save:
                return
            if epoch in cv_epochs:
                store.save_cv(epoch, task.cv_variables(state))
            resumes += store.save_resume(epoch, state, {"epoch": epoch, "metrics": metrics},
                                         force=epoch == config.epochs)

        t0 = time.perf_counter()
        task.fit(config, data, model, state, 0, on_epoch, progress=False)
        store.wait()
        elapsed = time.perf_counter() - t0
        store.close()
    return elapsed, resumes


def orbax_floor(variables, saves: int = 10) -> tuple[float, float, int]:
    """A plain Orbax CheckpointManager saving `variables` synchronously, nothing of ours around
    it: (wall ms, CPU ms of all threads, bytes on disk) per save, medians over `saves`."""
    import orbax.checkpoint as ocp

    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
        with ocp.CheckpointManager(tmp, options=options, item_names=("variables",)) as manager:
            for step in range(saves + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                manager.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)))
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        size = sum(f.stat().st_size for f in pathlib.Path(tmp, "0").rglob("*") if f.is_file())
    return 1000 * statistics.median(walls[1:]), 1000 * statistics.median(cpus[1:]), size


def task_config(name: str, args: str | None):
    """The task's default config, changed by its own command-line options in `args`."""
    from ntk_tracking.cli.train import config_from_args, train_parser

    return config_from_args(name, train_parser(name).parse_args(shlex.split(args or "")))


def changed(task, config) -> str:
    """The fields that differ from the task's defaults, as `field=value` (or `defaults`)."""
    default = task.default_config()
    diffs = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
             if getattr(config, f.name) != getattr(default, f.name)]
    return " ".join(diffs) or "defaults"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mnist_dense", "mnist_cnn", "fuel_efficiency", "mnist_vae"])
    p.add_argument("--args", nargs=2, action="append", default=[], metavar=("TASK", "OPTIONS"),
                   help='the task\'s own training options, e.g. --args greek_pos "--dataset PATH --epochs 5"')
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--floor-only", action="store_true",
                   help="only the plain-Orbax save of each task's CV checkpoint (no training runs)")
    p.add_argument("--resume-interval-seconds", type=int, nargs="+", default=[60],
                   help="resume-checkpoint intervals to compare (60 = the tracked runs' default; "
                   "0 = every epoch)")
    args = p.parse_args(argv)
    options = dict(args.args)
    unknown = set(options) - set(args.tasks)
    if unknown:
        p.error(f"--args names tasks not in --tasks: {sorted(unknown)}")
    from ntk_tracking.models import count_params
    from ntk_tracking.tasks import get_task

    floors, sizes = {}, {}
    repeats = "" if args.floor_only else f"; median of {args.repeats}"
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}{repeats}", flush=True)
    if not args.floor_only:
        print(f"{'task':<18} {'epochs':>6} {'CV':>4} {'resume':>6} {'every':>6} {'no saving s':>11} "
              f"{'saving s':>9} {'added s':>8} {'ms/CV':>6} {'overhead':>8}  config")
    for name in args.tasks:
        task = get_task(name)
        config = task_config(name, options.get(name))
        try:
            data = task.load_data(config)
        except Exception as error:  # noqa: BLE001 - reported, then the next task
            print(f"{name:<18} SKIPPED: cannot load {config.dataset!r}: {error}", flush=True)
            continue
        state = task.init_state(config, data, task.build_model(config, data))
        variables = task.cv_variables(state)
        sizes[name] = count_params(variables)
        floors[name] = orbax_floor(variables) + orbax_floor(state)
        if args.floor_only:
            continue
        train_once(task, dataclasses.replace(config, epochs=1), data, False, None)  # compile outside the timings
        cases = [None] + list(args.resume_interval_seconds)  # None: no saving
        times = {c: [] for c in cases}
        resumes = {}
        for r in range(args.repeats):
            for case in (cases if r % 2 == 0 else cases[::-1]):
                elapsed, resumes[case] = train_once(task, config, data, case is not None, case)
                times[case].append(elapsed)
        base = statistics.median(times[None])
        n_cv = len(config.cv_epochs())
        for case in cases[1:]:
            saving = statistics.median(times[case])
            every = f"{case} s" if case else "epoch"
            print(f"{name:<18} {config.epochs:>6} {n_cv:>4} {resumes[case]:>6} {every:>6} {base:>11.2f} "
                  f"{saving:>9.2f} {saving - base:>8.2f} {1000 * (saving - base) / n_cv:>6.0f} "
                  f"{100 * (saving / base - 1):>7.1f}%  {changed(task, config)}", flush=True)
    if floors:
        print("\nOne step of the task's initial model saved by a plain Orbax CheckpointManager, "
              "synchronously (median of 10): CV (model variables: values = parameters and other state), "
              "resume (the training state)")
        print(f"{'task':<18} {'values':>11} {'CV MB':>7} {'wall ms':>8} {'CPU ms':>7}   "
              f"{'resume MB':>9} {'wall ms':>8} {'CPU ms':>7}")
        for name, (wall, cpu, size, r_wall, r_cpu, r_size) in floors.items():
            print(f"{name:<18} {sizes[name]:>11,} {size / 1e6:>7.2f} {wall:>8.1f} {cpu:>7.1f}   "
                  f"{r_size / 1e6:>9.2f} {r_wall:>8.1f} {r_cpu:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
