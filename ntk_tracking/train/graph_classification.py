"""Multi-task binary graph classification (ogbg-molpcba): masked loss, mean AP, the loop.

Padding graphs and missing labels are masked with `jnp.where` (never multiplied: a NaN label
times zero is NaN), so they reach neither a gradient nor a metric. One compiled train step
serves every batch because every batch is padded to the same budget.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from flax.training import train_state

from ntk_tracking.keys import TRAIN_LOSS, split_key
from ntk_tracking.train.loop import epoch_order, run_epochs
from ntk_tracking.data.graph_batches import Budget, batches, count_batches, labels_of
from ntk_tracking.data.ogbg import Graphs
from ntk_tracking.models import scale_initial_params
from ntk_tracking.models.graph_net import GraphConvNet


class TrainState(train_state.TrainState):
    """Flax TrainState; dropout keys come from (seed, epoch, step), so none is stored."""


def create_train_state(model: GraphConvNet, config, example: jraph.GraphsTuple) -> TrainState:
    """Variables of `model` seeded by config.seed (weights times config.init_scale), and Adam."""
    variables = model.init(jax.random.PRNGKey(config.seed), example)
    return TrainState.create(apply_fn=model.apply, params=scale_initial_params(variables["params"], config.init_scale),
                             tx=optax.adam(config.learning_rate))


def label_mask(graphs: jraph.GraphsTuple) -> jax.Array:
    """(n_graph, T): present labels of real graphs."""
    return jnp.isfinite(graphs.globals) & jraph.get_graph_padding_mask(graphs)[:, None]


def masked_bce(logits, graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array]:
    """(sum of binary cross-entropies over present labels, their count)."""
    mask = label_mask(graphs)
    labels = jnp.where(mask, graphs.globals, 0.0)
    loss = optax.sigmoid_binary_cross_entropy(jnp.where(mask, logits, 0.0), labels)
    return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(mask)


def make_train_step(model: GraphConvNet) -> Callable:
    """train_step(state, graphs, key) -> (state, metrics), jitted: `model` with dropout on.
    Equal modules (runs differing only outside the network) share one compiled step."""
    return _train_step(model.clone(deterministic=False))


@functools.lru_cache(maxsize=8)
def _train_step(model: GraphConvNet) -> Callable:
    @jax.jit
    def train_step(state: TrainState, graphs: jraph.GraphsTuple, key):
        def loss_fn(params):
            logits = model.apply({"params": params}, graphs, rngs={"dropout": key})
            total, count = masked_bce(logits, graphs)
            return total / jnp.maximum(count, 1), count

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        return state, {"loss": loss, "labels": count, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_predict(model: GraphConvNet) -> Callable:
    """predict(params, graphs) -> logits (n_graph, T), jitted, dropout off."""
    return _predict(model)


@functools.lru_cache(maxsize=8)
def _predict(model: GraphConvNet) -> Callable:
    return jax.jit(lambda params, graphs: model.apply({"params": params}, graphs))


def predict_split(predict, params, graphs: Graphs, budget: Budget) -> np.ndarray:
    """(n, T) logits of every graph, in stored order (padding graphs dropped)."""
    out = []
    for batch in batches(graphs, budget):
        real = int(np.sum(jraph.get_graph_padding_mask(batch)))
        out.append(np.asarray(predict(params, batch))[:real])
    return np.concatenate(out) if out else np.zeros((0, graphs.labels.shape[1]), np.float32)


def bce_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy over present (non-NaN) labels."""
    present = ~np.isnan(labels)
    x, y = logits[present].astype(np.float64), labels[present].astype(np.float64)
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))) if x.size else math.nan


def mean_average_precision(logits: np.ndarray, labels: np.ndarray) -> float:
    """OGB's molpcba metric: mean over tasks with both classes present of average precision."""
    from sklearn.metrics import average_precision_score

    scores = []
    for t in range(labels.shape[1]):
        present = ~np.isnan(labels[:, t])
        y = labels[present, t]
        if y.size and 0 < y.sum() < y.size:
            scores.append(average_precision_score(y, logits[present, t]))
    return float(np.mean(scores)) if scores else math.nan


def evaluate(predict, params, graphs: Graphs, budget: Budget, prefix: str) -> dict[str, float]:
    logits = predict_split(predict, params, graphs, budget)
    labels = labels_of(graphs)
    return {split_key(prefix, "loss"): bce_loss(logits, labels),
            split_key(prefix, "mean_ap"): mean_average_precision(logits, labels)}


def fit(config, data, model: GraphConvNet, state: TrainState, start_epoch: int, on_epoch: Callable, budget: Budget,
        eval_sets: dict[str, Graphs], progress: bool = True) -> TrainState:
    """Train `model` from `start_epoch` to config.epochs (train/loop.py). `eval_sets` maps metric
    prefixes to graphs."""
    train_step = make_train_step(model)
    predict = make_predict(model)

    def evaluation(state, epoch):
        metrics = {}
        for prefix, graphs in eval_sets.items():
            metrics.update(evaluate(predict, state.params, graphs, budget, prefix))
        return metrics

    def step(state, epoch, steps=slice(None)):
        epoch_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch)
        sums = {"loss": 0.0, "labels": 0.0, "grad_norm": 0.0}
        done = 0
        epoch_batches = batches(data.train, budget, epoch_order(config.seed, epoch, len(data.train)))
        for i, batch in itertools.islice(enumerate(epoch_batches), steps.start, steps.stop):
            state, m = train_step(state, batch, jax.random.fold_in(epoch_key, i))
            sums = {k: sums[k] + m[k] for k in sums}  # device values: no host sync inside the epoch
            done += 1
        return state, {"train/step_loss": float(sums["loss"]) / max(done, 1),
                       "train/grad_norm": float(sums["grad_norm"]) / max(done, 1),
                       "train/param_norm": float(optax.tree.norm(state.params)), "train/steps": float(done)}

    def epoch_steps(epoch):
        return count_batches(data.train, budget, epoch_order(config.seed, epoch, len(data.train)))

    # Mean AP is NaN where a split has no positive label for a task: only the loss must stay finite.
    return run_epochs(config, state, start_epoch, on_epoch, step, evaluation, progress=progress,
                      shown={"loss": TRAIN_LOSS, "test_ap": split_key("test", "mean_ap")}, finite=("train/step_loss",),
                      epoch_steps=epoch_steps)
