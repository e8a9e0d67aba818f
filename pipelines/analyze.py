"""The post-hoc NTK analyzer: `mlflow run . -e analyze --env-manager local -P run_id=RUN_ID`."""

from ntk_tracking.cli.analyze import analyze_main

if __name__ == "__main__":
    analyze_main(prog="python -m pipelines.analyze")
