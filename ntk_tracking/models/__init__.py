"""Models by name, and the apply function the NTK engine differentiates."""

from __future__ import annotations

import jax

from ntk_tracking.models.mlp_cnn import ACTIVATIONS, CNN, INITIALIZERS, MLP, count_params

MODELS = {"mlp": MLP, "cnn": CNN}


def create_model(kind: str, **hyperparameters):
    """The flax module `kind` ("mlp" or "cnn") with its hyperparameters."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; this version knows {sorted(MODELS)}")
    return MODELS[kind](**hyperparameters)


def ntk_apply_fn(model):
    """apply_fn(variables, x) for the NTK: differentiates `params` only, other state held fixed.

    Non-parameter collections (BatchNorm statistics) pass through stop_gradient, so their
    Jacobian is exactly zero and one compiled kernel serves every checkpoint.
    """

    def apply_fn(variables, x):
        rest = {k: jax.lax.stop_gradient(v) for k, v in variables.items() if k != "params"}
        return model.apply({"params": variables["params"], **rest}, x)

    return apply_fn


__all__ = ["ACTIVATIONS", "CNN", "INITIALIZERS", "MLP", "MODELS", "count_params", "create_model", "ntk_apply_fn"]
