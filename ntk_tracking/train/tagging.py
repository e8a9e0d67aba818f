"""Sequence tagging: masked loss and accuracy, AdamW with warmup and cosine decay, jitted epochs.

Padding never counts: losses and accuracies are sums over real tokens divided by their number.
Data order and dropout are pure functions of (seed, epoch), so a resumed run repeats exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from ntk_tracking.keys import TEST_ACCURACY, TRAIN_LOSS, split_key
from ntk_tracking.models import scale_initial_params
from ntk_tracking.train.loop import run_epochs

EVAL_BATCH = 256


def masked_sums(logits, tags, mask):
    """Sums over real tokens of cross-entropy and of correct argmax predictions, and their count."""
    weight = mask.astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tags)
    correct = (jnp.argmax(logits, -1) == tags).astype(logits.dtype)
    return jnp.sum(ce * weight), jnp.sum(correct * weight), jnp.sum(weight)


def steps_per_epoch(config, num_points: int) -> int:
    return math.ceil(num_points / min(config.batch_size, num_points))


def create_optimizer(config, num_points: int) -> optax.GradientTransformation:
    """AdamW under linear warmup then cosine decay to 1 % over the whole run."""
    steps = steps_per_epoch(config, num_points)
    total = max(config.epochs * steps, 1)
    warmup = min(max(int(round(config.warmup_epochs * steps)), 0), total - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total, warmup + 1), end_value=0.01 * config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=config.weight_decay))


def create_train_state(model, config, data) -> train_state.TrainState:
    """The tagger's initial parameters (seeded by config.seed; weights times config.init_scale) and
    optimizer in one TrainState."""
    train = data.splits["train"]
    example = jax.tree_util.tree_map(lambda a: jnp.asarray(a[:1]), train.inputs)
    variables = model.init(jax.random.PRNGKey(config.seed), example)
    return train_state.TrainState.create(apply_fn=model.apply,
                                         params=scale_initial_params(variables["params"], config.init_scale),
                                         tx=create_optimizer(config, len(train)))


def word_dropout_probabilities(config, data) -> tuple[np.ndarray, np.ndarray]:
    """Per feature column: its unknown id and the probability of replacing an id by it in
    training (config.word_dropout for the word and folded-form columns, else 0), so that the
    model learns to tag unseen forms from their suffixes and context."""
    unknown = np.asarray(data.vocab.offsets, np.int32)
    probs = np.zeros(len(unknown), np.float32)
    probs[:2] = config.word_dropout
    return tuple(unknown.tolist()), tuple(probs.tolist())


@functools.lru_cache(maxsize=16)
def make_train_epoch(seed: int, unknown_ids: tuple | None = None, drop_probs: tuple | None = None) -> Callable:
    """A jitted epoch: lax.scan over minibatches, dropout keyed by (seed, epoch, step)."""

    def train_step(carry, batch):
        state, key = carry
        step_key, word_key = jax.random.split(jax.random.fold_in(key, state.step))
        inputs = batch["inputs"]
        if drop_probs is not None:
            ids = inputs["features"]
            drop = jax.random.bernoulli(word_key, jnp.asarray(drop_probs), ids.shape)
            inputs = {**inputs, "features": jnp.where(drop & (ids > 0), jnp.asarray(unknown_ids), ids)}

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, inputs, train=True, rngs={"dropout": step_key})
            ce, _, n = masked_sums(logits, batch["tags"], inputs["mask"])
            return ce / jnp.maximum(n, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state = state.apply_gradients(grads=grads)
        return (state, key), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    @jax.jit
    def train_epoch(state, batches, epoch):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        (state, _), metrics = jax.lax.scan(train_step, (state, key), batches)
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics["param_norm"] = optax.tree.norm(state.params)
        return state, metrics

    return train_epoch


def epoch_batches(split, batch_size: int, seed: int, epoch: int) -> dict:
    """The epoch's minibatches, (steps, batch, …): a seeded permutation, the last batch padded
    with empty sentences (mask all False) so that every sentence is seen once."""
    n = len(split)
    batch = min(batch_size, n)
    steps = math.ceil(n / batch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order = np.concatenate([order, np.full(steps * batch - n, -1)])

    def take(a):
        rows = np.where((order >= 0).reshape((-1,) + (1,) * (a.ndim - 1)), a[order], 0)
        return rows.reshape((steps, batch) + a.shape[1:])

    return {"inputs": {"features": take(split.features), "mask": take(split.mask)}, "tags": take(split.tags)}


@functools.lru_cache(maxsize=16)
def make_evaluate(apply_fn) -> Callable:
    """evaluate(state, split) -> {"loss", "accuracy"} over the real tokens of a whole split."""

    @jax.jit
    def chunk(params, inputs, tags):
        logits = apply_fn({"params": params}, inputs)
        return masked_sums(logits, tags, inputs["mask"])

    def evaluate(state, split) -> dict[str, float]:
        totals = np.zeros(3)
        n = len(split)
        size = min(EVAL_BATCH, n)
        for start in range(0, n, size):
            stop = min(start + size, n)
            pad = size - (stop - start)

            def rows(a):
                part = a[start:stop]
                return np.concatenate([part, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else part

            inputs = {"features": rows(split.features), "mask": rows(split.mask)}
            totals += np.asarray(chunk(state.params, inputs, rows(split.tags)))
        return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}

    return evaluate


def fit(config, data, state, start_epoch: int, on_epoch: Callable, progress: bool = True):
    """Train from `start_epoch` to config.epochs (train/loop.py)."""
    train_epoch = make_train_epoch(config.seed, *word_dropout_probabilities(config, data))
    evaluate = make_evaluate(state.apply_fn)

    def evaluation(state, epoch):
        metrics = {}
        for name, split in data.splits.items():
            metrics.update({split_key(name, k): float(v) for k, v in evaluate(state, split).items()})
        return metrics

    def step(state, epoch, steps=slice(None)):
        batches = epoch_batches(data.splits["train"], config.batch_size, config.seed, epoch)
        state, m = train_epoch(state, jax.tree_util.tree_map(lambda a: a[steps], batches), epoch)
        return state, {"train/grad_norm": float(m["grad_norm"]), "train/param_norm": float(m["param_norm"])}

    return run_epochs(config, state, start_epoch, on_epoch, step, evaluation, progress=progress,
                      shown={"loss": TRAIN_LOSS, "test": TEST_ACCURACY},
                      epoch_steps=lambda epoch: steps_per_epoch(config, len(data.splits["train"])))
