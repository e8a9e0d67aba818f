"""A sweep's report: `mlflow run . -e report --env-manager local -P run_id=PARENT_RUN_ID`."""

from ntk_tracking.cli.report import report_main

if __name__ == "__main__":
    report_main(prog="python -m pipelines.report")
