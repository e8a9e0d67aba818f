"""A dense regression network on Auto MPG (paper §3.1, Fig. 5).

    mlflow run . -e fuel_efficiency --env-manager local -P width=128
    python -m pipelines.fuel_efficiency --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("fuel_efficiency", prog="python -m pipelines.fuel_efficiency")
