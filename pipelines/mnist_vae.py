"""A variational autoencoder on MNIST (paper Fig. 3e).

    mlflow run . -e mnist_vae --env-manager local
    python -m pipelines.mnist_vae --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("mnist_vae", prog="python -m pipelines.mnist_vae")
