"""Train a small network on real MNIST digits shipped offline, then measure its NTK (< 3 min on 2 cores).

    mlflow run . -e quickstart --env-manager local
"""

from ntk_tracking.cli.quickstart import quickstart_main

if __name__ == "__main__":
    quickstart_main(prog="python -m pipelines.quickstart")
