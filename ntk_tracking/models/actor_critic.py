"""The CNN actor and critic of the RL study (paper §4, Fig. 3c): two networks, no shared trunk."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class PongCNN(nn.Module):
    """Two strided 3×3 convolutions, one dense hidden layer, a linear head: (..., H, W, C) -> (..., out)."""

    num_outputs: int
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 64
    head_scale: float = 1.0  # orthogonal init gain of the head (0.01: a near-uniform initial policy)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.orthogonal(np.sqrt(2))
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), kernel_init=init)(x))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(nn.Dense(self.hidden, kernel_init=init)(x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.orthogonal(self.head_scale))(x)


def actor(num_actions: int, channels=(8, 16), hidden: int = 64) -> PongCNN:
    """The policy network: action logits."""
    return PongCNN(num_actions, tuple(channels), hidden, head_scale=0.01)


def critic(channels=(8, 16), hidden: int = 64) -> PongCNN:
    """The value network: one output (squeeze it for the value)."""
    return PongCNN(1, tuple(channels), hidden, head_scale=1.0)


def init_params(key, num_actions: int, obs_shape, channels=(8, 16), hidden: int = 64) -> dict:
    """{"actor": params, "critic": params} from one key."""
    k_actor, k_critic = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(obs_shape), jnp.float32)
    return {"actor": actor(num_actions, channels, hidden).init(k_actor, x)["params"],
            "critic": critic(channels, hidden).init(k_critic, x)["params"]}


def ntk_apply_fns(num_actions: int, channels=(8, 16), hidden: int = 64) -> dict:
    """The NTK's networks over CV variables {"actor": {"params"}, "critic": {"params"}}:
    "actor" = the sum of the action logits, "critic" = the value (outputs lead with the point axis)."""
    a, c = actor(num_actions, channels, hidden), critic(channels, hidden)

    def actor_fn(variables, x):
        return jnp.sum(a.apply(variables["actor"], x), axis=-1)

    def critic_fn(variables, x):
        return c.apply(variables["critic"], x)[..., 0]

    return {"actor": actor_fn, "critic": critic_fn}
