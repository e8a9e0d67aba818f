"""The actor and critic of the RL study (paper §4, Fig. 3c): two networks, no shared trunk.

Two encoders of the 30×40×3 Pong frame, each followed by dense ReLU layers and a linear head:

- "cnn" (the default, as in the paper): two strided 3×3 convolutions on the raw frame. They are
  `nn.Conv` layers computed by `sliced_conv` (same values, 3.6× faster PPO updates on a CPU).
- "positions": a parameter-free read-out of the positions the frame shows (`pong_positions`:
  the left paddle's row, the ball's row and column now and one step earlier, and the ball's
  velocity); it learns about 3× sooner, a baseline for the CNN (studies/pong_rl.md).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ntk_tracking.models.conv import sliced_conv

ENCODERS = ("positions", "cnn")


def pong_positions(x):
    """(..., H, W, 3) Pong frames -> (..., 7) features, no parameters: the left paddle's centre row
    (channel 0, column 0), the ball's row and column (channel 1) and those one step earlier
    (channel 2), each scaled to [-1, 1), then the ball's velocity (rows / 3, columns) per step.
    Exact for one-pixel balls; an empty channel reads as row and column 0."""
    height, width = x.shape[-3], x.shape[-2]
    rows = jnp.arange(height, dtype=x.dtype)
    cols = jnp.arange(width, dtype=x.dtype)
    paddle = x[..., :, 0, 0]
    paddle_row = jnp.sum(paddle * rows, -1) / jnp.maximum(jnp.sum(paddle, -1), 1)

    def ball(channel):
        frame = x[..., channel]
        return jnp.sum(jnp.sum(frame, -1) * rows, -1), jnp.sum(jnp.sum(frame, -2) * cols, -1)

    (row, col), (last_row, last_col) = ball(1), ball(2)
    positions = jnp.stack([paddle_row / height, row / height, col / width, last_row / height,
                           last_col / width], -1) * 2 - 1
    velocity = jnp.stack([(row - last_row) / 3, col - last_col], -1)
    return jnp.concatenate([positions, velocity], -1)


def _head(x, num_outputs: int, hidden: int, dense_layers: int, head_scale: float):
    init = nn.initializers.orthogonal(np.sqrt(2))
    for _ in range(dense_layers):
        x = nn.relu(nn.Dense(hidden, kernel_init=init)(x))
    return nn.Dense(num_outputs, kernel_init=nn.initializers.orthogonal(head_scale))(x)


class PongMLP(nn.Module):
    """`pong_positions`, dense ReLU layers of `hidden` units, a linear head: (..., H, W, 3) -> (..., out)."""

    num_outputs: int
    hidden: int = 256
    dense_layers: int = 2
    head_scale: float = 1.0  # orthogonal init gain of the head (0.01: a near-uniform initial policy)

    @nn.compact
    def __call__(self, x):
        return _head(pong_positions(x), self.num_outputs, self.hidden, self.dense_layers, self.head_scale)


class PongCNN(nn.Module):
    """Strided 3×3 convolutions, dense ReLU layers, a linear head: (..., H, W, C) -> (..., out)."""

    num_outputs: int
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 256
    dense_layers: int = 2
    head_scale: float = 1.0  # orthogonal init gain of the head (0.01: a near-uniform initial policy)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.orthogonal(np.sqrt(2))
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:])  # nn.Conv takes one batch axis
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), kernel_init=init, conv_general_dilated=sliced_conv)(x))
        x = x.reshape(lead + (-1,))
        return _head(x, self.num_outputs, self.hidden, self.dense_layers, self.head_scale)


def _network(num_outputs: int, channels, hidden: int, encoder: str, head_scale: float, dense_layers: int):
    if encoder == "positions":
        return PongMLP(num_outputs, hidden, dense_layers, head_scale=head_scale)
    if encoder == "cnn":
        return PongCNN(num_outputs, tuple(channels), hidden, dense_layers, head_scale=head_scale)
    raise ValueError(f"unknown encoder {encoder!r}; choose one of {list(ENCODERS)}")


class ActorCritic(NamedTuple):
    """The agent's two networks (no shared trunk), what `make` returns."""

    actor: nn.Module  # action logits; head gain 0.01: a near-uniform initial policy
    critic: nn.Module  # one output (squeeze it for the value)


def make(config, data_info: dict) -> ActorCritic:
    """Actor and critic as a task config describes them (`encoder`, `channels` and twice as many in
    the second convolution, `hidden`, `dense_layers`), the actor with `data_info["num_actions"]` logits."""
    channels = (config.channels, 2 * config.channels)
    return ActorCritic(
        actor=_network(data_info["num_actions"], channels, config.hidden, config.encoder, 0.01, config.dense_layers),
        critic=_network(1, channels, config.hidden, config.encoder, 1.0, config.dense_layers))


def init_params(key, networks: ActorCritic, obs_shape) -> dict:
    """{"actor": params, "critic": params} from one key."""
    k_actor, k_critic = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(obs_shape), jnp.float32)
    return {"actor": networks.actor.init(k_actor, x)["params"], "critic": networks.critic.init(k_critic, x)["params"]}


def ntk_apply_fns(networks: ActorCritic) -> dict:
    """The NTK's networks over CV variables {"actor": {"params"}, "critic": {"params"}}:
    "actor" = the sum of the action logits, "critic" = the value (outputs lead with the point axis)."""
    a, c = networks

    def actor_fn(variables, x):
        return jnp.sum(a.apply(variables["actor"], x), axis=-1)

    def critic_fn(variables, x):
        return c.apply(variables["critic"], x)[..., 0]

    return {"actor": actor_fn, "critic": critic_fn}
