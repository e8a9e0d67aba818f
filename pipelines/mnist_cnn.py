"""A convolutional network on MNIST (paper §3.1, Fig. 1).

    mlflow run . -e mnist_cnn --env-manager local -P width=128
    python -m pipelines.mnist_cnn --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("mnist_cnn", prog="python -m pipelines.mnist_cnn")
