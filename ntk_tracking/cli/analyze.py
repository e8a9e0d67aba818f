"""`ntk-tracking analyze RUN_ID …`: the analyzer's options, checked before anything is logged, then
the analysis of each run here or of all of them on a Ray cluster."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from ntk_tracking import extras
from ntk_tracking.cli.helpformat import EXIT_HELD, EXIT_INCOMPLETE, EXIT_TRAINER_STOPPED, HelpFormatter, add_ray_options
from ntk_tracking.keys import ANALYZED_BY_TAG, ANALYZED_RUN_TAG, DESCRIPTION_TAG


def analyze_parser(prog: str = "ntk-tracking analyze") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Restore a training run's CV checkpoints and log the NTK's collective "
        "variables (entropy, trace, …) into the same run, step = checkpoint epoch. Each checkpoint is "
        "claimed in the tracking store while it is measured, so analyzers started together share the "
        "work and log every checkpoint once.",
        epilog="exit status: 0 every checkpoint is analyzed and logged (by this or another process); "
        f"2 refused (bad input or settings; nothing logged); {EXIT_INCOMPLETE} some checkpoints are damaged, "
        "missing or gave a non-finite kernel (each named on its own line; every other one is analyzed, "
        "and a rerun retries them); 4 --follow found the trainer stopped; 5 some checkpoints are still held by another "
        "live analyzer after --held-wait-seconds (each named as held by HOST:PID until TIME; nothing of theirs "
        "is counted as analyzed); 6 the tracking server was lost (one line: what is logged and the command "
        "that continues); 130 interrupted (Ctrl-C).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_id", nargs="+", help="MLflow run ids (or one comma- or space-separated list) of "
                   "training runs or of sweeps' parent runs (a parent: every finished child)")
    p.add_argument("--subsets", type=int, default=20, help="K: measurement subsets per split (paper: 200)")
    p.add_argument("--points", type=int, default=20, help="m: points per subset (paper: 20)")
    p.add_argument("--splits", default="auto",
                   help="comma-separated probe sets to measure on; auto = the task's own (train,test for "
                   "supervised tasks, states for RL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement subsets")
    p.add_argument("--implementation", default="auto", help="NTK implementation: structured, jacobian, ntvp or auto")
    p.add_argument("--memory-budget-mb", "--memory_budget_mb", dest="memory_budget_mb", type=int, default=0,
                   help="peak memory for kernel blocks in MiB; 0 = the engine default (4096)")
    p.add_argument("--allow-data-path", "--allow_data_path", dest="allow_data_path", action="append", default=[],
                   help="a file or folder that the run's recorded dataset may name (repeatable). Without it, "
                   "a recorded path is read only if it lies under the current directory, under a path you "
                   "trained on here, or under a root listed in $NTK_TRACKING_DATA_ROOTS "
                   "(os.pathsep-separated): a run from a shared store cannot make you read other files")
    p.add_argument("--data", default="",
                   help="read the run's dataset from this file or folder instead of the recorded path (the "
                   "data moved, or lives elsewhere on this machine); its sizes must match the run's data.json")
    p.add_argument("--follow", action="store_true", help="keep analyzing while the training run writes checkpoints")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="with --follow: seconds between looks")
    p.add_argument("--stall-seconds", type=float, default=300.0,
                   help="with --follow: a RUNNING run whose trainer wrote no checkpoint and no heartbeat for "
                   "this long has stopped (killed); the analysis then ends with a message")
    p.add_argument("--held-wait-seconds", type=float, default=900.0,
                   help="a checkpoint another live analyzer holds is waited for until it is logged or its "
                   "claim expires and is taken over here, for at most this long")
    ray = p.add_argument_group("analysis on a Ray cluster")
    ray.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="local: checkpoints one after another in this process; ray: every pending "
                     "checkpoint of every run as a job for a pool of Ray workers (the tracking URI must be "
                     "an http(s) server every worker reaches)")
    add_ray_options(ray, "task", "each analysis worker")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args: argparse.Namespace):
    """The AnalysisSettings an analyze command line asks for, validated."""
    from ntk_tracking.analyze import AnalysisSettings

    if args.memory_budget_mb < 0:
        raise ValueError(f"--memory-budget-mb must be ≥ 0, got {args.memory_budget_mb}")
    return AnalysisSettings(
        num_subsets=args.subsets, subset_size=args.points,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        seed=args.seed, implementation=args.implementation,
        memory_budget=args.memory_budget_mb * 2**20 if args.memory_budget_mb > 0 else None,
    ).validate()


def analyze_main(argv=None, prog: str = "ntk-tracking analyze",
                 closing: bool = True) -> list[int] | dict[str, list[int]]:
    """`ntk-tracking analyze RUN_ID …`: every pending checkpoint of the runs (a sweep's parent: its
    children). One training run: the epochs analyzed; several, a sweep or Ray: run id -> epochs.
    `closing`: print where to look in the MLflow UI (and, for a sweep, the report command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = analyze_parser(prog).parse_args(argv)
    run_ids = list(dict.fromkeys(r for arg in args.run_id for r in re.split(r"[,\s]+", arg) if r))
    from ntk_tracking import tracking
    from ntk_tracking.analyze import TrainerStopped
    from ntk_tracking.run import analysis_exits

    analyzers, results = {}, {}
    again = f"continue with `{prog} {shlex.join(argv)}` (checkpoints already logged are skipped)"
    with analysis_exits(again, lambda: _progress(analyzers)):
        try:
            if not run_ids:
                raise ValueError("no run id given")
            if args.executor == "ray":
                extras.require("ray", "ray", what="--executor ray")
            if args.executor != "ray" and args.ray_address:
                raise ValueError("--ray-address needs --executor ray")
            if not args.cpus_per_task > 0:
                raise ValueError(f"--cpus-per-task must be > 0, got {args.cpus_per_task:g}")
            if not args.gpus_per_task >= 0:
                raise ValueError(f"--gpus-per-task must be ≥ 0, got {args.gpus_per_task:g}")
            if args.follow and (len(run_ids) > 1 or args.executor == "ray"):
                raise ValueError("--follow follows one training run, in this process; leave out --executor ray")
            if not args.held_wait_seconds >= 0:
                raise ValueError(f"--held-wait-seconds must be ≥ 0, got {args.held_wait_seconds:g}")
            if args.data and len(run_ids) > 1:
                raise ValueError("--data names one run's dataset; analyze that run alone with it")
            tracking.prepare_tracking(reading=True)
            settings = settings_from_args(args)
            if os.environ.get("MLFLOW_RUN_ID") in run_ids:
                raise ValueError("the run to analyze is the run this command was launched in; pass a training run id")
            if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run`: point its run at the analyzed ones
                for run_id in run_ids:
                    _link_launched_run(tracking.client(), run_id)
            if args.executor == "ray":
                by_run = _analyze_on_ray(args, run_ids, settings)
                _closing(run_ids, closing)
                return by_run
            analyzers = _checked_analyzers(args, run_ids, settings)  # every run checked before any is analyzed
            for run_id in run_ids:
                results[run_id] = _analyze_one(args, run_id, settings, analyzers.get(run_id))
            _closing(run_ids, closing)
        except TrainerStopped as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_TRAINER_STOPPED) from None
    codes = {code for _, code in results.values()} - {0}
    if codes:
        raise SystemExit(EXIT_INCOMPLETE if EXIT_INCOMPLETE in codes else EXIT_HELD)
    if len(results) == 1:
        return next(iter(results.values()))[0]
    by_run = {}
    for run_id, (epochs, _) in results.items():  # a sweep's children stand for their parent
        by_run.update(epochs if isinstance(epochs, dict) else {run_id: epochs})
    return by_run


def _progress(analyzers: dict) -> str:
    """What this command's analyzers logged so far, for a message on the way out."""
    parts = [f"run {run_id}: epochs {sorted(a.report.analyzed)} logged by this command"
             for run_id, a in analyzers.items()]
    return "; ".join(parts) or "nothing was logged"


def _closing(run_ids, show: bool) -> None:
    """The runs' links into their descriptions and (`show`) printed, with the report command for sweeps."""
    from ntk_tracking import ui_links
    from ntk_tracking.sweep import is_sweep_run

    for run_id in run_ids:
        ui_links.announce(run_id, show=show)
        if show and is_sweep_run(run_id):
            print(f"report the sweep with: ntk-tracking report {run_id}")


def _checked_analyzers(args, run_ids, settings) -> dict:
    """An Analyzer per training run (its settings, data and paths checked); sweeps' parents are
    checked child by child when their turn comes (analyze_sweep checks every child first)."""
    from ntk_tracking.analyze import Analyzer
    from ntk_tracking.sweep import is_sweep_run

    return {run_id: Analyzer(run_id, settings, data_paths=tuple(args.allow_data_path), data=args.data or None)
            for run_id in run_ids if not is_sweep_run(run_id)}


def _analyze_one(args, run_id: str, settings, analyzer=None):
    """One training run (its checked `analyzer`) or a sweep's parent, in this process: (epochs or
    run id -> epochs, exit status: 0, EXIT_INCOMPLETE or EXIT_HELD)."""
    from ntk_tracking.sweep import analyze_sweep

    if analyzer is None:  # a sweep's parent: every FINISHED child under one progress bar
        if args.follow:
            raise ValueError("--follow follows one training run; analyze a sweep once its children finished")
        if args.data:
            raise ValueError("--data names one run's dataset; pass it with a training run's id, not a sweep's")
        problems: list[str] = []
        analyzed = analyze_sweep(run_id, settings, progress=not args.no_progress,
                                 data_paths=tuple(args.allow_data_path), problems=problems)
        print(f"analyzed {sum(map(len, analyzed.values()))} checkpoint(s) of {len(analyzed)} "
              f"finished child run(s) of sweep {run_id}")
        if problems:
            print(f"skipped: {len(problems)} checkpoint(s) not logged: " + "; ".join(problems), file=sys.stderr)
        return analyzed, EXIT_INCOMPLETE if problems else 0
    from ntk_tracking.run import analyze_one

    return analyze_one(analyzer, follow=args.follow, progress=not args.no_progress, poll_seconds=args.poll_seconds,
                       stall_seconds=args.stall_seconds, held_wait_seconds=args.held_wait_seconds)


def _analyze_on_ray(args, run_ids, settings) -> dict[str, list[int]]:
    from ntk_tracking.on_ray import analyze_on_ray

    outcomes = analyze_on_ray(run_ids, settings, args.ray_address or None, args.cpus_per_task, args.gpus_per_task,
                              data_paths=tuple(args.allow_data_path), data=args.data or None,
                              progress=not args.no_progress)
    problems = []
    for run_id, outcome in outcomes.items():
        print(f"run {run_id}: analyzed {len(outcome['analyzed'])} checkpoint(s) on Ray: epochs {outcome['analyzed']}"
              + (f"; {len(outcome['already'])} already analyzed with these settings" if outcome["already"] else ""))
        problems += [f"{run_id}: {kind}: {m}" for kind in ("damaged", "nonfinite", "failed") for m in outcome[kind]]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(EXIT_INCOMPLETE)
    return {run_id: outcome["analyzed"] for run_id, outcome in outcomes.items()}


def _link_launched_run(client, analyzed: str) -> None:
    """`mlflow run . -e analyze` records a run of its own: tag it with the analyzed run and say so
    in its description (the UI shows it), and point the analyzed run back at it."""
    from ntk_tracking.ui_links import run_route

    launched = os.environ["MLFLOW_RUN_ID"]
    client.set_tag(launched, ANALYZED_RUN_TAG, analyzed)
    route = run_route(client.get_run(analyzed).info.experiment_id, analyzed)
    client.set_tag(launched, DESCRIPTION_TAG,
                   f"The `mlflow run . -e analyze` launch that analyzed run {analyzed}: the NTK's collective "
                   f"variables are logged into run {analyzed} itself ([its Model metrics]({route})); this run "
                   "only records the launch.")
    client.set_tag(analyzed, ANALYZED_BY_TAG, launched)


