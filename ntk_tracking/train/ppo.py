"""PPO (GAE, clipped ratio, value loss, entropy bonus) over vmapped gymnax environments, PureJaxRL style.

One jitted `update(runner) -> (runner, metrics)` collects `num_steps` steps in each of
`num_envs` environments with `lax.scan` and trains `update_epochs` epochs of
`num_minibatches` minibatches on them. Python regains control after every update (one task
"epoch"), so the tracked wrapper can checkpoint; everything a resumed run needs — parameters,
optimizer state, environment states, observations, running returns and the raw uint32 PRNG
key — lives in the `Runner` pytree.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from ntk_tracking.keys import EVAL_EPISODE_RETURN, TRAIN_EPISODE_RETURN, TRAIN_EPISODES, split_key
from ntk_tracking.train.loop import run_epochs
from ntk_tracking.envs.pong import evaluate_policy, make_env
from ntk_tracking.models import scale_initial_params
from ntk_tracking.models.actor_critic import ActorCritic, init_params


class Runner(NamedTuple):
    """The full training state (a pytree of arrays and the optimizer state)."""

    train: TrainState  # params = {"actor": …, "critic": …}
    env_state: Any
    obs: jax.Array
    key: jax.Array  # raw uint32[2], not a typed key: Orbax saves it as an array
    running_return: jax.Array  # per environment, the episode in progress
    running_length: jax.Array
    last_return: jax.Array  # the mean return of the last update that completed an episode
    last_length: jax.Array
    episodes: jax.Array  # cumulative completed episodes
    env_steps: jax.Array  # cumulative environment steps


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array  # truncated episodes: reward + γ V(final observation)
    done: jax.Array


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam with gradient-norm clipping per network: the critic's large value gradients must
    not scale the actor's step down (one global norm over both stalls the policy)."""
    steps_per_update = config.update_epochs * config.num_minibatches
    lr = config.learning_rate
    if config.anneal_lr:  # linear to 0 over config.epochs updates
        lr = optax.linear_schedule(lr, 0.0, max(config.epochs, 1) * steps_per_update)
    one = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(lr, eps=1e-5))
    return optax.multi_transform({"actor": one, "critic": one}, lambda params: {
        name: jax.tree_util.tree_map(lambda _: name, tree) for name, tree in params.items()})


def init_runner(config, networks: ActorCritic, env, env_params) -> Runner:
    """Parameters of `networks` (weights times config.init_scale), optimizer and environments from config.seed."""
    key = jax.random.PRNGKey(config.seed)
    key, k_params, k_reset = jax.random.split(key, 3)
    params = scale_initial_params(init_params(k_params, networks, env.obs_shape), config.init_scale)
    train = TrainState.create(apply_fn=None, params=params, tx=make_optimizer(config))
    obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, config.num_envs), env_params)
    zeros = jnp.zeros(config.num_envs, jnp.float32)
    return Runner(train, env_state, obs, key, zeros, zeros, jnp.float32(0), jnp.float32(0), jnp.int32(0),
                  jnp.int32(0))


