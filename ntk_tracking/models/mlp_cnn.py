"""Dense and convolutional networks of the paper's architecture scans (§3.1); `make` builds the
one a task config names."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "swish": nn.swish,
}

INITIALIZERS: dict[str, Callable] = {
    "lecun_normal": nn.initializers.lecun_normal(),  # flax's default
    "he_normal": nn.initializers.he_normal(),
    "glorot_normal": nn.initializers.glorot_normal(),
    "he_uniform": nn.initializers.he_uniform(),
}


class _Scanned(nn.Module):
    """The hyperparameters of the architecture scans, shared by MLP and CNN."""

    width: int
    depth: int
    num_outputs: int
    activation: str = "relu"
    initializer: str = "lecun_normal"


class MLP(_Scanned):
    """`depth` hidden Dense layers of `width` units, then a linear read-out."""

    @nn.compact
    def __call__(self, x):
        act, init = ACTIVATIONS[self.activation], INITIALIZERS[self.initializer]
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = act(nn.Dense(self.width, kernel_init=init)(x))
        return nn.Dense(self.num_outputs, kernel_init=init)(x)


class CNN(_Scanned):
    """`depth` 3×3 conv layers of `width` channels (2×2 max-pool after the first two), then a linear read-out."""

    @nn.compact
    def __call__(self, x):
        act, init = ACTIVATIONS[self.activation], INITIALIZERS[self.initializer]
        if x.ndim == 3:  # (points, H, W): add the channel axis
            x = x[..., None]
        for i in range(self.depth):
            x = act(nn.Conv(self.width, (3, 3), kernel_init=init)(x))
            if i < 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_outputs, kernel_init=init)(x)


MODELS = {"mlp": MLP, "cnn": CNN}


def make(config, data_info: dict) -> nn.Module:
    """The network of a scan point: `config.model` ("mlp" or "cnn") with the config's width, depth,
    activation and init, and `data_info["num_outputs"]` read-out units."""
    if config.model not in MODELS:
        raise ValueError(f"unknown model kind {config.model!r}; this version knows {sorted(MODELS)}")
    return MODELS[config.model](width=config.width, depth=config.depth, num_outputs=data_info["num_outputs"],
                                activation=config.activation, initializer=config.init)


def count_params(params) -> int:
    """Number of scalar parameters in a pytree (of arrays, or of shapes as jax.eval_shape gives)."""
    import jax
    import numpy as np

    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
