"""`ntk-tracking report RUN_ID`: a sweep's report (ntk_tracking.report) logged into its parent run."""

from __future__ import annotations

import argparse
import os

from ntk_tracking import regimes, tracking, ui_links
from ntk_tracking.cli.helpformat import HelpFormatter, fail as _fail
from ntk_tracking.keys import REPORTED_RUN_TAG
from ntk_tracking.report import SPLITS, SweepReport, report


def report_parser(prog: str = "ntk-tracking report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Report a sweep from its MLflow runs: classify each child's entropy regime "
        "(logged on the child), and log evolution grids, width × depth scaling maps and CSV tables "
        "to the parent run under report/. Analyze the children first (ntk-tracking analyze).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_id", help="the MLflow run id of the sweep's parent run")
    p.add_argument("--split", default="train", choices=SPLITS, help="data split whose NTK entropy sets the regime")
    p.add_argument("--recovery-threshold", "--recovery_threshold", dest="recovery_threshold", type=float,
                   default=regimes.RECOVERY_THRESHOLD,
                   help="structure formation when the entropy recovers at least this fraction of its early drop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def report_main(argv=None, prog: str = "ntk-tracking report") -> SweepReport:
    """`ntk-tracking report RUN_ID`: report a sweep into its parent run."""
    args = report_parser(prog).parse_args(argv)
    try:
        tracking.prepare_tracking(reading=True)
        if os.environ.get("MLFLOW_RUN_ID") == args.run_id:
            raise ValueError("the run to report is the run this command was launched in; pass the sweep's parent run id")
        result = report(args.run_id, args.split, progress=not args.no_progress,
                        recovery_threshold=args.recovery_threshold)
        if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run`: point its run at the sweep
            tracking.client().set_tag(os.environ["MLFLOW_RUN_ID"], REPORTED_RUN_TAG, args.run_id)
    except ValueError as err:  # RunError included
        _fail(str(err))
    counts = {}
    for r in result.regimes.values():
        counts[r.label] = counts.get(r.label, 0) + 1
    print(f"reported {len(result.regimes)} run(s) of sweep {args.run_id} on {args.split}: "
          + ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
          + f"; artifacts {', '.join(result.artifacts)}")
    ui_links.announce(args.run_id)
    return result
