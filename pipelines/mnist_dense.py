"""A dense network on MNIST (paper §3.1, Fig. 4).

    mlflow run . -e mnist_dense --env-manager local -P width=128
    python -m pipelines.mnist_dense --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("mnist_dense", prog="python -m pipelines.mnist_dense")
