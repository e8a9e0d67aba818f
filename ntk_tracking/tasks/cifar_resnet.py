"""ResNet18 on CIFAR-10 (paper Fig. 3a): SGD Nesterov, weight decay, warmup + cosine, crop + flip.

    mlflow run . -e cifar_resnet --env-manager local                      # the hub's CIFAR-10
    mlflow run . -e cifar_resnet --env-manager local -P dataset=cifar-10-batches-bin
    mlflow run . -e cifar_resnet --env-manager local -P dataset=mnist5k -P width=0.25 -P epochs=2

The defaults (50 epochs, batch 128, lr 0.1, Nesterov 0.9, wd 5e-4) follow the recipes that reach
94–95 % test accuracy on a GPU; on a CPU, use a width below 1 or a few epochs.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from ntk_tracking.models import resnet
from ntk_tracking.keys import TEST_ACCURACY, TRAIN_LOSS
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option

IMAGE_SHAPES = ((32, 32, 3), (28, 28, 1))  # CIFAR-10, and MNIST for the offline smoke test


@dataclasses.dataclass(frozen=True)
class CifarResNetConfig(TaskConfig):
    """ResNet (CIFAR variant) hyperparameters and the SGD recipe."""

    dataset: str = option("uoft-cs/cifar10", "uoft-cs/cifar10 (hub), a local path (the hub's parquet files, a "
                          "save_to_disk folder, or the binary release cifar-10-batches-bin), or mnist5k "
                          "(offline smoke test on real digits)")
    model: str = option("resnet18", "ResNet variant: resnet18 or resnet34 (resnet_tiny: tests only)", cli=False)
    # Architecture.
    width: float = option(1.0, "channel multiplier k: stages of 64k, 128k, 256k, 512k channels")
    # Optimizer.
    learning_rate: float = option(0.1, "peak learning rate of the warmup + cosine schedule")
    momentum: float = option(0.9, "Nesterov momentum (0 = plain SGD)")
    weight_decay: float = option(5e-4, "L2 weight decay on every parameter")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warmup")
    batch_size: int = option(128, "images per training step")
    augment: bool = option(True, "random crop (pad 4) and horizontal flip of every training image")

    def checks(self):
        return [
            (self.model in resnet.RESNETS, f"unknown model {self.model!r}; choose one of {sorted(resnet.RESNETS)}"),
            (math.isfinite(self.width) and self.width > 0,
             f"width must be a positive channel multiplier (1 = ResNet18's 64…512 channels), got {self.width}"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        ] + super().checks()


def inference_apply_fn(model, mean, std):
    """apply_fn(variables, uint8 images) in inference mode: normalization inside, BatchNorm
    statistics held fixed (stop_gradient), so only `params` carry derivatives."""
    from ntk_tracking.train.image_classifier import preprocess

    def apply_fn(variables, x):
        dtype = jax.tree_util.tree_leaves(variables["params"])[0].dtype
        fixed = jax.lax.stop_gradient(variables["batch_stats"])
        return model.apply({"params": variables["params"], "batch_stats": fixed},
                           preprocess(x, mean, std, dtype), train=False)

    return apply_fn


class CifarResNetTask(Task):
    name = "cifar_resnet"
    config_class = CifarResNetConfig
    defaults = dict(epochs=50, cv_every=5, cv_log_points=8)
    summary = "a ResNet18 on CIFAR-10 (paper Fig. 3a)"
    architecture = resnet
    # Images of 4 classes whose class sets their brightness, in the binary release's format: chance is 1/4.
    learning_check = LearningCheck(dict(model="resnet_tiny", width=0.125, augment=False, epochs=2, batch_size=20,
                                        learning_rate=0.05, warmup_epochs=0.5, cv_every=2),
                                   falls={TRAIN_LOSS: 0.5}, above={TEST_ACCURACY: 0.5}, dataset_fixture="cifar_binary")

    def run_name(self, config) -> str:
        return f"{config.task}-{config.model}-k{config.width:g}"

    def load_data(self, config):
        from ntk_tracking.data.cifar10 import load_images

        config.validate()
        data = load_images(config.dataset, train_size=config.train_size, test_size=config.test_size,
                           seed=config.seed)
        shape = tuple(data.x_train.shape[1:])
        if shape not in IMAGE_SHAPES:
            raise ValueError(f"{config.dataset!r} holds images of shape {shape}; {config.task} takes CIFAR-10's "
                             f"32×32×3 (or MNIST's 28×28×1 for the smoke test): resize the images or pick "
                             "another dataset")
        return data

    def model_data_info(self, data):
        return {"num_outputs": data.num_outputs}

    def init_state(self, config, data, model):
        from ntk_tracking.train.image_classifier import create_train_state

        return create_train_state(model, config, data)

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.image_classifier import fit

        return fit(config, data, state, start_epoch, on_epoch, progress=progress)

    def steps_per_epoch(self, config, data):
        from ntk_tracking.train.loop import full_batches

        return full_batches(len(data.x_train), config.batch_size)

    def cv_variables(self, state):
        return {"params": state.params, "batch_stats": state.batch_stats}

    def probe(self, config, data, model, context=None) -> Probe:
        norm = data.info["normalization"]
        apply_fn = inference_apply_fn(model, norm["mean"], norm["std"])
        return Probe(networks={"model": apply_fn},
                     sets={"train": ProbeSet(data.x_train), "test": ProbeSet(data.x_test)})


TASKS = {"cifar_resnet": CifarResNetTask()}
