"""`ntk-tracking sweep …`: the sweep's options (the grid, the fixed training options, where children
run), then plan, train every child, optionally analyze (the library: ntk_tracking.sweep)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import NoReturn

from ntk_tracking import extras, tracking, ui_links
from ntk_tracking.cli.helpformat import EXIT_INTERRUPTED, HelpFormatter, add_ray_options, argument_type, fail, yes_no
from ntk_tracking.confine import looks_like_path
from ntk_tracking.sweep.analysis import analyze_sweep
from ntk_tracking.sweep.plan import plan_sweep
from ntk_tracking.sweep.run import SweepInterrupted, execute_sweep, print_summary
from ntk_tracking.sweep.spec import GRID, GRID_DEFAULTS, GRID_FIELDS, SweepSpec, scans
from ntk_tracking.tasks import Task, base, get_task, task_names

EXECUTORS = ("local", "ray")


def _task(task: str | Task) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def _parse_list(text: str, convert, option: str, default) -> list:
    """A comma-separated option value; empty means the task's default."""
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        return [default]
    if not all(items):
        raise ValueError(f"--{option}: empty item in {text!r}")
    try:
        values = [convert(s) for s in items]
    except (ValueError, argparse.ArgumentTypeError):
        kind = "yes/no values" if convert is base.yes_no else convert.__name__
        raise ValueError(f"--{option}: {text!r} is not a comma-separated list of {kind}") from None
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"--{option}: {', '.join(duplicates)} given more than once")
    return values


def _or_default(convert, default):
    """An argparse type where '' means the task's default (MLproject passes unset values as '')."""

    def parse(text):
        return default if text == "" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors also end a run launched by `mlflow run` FAILED."""

    def error(self, message):
        tracking.fail_launched_run(f"{self.prog}: {message}")
        super().error(message)


def sweep_parser(task: str | Task = "mnist_dense", prog: str = "ntk-tracking sweep") -> argparse.ArgumentParser:
    """The sweep's options; training defaults come from `task` (a Task or its name)."""
    task = _task(task)
    p = _Parser(
        prog=prog, allow_abbrev=False,
        description="Train every combination of the grid as a child run of one MLflow parent run "
        "(nested runs). Relaunch with --parent-run-id (or `mlflow run --run-id`) to skip finished "
        "children and resume the others. Grid lists are comma-separated; an empty value means the "
        "task's default.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--task", default=task, help=f"one of {list(task_names())}")
    grid = p.add_argument_group(
        "grid (one child run per combination)",
        "Sweep any training option of the task with --grid FIELD=V1,V2 (repeatable). Without --grid, a "
        "task with width, depth, activation, init and learning_rate options is scanned over width × depth "
        "× activation (the defaults below); --widths … --seeds are shorthands for --grid width=… … seed=….")
    grid.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                      help="a training option of the task and its comma-separated values, parsed with the "
                      "option's type; several may share one value, separated by spaces ('width=0.25,0.5 seed=0,1')")
    for field, option, convert in GRID:
        names = [f"--{option.replace('_', '-')}", f"--{field.replace('_', '-')}", f"--{option}", f"--{field}"]
        scan_default = f"; scan default: {GRID_DEFAULTS[option]}" if option in GRID_DEFAULTS else ""
        grid.add_argument(*dict.fromkeys(names), dest=option, default=None,
                          help=f"{field} values, as --grid {field}=…{scan_default}")
    fixed = p.add_argument_group("training options, the same for every child (unless in --grid)")
    for name, option in task.options().items():
        if name not in GRID_FIELDS:
            fixed.add_argument(*option.flags, dest=name, default=option.default, help=option.help or name,
                               type=_or_default(argument_type(option.convert), option.default))
    run = p.add_argument_group("the sweep")
    run.add_argument("--workers", type=int, default=1,
                     help="local executor: children trained at once (one process each); on Ray the "
                     "cluster's resources decide")
    run.add_argument("--executor", default="local",
                     help="where children train: local (subprocesses here) or ray (Ray tasks on a cluster)")
    add_ray_options(run, "run", "each child's Ray task")
    run.add_argument("--parent-run-id", "--parent_run_id", dest="parent_run_id", default="",
                     help="relaunch this sweep; empty: MLFLOW_RUN_ID under `mlflow run`, else a new parent run")
    run.add_argument("--experiment", default=None, help="MLflow experiment of a new sweep; unset: the active one")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    analysis = p.add_argument_group("analysis afterwards (ntk-tracking analyze on every finished child)")
    analysis.add_argument("--analyze", nargs="?", const=True, default=False, type=_or_default(yes_no, False),
                          help="measure the NTK of every finished child after training")
    analysis.add_argument("--subsets", type=int, default=20, help="K: measurement subsets per split")
    analysis.add_argument("--points", type=int, default=20, help="m: points per subset")
    analysis.add_argument("--splits", default="auto", help="comma-separated probe sets; auto = the task's own")
    analysis.add_argument("--analysis-seed", "--analysis_seed", dest="analysis_seed", type=int, default=0,
                          help="seed of the measurement subsets")
    analysis.add_argument("--implementation", default="auto", help="NTK implementation: structured, jacobian, ntvp or auto")
    return p


