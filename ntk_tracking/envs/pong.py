"""Pong for the RL study: gymnax's `Pong-misc` with its defects corrected.

gymnax 1.0.1's `Pong-misc` (30×40×3 observation; actions none/up/down; +1 for every step the
ball stays in play) always serves the ball straight at both paddles' centres and reflects it
off only one horizontal wall, so "do nothing" rallies forever and a constant move loses after
56 steps every time. `FixedPong` reuses its code and rendering and changes three things: the
ball starts at a random row with a random vertical speed, it reflects off both walls, and the
opponent's paddle follows the ball's row exactly (so only the agent can miss). The episode ends on a miss or at `max_steps_in_episode` (gymnax's `step` truncates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments.misc import pong as gymnax_pong

ENVS = ("Pong-fixed", "Pong-misc")
DEFAULT_ENV = "Pong-fixed"
NONE, UP, DOWN = 0, 1, 2  # the actions: UP decreases the paddle's row


@struct.dataclass
class FixedPongParams(gymnax_pong.EnvParams):
    serve_max_y_speed: int = 2  # |vertical speed| of the serve: 1..this, random sign


class FixedPong(gymnax_pong.Pong):
    """`Pong-misc` with a random serve and reflection off both horizontal walls."""

    @property
    def name(self) -> str:
        return "Pong-fixed"

    @property
    def default_params(self) -> FixedPongParams:
        return FixedPongParams()

    def reset_env(self, key, params):
        _, state = super().reset_env(key, params)
        k_row, k_speed, k_sign = jax.random.split(key, 3)
        h = self.paddle_half_height
        row = jax.random.randint(k_row, (), h, self.height - h).astype(jnp.float32)
        speed = jax.random.randint(k_speed, (), 1, params.serve_max_y_speed + 1)
        sign = 2 * jax.random.bernoulli(k_sign).astype(jnp.int32) - 1
        ball = jnp.array([row, self.width / 2], jnp.float32)
        velocity = jnp.array([sign * speed, params.ball_x_speed], jnp.int32)
        state = state.replace(ball_position=ball, last_ball_position=ball, ball_velocity=velocity)
        return self.get_obs(state), state

    def step_env(self, key, state, action, params):
        last_ball_position = state.ball_position
        state = gymnax_pong.move_paddles(action, params.paddle_y_speed, state, self.paddle_half_height,
                                         self.height, params.use_ai_policy)
        state = gymnax_pong.move_ball(state)
        state = reflect_on_both_walls(state, self.height)
        state = self._opponent_follows_ball(state)
        state = gymnax_pong.reflect_on_paddle(state, self.width, self.paddle_half_height, params)
        state = state.replace(last_ball_position=last_ball_position, time=state.time + 1)
        done = self.is_terminal(state, params)
        reward = 1.0 - done.astype(jnp.float32)
        info = {"discount": self.discount(state, params)}
        obs = jax.lax.stop_gradient(self.get_obs(state))
        return obs, jax.lax.stop_gradient(state), reward, done, info


    def _opponent_follows_ball(self, state):
        """The right paddle returns every ball (gymnax's opponent, one row per step, misses fast
        serves and ends the episode for the agent)."""
        h = self.paddle_half_height
        row = jnp.clip(jnp.floor(state.ball_position[0]), h, self.height - h - 1)
        return state.replace(paddle_centers=state.paddle_centers.at[1].set(row))


def reflect_on_both_walls(state, height: int):
    """Mirror the ball at row 0 and at row height − 1 (gymnax reflects only at the bottom edge)."""
    row, v = state.ball_position[0], state.ball_velocity[0]
    low, high = row < 0, row > height - 1
    row = jnp.where(low, -row, jnp.where(high, 2 * (height - 1) - row, row))
    v = jnp.where(low | high, -v, v)
    return state.replace(ball_position=state.ball_position.at[0].set(row),
                         ball_velocity=state.ball_velocity.at[0].set(v))


def make_env(name: str = DEFAULT_ENV, max_steps: int | None = None):
    """(environment, params) for `name`; ValueError naming the choices otherwise."""
    if name == "Pong-fixed":
        env, params = FixedPong(), FixedPongParams()
    elif name == "Pong-misc":
        env = gymnax_pong.Pong()
        params = env.default_params
    else:
        raise ValueError(f"unknown environment {name!r}; choose one of {list(ENVS)} "
                         "(Pong-misc is gymnax's original, kept for comparison)")
    if max_steps is not None:
        if max_steps <= 0:
            raise ValueError(f"max_steps must be a positive number of steps, got {max_steps}")
        params = params.replace(max_steps_in_episode=max_steps)
    return env, params


def tracker_action(obs: jax.Array) -> jax.Array:
    """The scripted baseline: move the left paddle toward the row where the ball will reach it.

    Reads the paddle (channel 0, column 0), the ball (channel 1) and its last position
    (channel 2) from the observation and extrapolates the ball's straight path with its
    reflections off the walls (a ball moving away is followed back from the far side).
    """
    height, width = obs.shape[:2]
    rows = jnp.arange(height, dtype=jnp.float32)
    cols = jnp.arange(width, dtype=jnp.float32)
    paddle = jnp.sum(obs[:, 0, 0] * rows) / jnp.maximum(jnp.sum(obs[:, 0, 0]), 1.0)
    row, col = jnp.sum(jnp.sum(obs[:, :, 1], 1) * rows), jnp.sum(jnp.sum(obs[:, :, 1], 0) * cols)
    last_row, last_col = jnp.sum(jnp.sum(obs[:, :, 2], 1) * rows), jnp.sum(jnp.sum(obs[:, :, 2], 0) * cols)
    vy, vx = row - last_row, col - last_col
    steps = jnp.where(vx < 0, col, 2 * (width - 2) - col)  # to column 0, via the far paddle if moving away
    period = 2 * (height - 1)
    unfolded = jnp.mod(row + vy * steps, period)
    target = jnp.where(unfolded > height - 1, period - unfolded, unfolded)
    return jnp.where(target < paddle - 0.5, UP, jnp.where(target > paddle + 0.5, DOWN, NONE))


def evaluate_policy(env, params, policy, key, num_envs: int = 256, max_steps: int = 1200) -> dict:
    """Returns of the first episode of `num_envs` vmapped environments under `policy(key, obs) -> action`.

    Episodes still running after `max_steps` count as unfinished (their return so far is kept).
    """
    k_reset, k_run = jax.random.split(key)
    obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, num_envs), params)

    def step(carry, k):
        obs, state, ret, alive, terminated = carry
        k_act, k_env = jax.random.split(k)
        action = jax.vmap(policy)(jax.random.split(k_act, num_envs), obs)
        obs, state, reward, term, trunc, _ = jax.vmap(env.step, (0, 0, 0, None))(
            jax.random.split(k_env, num_envs), state, action, params)
        ret = ret + reward * alive
        terminated = terminated | (term & alive)
        alive = alive & ~(term | trunc)
        return (obs, state, ret, alive, terminated), None

    init = (obs, state, jnp.zeros(num_envs), jnp.ones(num_envs, bool), jnp.zeros(num_envs, bool))
    (_, _, ret, alive, terminated), _ = jax.lax.scan(step, init, jax.random.split(k_run, max_steps))
    return {"returns": ret, "unfinished": alive, "terminated": terminated}


def random_policy(key, obs):
    return jax.random.randint(key, (), 0, 3)


def scripted_policy(key, obs):
    return tracker_action(obs)
