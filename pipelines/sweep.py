"""A grid of training runs as one MLflow parent run with a nested child run per configuration.

    mlflow run . -e sweep --env-manager local -P task=mnist_dense -P widths=16,64 -P depths=1,2 -P epochs=5
    python -m pipelines.sweep --task mnist_dense --widths 16,64,256 --depths 1,2,4 --workers 2
    python -m pipelines.sweep --help
"""

from ntk_tracking.cli.sweep import sweep_main

if __name__ == "__main__":
    sweep_main(prog="python -m pipelines.sweep")
