"""VAE training: negative ELBO (Bernoulli likelihood, Gaussian posterior), Adam, jitted epochs.

One reparameterized sample per point; its noise is a pure function of (seed, epoch, step), so a
resumed run repeats an uninterrupted one exactly. Evaluation uses one fixed noise draw per
point, the same at every epoch, so loss curves move only with the parameters.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ntk_tracking.train.loop import chunked_means, full_batches, run_epochs, shuffled_batches, train_and_test
from ntk_tracking.models import scale_initial_params
from ntk_tracking.models.vae import VAE, bernoulli_nll, gaussian_kl

EVAL_BATCH = 1000
_EVAL_STREAM = 2**31 - 1  # fold_in index of the evaluation noise: no training epoch uses it


def create_train_state(model: VAE, config, data) -> train_state.TrainState:
    """Parameters of `model` seeded by config.seed (weights times config.init_scale), and Adam."""
    num_pixels = data.x_train.shape[1]
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, jnp.zeros((1, num_pixels), jnp.float32), key)["params"]
    params = scale_initial_params(params, config.init_scale)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(config.learning_rate))


def elbo_terms(apply_fn, params, x, rng):
    """Per-point (reconstruction = −log p(x|z), kl) with one sample z ~ q(z|x)."""
    logits, mean, logvar = apply_fn({"params": params}, x, rng)
    return bernoulli_nll(logits, x), gaussian_kl(mean, logvar)


@functools.lru_cache(maxsize=8)
def compiled(seed: int) -> tuple[Callable, Callable]:
    """(train_epoch, evaluate) for a seed, kept so resumed fits reuse compilations."""
    return make_train_epoch(seed), make_evaluate(seed)


def make_train_epoch(seed: int) -> Callable:
    """A jitted epoch: lax.scan over batches, noise keyed by (seed, epoch, step)."""

    def train_step(state, batch):
        x, rng = batch

        def loss_fn(params):
            rec, kl = elbo_terms(state.apply_fn, params, x, rng)
            return jnp.mean(rec + kl)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    @functools.partial(jax.jit, static_argnums=1)
    def epoch_keys(epoch, steps):
        return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), epoch), steps)

    @jax.jit
    def scan(state, xs, keys):
        state, metrics = jax.lax.scan(train_step, state, (xs, keys))
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics["param_norm"] = optax.tree.norm(state.params)
        return state, metrics

    def train_epoch(state, xs, epoch, steps=slice(None)):
        """The epoch's optimizer steps `steps` (all by default) over batches `xs` (steps, batch, pixels)."""
        return scan(state, xs[steps], epoch_keys(epoch, xs.shape[0])[steps])

    return train_epoch


def make_evaluate(seed: int) -> Callable:
    """evaluate(state, x) -> mean loss, reconstruction and kl (nats per point) over a split."""

    @jax.jit
    def chunk_sums(state, x, weight, start):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_STREAM), start)
        rec, kl = elbo_terms(state.apply_fn, state.params, x, key)
        return {"loss": jnp.sum((rec + kl) * weight), "reconstruction": jnp.sum(rec * weight),
                "kl": jnp.sum(kl * weight)}

    def evaluate(state, x) -> dict[str, float]:
        return chunked_means(chunk_sums, state, (x,), EVAL_BATCH, lambda start: start)

    return evaluate


def fit(config, data, state, start_epoch: int, on_epoch: Callable, progress: bool = True):
    """Train from `start_epoch` to config.epochs (train/loop.py).

    `data` holds x_train and x_test as float32 pixels in [0, 1], points × pixels.
    """
    train_epoch, evaluate = compiled(config.seed)
    def evaluation(state, epoch):
        return train_and_test(evaluate, state, (data.x_train,), (data.x_test,))

    def step(state, epoch, steps=slice(None)):
        (xs,) = shuffled_batches(config.seed, epoch, config.batch_size, data.x_train)
        state, m = train_epoch(state, xs.reshape(xs.shape[:2] + (-1,)), epoch, steps)
        return state, {"train/step_loss": float(m["loss"]), "train/grad_norm": float(m["grad_norm"]),
                       "train/param_norm": float(m["param_norm"])}

    return run_epochs(config, state, start_epoch, on_epoch, step, evaluation, progress=progress,
                      epoch_steps=lambda epoch: full_batches(len(data.x_train), config.batch_size))
