"""The paper's networks, one module per architecture, and the apply function the NTK engine differentiates.

Each architecture module (`mlp_cnn`, `resnet`, `vae`, `transformer`, `graph_net`, `actor_critic`)
holds its flax module classes and one constructor, `make(config, data_info)`: the network a task
config describes, sized by what the data fixes (`data_info`, a plain dict such as
`{"num_outputs": 10}`). A task names its module as `Task.architecture`, and `Task.build_model`
calls `make` once per command.
"""

from __future__ import annotations

import jax

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


__all__ = ["ACTIVATIONS", "CNN", "INITIALIZERS", "MLP", "MODELS", "count_params", "ntk_apply_fn"]
