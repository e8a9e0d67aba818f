"""The paper's networks, one module per architecture, and the apply function the NTK engine differentiates.

Each architecture module (`mlp_cnn`, `resnet`, `vae`, `transformer`, `graph_net`, `actor_critic`)
holds its flax module classes and one constructor, `make(config, data_info)`: the network a task
config describes, sized by what the data fixes (`data_info`, a plain dict such as
`{"num_outputs": 10}`). A task names its module as `Task.architecture`, and `Task.build_model`
calls `make` once per command.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ntk_tracking.models.mlp_cnn import ACTIVATIONS, CNN, INITIALIZERS, MLP, MODELS, count_params


def ntk_apply_fn(model):
    """apply_fn(variables, x) for the NTK: differentiates `params` only, other state held fixed.

    Non-parameter collections (BatchNorm statistics) pass through stop_gradient, so their
    Jacobian is exactly zero and one compiled kernel serves every checkpoint.
    """

    def apply_fn(variables, x):
        rest = {k: jax.lax.stop_gradient(v) for k, v in variables.items() if k != "params"}
        return model.apply({"params": variables["params"], **rest}, x)

    return apply_fn


# The `params` leaves --init-scale multiplies: weight matrices and convolution / attention kernels
# (flax's Dense, DenseGeneral, Conv: "kernel") and embedding tables (flax's Embed: "embedding").
INIT_SCALED_LEAVES = ("kernel", "embedding")


def scale_initial_params(params, scale: float):
    """A freshly initialized network's `params` collection with every leaf named kernel or
    embedding multiplied by `scale` (the task option --init-scale); every other leaf (biases,
    normalization scales, other parameters) unchanged. `scale == 1` returns `params` itself, so
    the default initialization is bit-identical to a run made before the option existed.

    Call it on a new network's parameters only, before the optimizer state is created from them;
    a resumed run restores its trained parameters over the initial state and is never rescaled.
    Pass the `params` collection, not the whole variables: BatchNorm statistics are not weights.
    """
    if scale == 1:
        return params

    def scaled(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        return leaf * jnp.asarray(scale, leaf.dtype) if name in INIT_SCALED_LEAVES else leaf

    return jax.tree_util.tree_map_with_path(scaled, params)


__all__ = ["ACTIVATIONS", "CNN", "INITIALIZERS", "INIT_SCALED_LEAVES", "MLP", "MODELS", "count_params",
           "ntk_apply_fn", "scale_initial_params"]
