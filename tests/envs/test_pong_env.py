"""gymnax's Pong-misc as shipped (the measured defect) and the corrected Pong-fixed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tracking.envs import pong

RANDOM, TRACKER = -1, -2


# No jax_disable_most_optimizations here: these rollouts are long, so optimized code pays off.


NAMES = {RANDOM: "random", 0: "always 0", 1: "always 1", 2: "always 2", TRACKER: "tracker"}


def table(env, params, num_envs: int, max_steps: int, modes=(RANDOM, 0, 1, 2, TRACKER)) -> dict:
    """Returns of random, each constant action and the tracker: one compiled, vmapped rollout."""
    names = [NAMES[m] for m in modes]
    modes = jnp.array(modes)

    def run(mode):
        def policy(key, obs):
            random = jax.random.randint(key, (), 0, 3)
            return jnp.where(mode == RANDOM, random, jnp.where(mode == TRACKER, pong.tracker_action(obs), mode))

        return pong.evaluate_policy(env, params, policy, jax.random.PRNGKey(0), num_envs, max_steps)

    out = jax.jit(jax.vmap(run))(modes)
    return {n: {k: np.asarray(v[i]) for k, v in out.items()} for i, n in enumerate(names)}


@pytest.mark.slow  # 1,024 simulated episodes of up to 1,200 steps: the fast tier leaves it out
def test_gymnax_pong_misc_is_degenerate_as_shipped():
    """256 vmapped episodes, up to 1,200 steps. If a gymnax release changes this, the table in docs/models.md
    table and the reason for Pong-fixed must be revisited."""
    env, params = pong.make_env("Pong-misc")
    assert params.max_steps_in_episode == 1000
    t = table(env, params, 256, 1200, modes=(RANDOM, 0, 1, 2))
    # "Do nothing" rallies forever: every episode runs into the 1,000-step limit, never lost.
    assert np.all(t["always 0"]["returns"] == 1000) and not t["always 0"]["terminated"].any()
    # A constant move loses the first ball, always after 56 rewarded steps.
    for name in ("always 1", "always 2"):
        assert np.all(t[name]["returns"] == 56) and t[name]["terminated"].all(), name
    random = t["random"]["returns"]
    assert 75 < random.mean() < 100 and random.min() == 56, random.mean()


def test_pong_misc_reflects_off_one_wall_only():
    env, params = pong.make_env("Pong-misc")
    _, state = env.reset(jax.random.PRNGKey(0), params)
    state = state.replace(ball_position=jnp.array([1.0, 20.0]), ball_velocity=jnp.array([-3, 1]))
    _, state, *_ = env.step(jax.random.PRNGKey(1), state, 0, params)
    assert float(state.ball_position[0]) < 0  # left the field at the top: not reflected
    env, params = pong.make_env("Pong-fixed")
    _, fixed = env.reset(jax.random.PRNGKey(0), params)
    fixed = fixed.replace(ball_position=jnp.array([1.0, 20.0]), ball_velocity=jnp.array([-3, 1]))
    _, fixed, *_ = env.step(jax.random.PRNGKey(1), fixed, 0, params)
    assert float(fixed.ball_position[0]) == 2.0 and int(fixed.ball_velocity[0]) == 3


def test_pong_fixed_needs_play_and_the_tracker_plays():
    """No constant action survives long; the scripted tracker never misses; random is far behind."""
    env, params = pong.make_env("Pong-fixed", max_steps=300)
    t = table(env, params, 64, 320)
    for name in ("always 0", "always 1", "always 2"):
        assert t[name]["returns"].mean() < 150 and t[name]["terminated"].mean() > 0.8, name
    assert np.all(t["tracker"]["returns"] == 300) and not t["tracker"]["terminated"].any()
    assert t["random"]["returns"].mean() < 0.5 * 300


def test_unknown_environment_is_a_value_error():
    with pytest.raises(ValueError, match="unknown environment 'Pong-v0'.*Pong-fixed"):
        pong.make_env("Pong-v0")
    with pytest.raises(ValueError, match="max_steps"):
        pong.make_env("Pong-fixed", max_steps=0)
