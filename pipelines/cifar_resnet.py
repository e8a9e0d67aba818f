"""A ResNet18 on CIFAR-10 (paper Fig. 3a).

    mlflow run . -e cifar_resnet --env-manager local
    mlflow run . -e cifar_resnet --env-manager local -P dataset=mnist5k -P width=0.25 -P epochs=2
    python -m pipelines.cifar_resnet --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("cifar_resnet", prog="python -m pipelines.cifar_resnet")