def make_update(config, networks: ActorCritic, env, env_params) -> Callable[[Runner], tuple[Runner, dict]]:
    """The jitted PPO update of `networks`: one rollout and its optimization epochs."""
    actor, critic = networks
    batch = config.num_envs * config.num_steps
    minibatch = batch // config.num_minibatches

    def policy_value(params, obs):
        logits = actor.apply({"params": params["actor"]}, obs)
        return logits, critic.apply({"params": params["critic"]}, obs)[..., 0]

    def env_step(runner: Runner, _):
        key, k_act, k_env = jax.random.split(runner.key, 3)
        logits, value = policy_value(runner.train.params, runner.obs)
        action = jax.random.categorical(k_act, logits)
        log_prob = jax.nn.log_softmax(logits)[jnp.arange(config.num_envs), action]
        obs, env_state, reward, term, trunc, info = jax.vmap(env.step, (0, 0, 0, None))(
            jax.random.split(k_env, config.num_envs), runner.env_state, action, env_params)
        # A time limit is no failure: bootstrap a truncated episode from its final observation.
        final_value = critic.apply({"params": runner.train.params["critic"]}, info["final_observation"])[..., 0]
        cut = trunc & ~term
        target_reward = reward + config.gamma * jnp.where(cut, final_value, 0.0)
        done = term | trunc
        ret, length = runner.running_return + reward, runner.running_length + 1
        completed = jnp.stack([jnp.sum(done), jnp.sum(ret * done), jnp.sum(length * done)])
        return new_runner(runner, env_state, obs, key, ret, length, done), (
            Transition(runner.obs, action, log_prob, value, target_reward, done), completed)

    def new_runner(runner, env_state, obs, key, ret, length, done):
        return runner._replace(env_state=env_state, obs=obs, key=key,
                               running_return=ret * ~done, running_length=length * ~done)

    def rollout(runner: Runner):
        return jax.lax.scan(env_step, runner, None, config.num_steps)

    def advantages(traj: Transition, last_value):
        def back(carry, t):
            gae, next_value = carry
            delta = t.reward + config.gamma * next_value * (1 - t.done) - t.value
            gae = delta + config.gamma * config.gae_lambda * (1 - t.done) * gae
            return (gae, t.value), gae

        _, adv = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
        return adv, adv + traj.value

    def loss_fn(params, mb: Transition, adv, targets):
        logits, value = policy_value(params, mb.obs)
        log_p = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_p, mb.action[:, None], axis=1)[:, 0]
        ratio = jnp.exp(log_prob - mb.log_prob)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = -jnp.mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - config.clip_eps,
                                                                   1 + config.clip_eps) * adv))
        # Plain squared error: PPO's value clipping (±clip_eps per update) would hold a critic whose
        # targets are tens of reward units away for hundreds of updates.
        value_loss = 0.5 * jnp.mean((value - targets) ** 2)
        entropy = -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=1))
        loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        approx_kl = jnp.mean((ratio - 1) - (log_prob - mb.log_prob))
        return loss, dict(policy_loss=policy_loss, value_loss=value_loss, entropy=entropy, approx_kl=approx_kl)

    def train_epoch(carry, _):
        train, data, key = carry
        key, k_perm = jax.random.split(key)
        order = jax.random.permutation(k_perm, batch)
        shuffled = jax.tree_util.tree_map(lambda a: a[order].reshape((config.num_minibatches, minibatch)
                                                                     + a.shape[1:]), data)

        def minibatch_step(train, mb):
            tr, adv, targets = mb
            grads, aux = jax.grad(loss_fn, has_aux=True)(train.params, tr, adv, targets)
            return train.apply_gradients(grads=grads), aux

        train, aux = jax.lax.scan(minibatch_step, train, shuffled)
        return (train, data, key), aux

    @jax.jit
    def update(runner: Runner):
        runner, (traj, completed) = rollout(runner)
        last_value = critic.apply({"params": runner.train.params["critic"]}, runner.obs)[..., 0]
        adv, targets = advantages(traj, last_value)
        flat = jax.tree_util.tree_map(lambda a: a.reshape((batch,) + a.shape[2:]), (traj, adv, targets))
        key, k_epochs = jax.random.split(runner.key)
        (train, _, _), aux = jax.lax.scan(train_epoch, (runner.train, flat, k_epochs), None,
                                          config.update_epochs)
        count, ret_sum, len_sum = jnp.sum(completed, axis=0)
        has = count > 0
        last_return = jnp.where(has, ret_sum / jnp.maximum(count, 1), runner.last_return)
        last_length = jnp.where(has, len_sum / jnp.maximum(count, 1), runner.last_length)
        runner = runner._replace(train=train, key=key, last_return=last_return, last_length=last_length,
                                 episodes=runner.episodes + count.astype(jnp.int32),
                                 env_steps=runner.env_steps + batch)
        metrics = {k: jnp.mean(v) for k, v in aux.items()}
        metrics.update(episode_return=last_return, episode_length=last_length,
                       episodes=runner.episodes, env_steps=runner.env_steps, completed=count)
        return runner, metrics

    return update