def _split_grid(values: list[str]) -> list[tuple[str, str]]:
    """--grid values ('a=1,2', or 'a=1,2 b=x' in one value) as (field, text) pairs."""
    pairs = []
    for item in (part for value in values for part in value.split()):
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2 (e.g. --grid seed=0,1)")
        pairs.append((field.replace("-", "_"), text))
    return pairs


def _grid(task: Task, args) -> dict[str, list]:
    """The swept fields and their values (each parsed with its config field's type): --grid, the
    shorthands, or the architecture scan."""
    options = task.options()
    d = task.default_config()
    listing = ", ".join(sorted(options))
    given = [(field, text, f"grid {field}") for field, text in _split_grid(args.grid)]
    scan = scans(task) and not given
    shorthand = []
    for field, option, _ in GRID:
        text = getattr(args, option)
        if scan:  # unset: the scan's values, or the task's own
            shorthand.append((field, GRID_DEFAULTS.get(option, "") if text is None else text, option.replace("_", "-")))
        elif text not in (None, "", GRID_DEFAULTS.get(option)):  # the scan's values: MLproject's defaults
            shorthand.append((field, text, option.replace("_", "-")))
    grid = {}
    for field, text, option in shorthand + given:
        if field not in options:
            raise ValueError(f"--{option}: task {task.name!r} has no option {field!r} to sweep; its options: {listing}")
        if field in grid:
            raise ValueError(f"--{option}: {field} is given more than once")
        grid[field] = _parse_list(text, options[field].convert, option, getattr(d, field))
    if scan:
        grid = {f: grid[f] for f in GRID_FIELDS}
    if not any(len(v) > 1 for v in grid.values()) and not scan:
        raise ValueError(f"nothing to sweep: give --grid FIELD=V1,V2 with two or more values (task {task.name!r}'s "
                         f"options: {listing})")
    return grid


