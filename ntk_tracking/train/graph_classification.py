"""Multi-task binary graph classification (ogbg-molpcba): masked loss, mean AP, the loop.

Padding graphs and missing labels are masked with `jnp.where` (never multiplied: a NaN label
times zero is NaN), so they reach neither a gradient nor a metric. One compiled train step
serves every batch because every batch is padded to the same budget.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from ntk_tracking.data.graph_batches import Budget, batches, labels_of
from ntk_tracking.data.ogbg import Graphs
from ntk_tracking.models.graph_net import GraphConvNet


class TrainState(train_state.TrainState):
    """Flax TrainState; dropout keys come from (seed, epoch, step), so none is stored."""


def create_model(config, num_outputs: int, deterministic: bool = True) -> GraphConvNet:
    """The GCN the config describes (skip connections and LayerNorm on, as in the flax example)."""
    return _create(_model_key(config), num_outputs, deterministic)


def _create(key: tuple, num_outputs: int, deterministic: bool = True) -> GraphConvNet:
    latent_size, mlp_layers, steps, dropout_rate = key
    return GraphConvNet(num_outputs=num_outputs, latent_size=latent_size, num_mlp_layers=mlp_layers,
                        message_passing_steps=steps, dropout_rate=dropout_rate, skip_connections=True,
                        layer_norm=True, deterministic=deterministic)


def create_train_state(config, num_outputs: int, example: jraph.GraphsTuple) -> TrainState:
    """Model variables seeded by config.seed, and Adam."""
    model = create_model(config, num_outputs)
    variables = model.init(jax.random.PRNGKey(config.seed), example)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
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


def _model_key(config) -> tuple:
    """The fields the network depends on: runs differing only elsewhere share compiled steps."""
    return (config.latent_size, config.mlp_layers, config.message_passing_steps, config.dropout_rate)


def make_train_step(config, num_outputs: int) -> Callable:
    """train_step(state, graphs, key) -> (state, metrics), jitted."""
    return _train_step(_model_key(config), num_outputs)


@functools.lru_cache(maxsize=8)
def _train_step(key: tuple, num_outputs: int) -> Callable:
    model = _create(key, num_outputs, deterministic=False)

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


def make_predict(config, num_outputs: int) -> Callable:
    """predict(params, graphs) -> logits (n_graph, T), jitted, dropout off."""
    return _predict(_model_key(config), num_outputs)


@functools.lru_cache(maxsize=8)
def _predict(key: tuple, num_outputs: int) -> Callable:
    model = _create(key, num_outputs)
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
    return {f"{prefix}/loss": bce_loss(logits, labels), f"{prefix}/mean_ap": mean_average_precision(logits, labels)}


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The graph order of one epoch: a pure function of (seed, epoch), so resumed runs repeat it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit(config, data, state: TrainState, start_epoch: int, on_epoch: Callable, budget: Budget,
        eval_sets: dict[str, Graphs], progress: bool = True) -> TrainState:
    """Train from `start_epoch` to config.epochs; on_epoch(epoch, state, metrics) after epoch 0
    (when start_epoch is 0) and after every epoch. `eval_sets` maps metric prefixes to graphs."""
    num_outputs = data.num_tasks
    train_step = make_train_step(config, num_outputs)
    predict = make_predict(config, num_outputs)

    def evaluation(state):
        metrics = {}
        for prefix, graphs in eval_sets.items():
            metrics.update(evaluate(predict, state.params, graphs, budget, prefix))
        return metrics

    if start_epoch == 0:
        on_epoch(0, state, evaluation(state))
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"{config.task} epochs",
               disable=not progress, initial=start_epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        epoch_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch)
        sums = {"loss": 0.0, "labels": 0.0, "grad_norm": 0.0}
        steps = 0
        for step, batch in enumerate(batches(data.train, budget, epoch_order(config.seed, epoch, len(data.train)))):
            state, m = train_step(state, batch, jax.random.fold_in(epoch_key, step))
            sums = {k: sums[k] + m[k] for k in sums}  # device values: no host sync inside the epoch
            steps += 1
        metrics = evaluation(state)
        metrics["train/step_loss"] = float(sums["loss"]) / max(steps, 1)
        metrics["train/grad_norm"] = float(sums["grad_norm"]) / max(steps, 1)
        metrics["train/param_norm"] = float(optax.tree.norm(state.params))
        metrics["train/steps"] = float(steps)
        metrics["time/epoch_seconds"] = time.perf_counter() - t0
        on_epoch(epoch, state, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", test_ap=f"{metrics.get('test/mean_ap', math.nan):.3g}")
        if not math.isfinite(metrics["train/step_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch}; lower --learning-rate")
    return state