def make_evaluate(config, networks: ActorCritic, env, env_params, num_envs: int):
    """Mean return of `num_envs` episodes of the current (sampled) policy, up to the step limit."""
    actor = networks.actor

    @jax.jit
    def evaluate(params, key):
        def policy(k, obs):
            return jax.random.categorical(k, actor.apply({"params": params["actor"]}, obs))

        result = evaluate_policy(env, env_params, policy, key, num_envs, env_params.max_steps_in_episode)
        return jnp.mean(result["returns"])

    return evaluate


@functools.lru_cache(maxsize=8)
def _compiled(config, networks: ActorCritic):
    """One compiled update and evaluation per configuration (resumed runs in one process reuse them)."""
    env, env_params = make_env(config.env, config.max_steps)
    return (make_update(config, networks, env, env_params),
            make_evaluate(config, networks, env, env_params, config.eval_envs))


def _is_default_env(config, data) -> bool:
    """Whether `data` is what load_data builds from `config` (then the cached functions apply)."""
    env, env_params = make_env(config.env, config.max_steps)
    return type(data.env) is type(env) and data.params == env_params


def fit(config, data, networks: ActorCritic, runner: Runner, start_epoch: int,
        on_epoch: Callable[[int, Runner, dict], None], progress: bool = True, eval_epochs=()) -> Runner:
    """PPO updates of `networks` start_epoch+1 … config.epochs (one update per task epoch; train/loop.py).

    Update 0 reports the initial policy's evaluation return; `eval/episode_return` is measured
    at `eval_epochs` with a key that is a function of (seed, epoch), so resumed runs repeat it.
    A non-finite update is refused before it is reported (its checkpoint would be NaN).
    """
    update, evaluate = _compiled(config, networks) if _is_default_env(config, data) else (
        make_update(config, networks, data.env, data.params),
        make_evaluate(config, networks, data.env, data.params, config.eval_envs))
    eval_epochs = set(eval_epochs)

    def eval_return(runner, epoch):
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), epoch)
        return float(evaluate(runner.train.params, key))

    def evaluation(runner, epoch):
        if epoch == 0:
            r = eval_return(runner, 0)
            return {TRAIN_EPISODE_RETURN: r, EVAL_EPISODE_RETURN: r, TRAIN_EPISODES: 0.0, "train/env_steps": 0.0}
        return {EVAL_EPISODE_RETURN: eval_return(runner, epoch)} if epoch in eval_epochs else {}

    def step(runner, epoch):
        runner, m = update(runner)
        return runner, {split_key("train", k): float(v) for k, v in jax.device_get(m).items() if k != "completed"}

    return run_epochs(config, runner, start_epoch, on_epoch, step, evaluation, progress=progress, unit="update",
                      shown={"ret": TRAIN_EPISODE_RETURN, "eps": TRAIN_EPISODES}, check_before_reporting=True,
                      epoch_steps=lambda epoch: 1)


def make_state_collector(config, networks: ActorCritic, env, env_params, count: int, num_envs: int = 32,
                         every: int = 4):
    """collect(actor_params, seed) -> `count` observations (uint8) the policy visits: `num_envs`
    environments with auto-reset, every `every`-th step kept (consecutive frames are near
    duplicates), drawn without replacement. Compiled once for all checkpoints."""
    actor = networks.actor
    steps = max(1, -(-count * every // num_envs))

    @jax.jit
    def roll(actor_params, key):
        k_reset, k_run = jax.random.split(key)
        obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, num_envs), env_params)

        def step(carry, k):
            obs, state = carry
            k_act, k_env = jax.random.split(k)
            action = jax.random.categorical(k_act, actor.apply({"params": actor_params}, obs))
            next_obs, state, *_ = jax.vmap(env.step, (0, 0, 0, None))(
                jax.random.split(k_env, num_envs), state, action, env_params)
            return (next_obs, state), obs.astype(jnp.uint8)

        _, seen = jax.lax.scan(step, (obs, state), jax.random.split(k_run, steps))
        return seen[::every].reshape((-1,) + seen.shape[2:])

    def collect(actor_params, seed: int) -> np.ndarray:
        seen = np.asarray(roll(actor_params, jax.random.PRNGKey(seed)))
        pick = np.random.default_rng(seed).choice(len(seen), size=min(count, len(seen)), replace=False)
        return seen[np.sort(pick)]

    return collect
