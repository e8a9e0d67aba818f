"""A graph convolutional network on ogbg-molpcba (paper §4.3, Fig. 3d).

    mlflow run . -e molpcba_gnn --env-manager local -P dataset=path/to/ogbg_molpcba -P epochs=10
    python -m pipelines.molpcba_gnn --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("molpcba_gnn", prog="python -m pipelines.molpcba_gnn")
