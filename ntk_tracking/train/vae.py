"""VAE training: negative ELBO (Bernoulli likelihood, Gaussian posterior), Adam, jitted epochs.

One reparameterized sample per point; its noise is a pure function of (seed, epoch, step), so a
resumed run repeats an uninterrupted one exactly. Evaluation uses one fixed noise draw per
point, the same at every epoch, so loss curves move only with the parameters.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from ntk_tracking.models.vae import VAE, bernoulli_nll, gaussian_kl
from ntk_tracking.train.supervised import epoch_order

EVAL_BATCH = 1000
_EVAL_STREAM = 2**31 - 1  # fold_in index of the evaluation noise: no training epoch uses it


def create_model(config, num_pixels: int) -> VAE:
    return VAE(hidden=config.hidden, latents=config.latents, outputs=num_pixels)


def create_train_state(config, num_pixels: int) -> train_state.TrainState:
    """VAE parameters seeded by config.seed and Adam."""
    model = create_model(config, num_pixels)
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, jnp.zeros((1, num_pixels), jnp.float32), key)["params"]
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

    @jax.jit
    def train_epoch(state, xs, epoch):
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), epoch), xs.shape[0])
        state, metrics = jax.lax.scan(train_step, state, (xs, keys))
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics["param_norm"] = optax.tree.norm(state.params)
        return state, metrics

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
        n = len(x)
        totals: dict[str, float] = {}
        for start in range(0, n, EVAL_BATCH):
            xc = x[start:start + EVAL_BATCH]
            weight = np.ones(len(xc), np.float32)
            if len(xc) < EVAL_BATCH and n > EVAL_BATCH:  # pad: one compiled shape
                pad = EVAL_BATCH - len(xc)
                xc = np.concatenate([xc, np.repeat(xc[:1], pad, 0)])
                weight = np.concatenate([weight, np.zeros(pad, np.float32)])
            for k, v in chunk_sums(state, xc, weight, start).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: v / n for k, v in totals.items()}

    return evaluate


def fit(config, data, state, start_epoch: int, on_epoch: Callable, progress: bool = True):
    """Train from `start_epoch` to config.epochs; on_epoch(epoch, state, metrics) after epoch 0 and each epoch.

    `data` holds x_train and x_test as float32 pixels in [0, 1], points × pixels.
    """
    train_epoch, evaluate = compiled(config.seed)
    x_train = data.x_train
    n = len(x_train)
    batch = min(config.batch_size, n)
    steps = n // batch

    def evaluation(state):
        metrics = {f"train/{k}": v for k, v in evaluate(state, x_train).items()}
        metrics.update({f"test/{k}": v for k, v in evaluate(state, data.x_test).items()})
        return metrics

    if start_epoch == 0:
        on_epoch(0, state, evaluation(state))
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"{config.task} epochs",
               disable=not progress, initial=start_epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        order = epoch_order(config.seed, epoch, n)[: steps * batch]
        state, step_metrics = train_epoch(state, x_train[order].reshape(steps, batch, -1), epoch)
        metrics = evaluation(state)
        metrics["train/step_loss"] = float(step_metrics["loss"])
        metrics["train/grad_norm"] = float(step_metrics["grad_norm"])
        metrics["train/param_norm"] = float(step_metrics["param_norm"])
        metrics["time/epoch_seconds"] = time.perf_counter() - t0
        on_epoch(epoch, state, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", test=f"{metrics['test/loss']:.4g}")
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"training diverged at epoch {epoch} (train loss {metrics['train/loss']}); "
                                     "lower the learning rate")
    return state