def parse_sweep(argv, prog: str = "ntk-tracking sweep") -> tuple[SweepSpec, argparse.Namespace]:
    """The spec and the sweep-level options; ValueError for any bad value (argparse exits on syntax)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task", default="mnist_dense")
    task = pre.parse_known_args(argv)[0].task
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; choose one of {list(task_names())}")
    definition = get_task(task)  # once: the parser, the grid and the spec share it
    args = sweep_parser(definition, prog).parse_args(argv)
    grid = _grid(definition, args)
    options = definition.options()
    fixed = {dest: (options[dest].default if dest in GRID_FIELDS else getattr(args, dest))
             for dest in options if dest not in grid}
    for field in grid:  # a swept option also given as a fixed one
        if field not in GRID_FIELDS and getattr(args, field) != options[field].default:
            raise ValueError(f"--{field.replace('_', '-')} is both swept (--grid) and fixed; give it once")
    if args.workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {args.workers}")
    if args.executor not in EXECUTORS:
        raise ValueError(f"unknown --executor {args.executor!r}; choose one of {list(EXECUTORS)}")
    if args.executor == "local" and args.ray_address:
        raise ValueError("--ray-address needs --executor ray")
    if not args.cpus_per_run > 0:
        raise ValueError(f"--cpus-per-run must be > 0, got {args.cpus_per_run:g}")
    if not args.gpus_per_run >= 0:
        raise ValueError(f"--gpus-per-run must be ≥ 0, got {args.gpus_per_run:g}")
    spec = SweepSpec(task, grid, fixed)
    spec.definition = definition
    return spec, args


def sweep_main(argv=None, prog: str = "ntk-tracking sweep") -> str:
    """`ntk-tracking sweep …`: returns the parent run id; exits 1 if a child did not finish."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        spec, args = parse_sweep(argv, prog)
        settings = None
        if args.analyze:
            from ntk_tracking.analyze import AnalysisSettings

            settings = AnalysisSettings(
                num_subsets=args.subsets, subset_size=args.points, seed=args.analysis_seed,
                splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                implementation=args.implementation).validate()
        data_paths = tuple(v for v in (spec.fixed.get("dataset"),) if isinstance(v, str) and looks_like_path(v))
        executor = None
        if args.executor == "ray":
            extras.require("ray", "ray", what="--executor ray")
            from ntk_tracking.on_ray import RayExecutor, check_tracking_uri_for_ray

            check_tracking_uri_for_ray()
            executor = RayExecutor(args.ray_address, args.cpus_per_run, args.gpus_per_run, settings, data_paths)
        tracking.prepare_tracking()
        plan = plan_sweep(spec, args.parent_run_id or None, args.experiment)
        if executor is not None:
            executor.prepare()
    except ValueError as err:  # RunError included
        fail(str(err))
    except KeyboardInterrupt:
        print("interrupted before the sweep started; nothing was trained", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    try:
        result = execute_sweep(plan, args.workers, progress=not args.no_progress, executor=executor)
    except SweepInterrupted as err:
        _interrupted(prog, argv, err.parent_run_id, "its running children were stopped and the sweep is marked KILLED")
    print_summary(result, plan.client)
    if executor is not None and settings is not None:
        errors = executor.analysis_errors
        print("analyzed every finished child on Ray" + (f"; {len(errors)} analysis failed" if errors else ""))
        if errors:
            raise SystemExit(1)
    elif settings is not None:
        try:
            analyzed = analyze_sweep(result.parent_run_id, settings, progress=not args.no_progress,
                                     mlflow_client=plan.client, data_paths=data_paths)
        except KeyboardInterrupt:
            _interrupted(prog, argv, result.parent_run_id, "its children are trained; the analysis stopped")
        except ValueError as err:  # e.g. children analyzed earlier with other settings; training stands
            print(f"error: analysis of sweep {result.parent_run_id}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"analyzed {sum(map(len, analyzed.values()))} checkpoint(s) of {len(analyzed)} finished children")
    ui_links.announce(result.parent_run_id, plan.client)
    if settings is None:
        print(f"measure the NTK of every finished child with: ntk-tracking analyze {result.parent_run_id}\n"
              f"then report the sweep with: ntk-tracking report {result.parent_run_id}")
    else:
        print(f"report the sweep with: ntk-tracking report {result.parent_run_id}")
    if result.failed:
        raise SystemExit(1)
    return result.parent_run_id


def _interrupted(prog: str, argv: list[str], parent_run_id: str, what: str) -> NoReturn:
    """Ctrl-C: one line with the sweep and the exact command that resumes it, exit status 130."""
    again = argv if any(a.split("=")[0] in ("--parent-run-id", "--parent_run_id") for a in argv) else \
        [*argv, "--parent-run-id", parent_run_id]
    print(f"interrupted: sweep {parent_run_id}: {what}; resume it (finished children are kept) with "
          f"`{prog} {shlex.join(again)}` (or `mlflow run . -e sweep --env-manager local --run-id {parent_run_id}` "
          "with the same -P parameters)", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None
