"""`ntk-tracking sweep …`: parse, plan, train every child, optionally analyze."""

from __future__ import annotations

import shlex
import sys
from typing import NoReturn

from ntk_tracking import extras, tracking, ui_links
from ntk_tracking.helpformat import EXIT_INTERRUPTED, fail
from ntk_tracking.confine import looks_like_path
from ntk_tracking.sweep.analysis import analyze_sweep
from ntk_tracking.sweep.plan import plan_sweep
from ntk_tracking.sweep.run import SweepInterrupted, execute_sweep, print_summary
from ntk_tracking.sweep.spec import parse_sweep


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
            from ntk_tracking.sweep.ray_executor import RayExecutor, check_tracking_uri_for_ray

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
