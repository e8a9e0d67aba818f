"""Supervised training (classification and regression): jitted epochs, evaluation, the loop.

The loop never computes an NTK: it saves the model variables at the CV cadence and leaves the
kernel to the post-hoc analyzer.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from ntk_tracking.models import create_model

EVAL_BATCH = 1024


class TrainState(train_state.TrainState):
    """Flax TrainState; `batch_stats` carries non-parameter state where a model has it."""

    batch_stats: Any = None


def create_optimizer(config) -> optax.GradientTransformation:
    """The optimizer named by the config."""
    lr = config.learning_rate
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr)
    if config.optimizer == "sgd":
        return optax.sgd(lr)
    if config.optimizer == "momentum":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def loss_and_metrics(objective: str, outputs, targets) -> tuple[jax.Array, dict]:
    """Per-example loss (cross entropy or squared error) and accuracy where it applies."""
    if objective == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        return loss, {"accuracy": (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)}
    return jnp.sum((outputs - targets) ** 2, axis=-1), {}


def create_train_state(config, num_outputs: int, example_x) -> TrainState:
    """Model, initial variables (seeded by config.seed) and optimizer in one TrainState."""
    model = create_model(config.model, **config.model_hyperparameters(num_outputs))
    variables = model.init(jax.random.PRNGKey(config.seed), jnp.asarray(example_x[:1]))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=create_optimizer(config),
        batch_stats=variables.get("batch_stats"),
    )


def model_variables(state: TrainState) -> dict:
    """What a CV checkpoint holds: parameters and any non-trainable state."""
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    return variables


def make_train_epoch(objective: str) -> Callable:
    """A jitted function running one epoch of minibatch steps with lax.scan."""

    def train_step(state: TrainState, batch):
        x, y = batch

        def loss_fn(params):
            outputs = state.apply_fn({"params": params}, x)
            loss, _ = loss_and_metrics(objective, outputs, y)
            return jnp.mean(loss)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state = state.apply_gradients(grads=grads)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    @jax.jit
    def train_epoch(state, xs, ys):
        state, metrics = jax.lax.scan(train_step, state, (xs, ys))
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics["param_norm"] = optax.tree.norm(state.params)
        return state, metrics

    return train_epoch


def make_evaluate(objective: str) -> Callable:
    """evaluate(state, x, y) -> mean loss (and accuracy) over a whole split, in fixed-size chunks."""

    @jax.jit
    def chunk_sums(state, x, y, weight):
        outputs = state.apply_fn(model_variables(state), x)
        loss, extra = loss_and_metrics(objective, outputs, y)
        sums = {"loss": jnp.sum(loss * weight)}
        sums.update({k: jnp.sum(v * weight) for k, v in extra.items()})
        return sums

    def evaluate(state, x, y) -> dict[str, float]:
        n = len(x)
        totals: dict[str, float] = {}
        for start in range(0, n, EVAL_BATCH):
            xc, yc = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            weight = np.ones(len(xc), np.float32)
            if len(xc) < EVAL_BATCH and n > EVAL_BATCH:  # pad: one compiled shape
                pad = EVAL_BATCH - len(xc)
                xc = np.concatenate([xc, np.repeat(xc[:1], pad, 0)])
                yc = np.concatenate([yc, np.repeat(yc[:1], pad, 0)])
                weight = np.concatenate([weight, np.zeros(pad, np.float32)])
            for k, v in chunk_sums(state, xc, yc, weight).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: v / n for k, v in totals.items()}

    return evaluate


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch: a pure function of (seed, epoch), so resumed runs repeat it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit(
    config,
    dataset,
    state: TrainState,
    start_epoch: int,
    on_epoch: Callable[[int, TrainState, dict], None],
    progress: bool = True,
) -> TrainState:
    """Train from `start_epoch` (the epochs already done) to config.epochs.

    `on_epoch(epoch, state, metrics)` runs after evaluating epoch 0 (initialization, when
    start_epoch is 0) and after every epoch: it logs, checkpoints and saves the resume state.
    """
    train_epoch = make_train_epoch(config.objective)
    evaluate = make_evaluate(config.objective)
    x_train, y_train = dataset.x_train, dataset.y_train
    n = len(x_train)
    batch = min(config.batch_size, n)
    steps = n // batch

    def evaluation(state):
        metrics = {f"train/{k}": v for k, v in evaluate(state, x_train, y_train).items()}
        metrics.update({f"test/{k}": v for k, v in evaluate(state, dataset.x_test, dataset.y_test).items()})
        return metrics

    if start_epoch == 0:
        on_epoch(0, state, evaluation(state))
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc=f"{config.task} epochs",
               disable=not progress, initial=start_epoch, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        order = epoch_order(config.seed, epoch, n)[: steps * batch]
        xs = x_train[order].reshape((steps, batch) + x_train.shape[1:])
        ys = y_train[order].reshape((steps, batch) + y_train.shape[1:])
        state, step_metrics = train_epoch(state, xs, ys)
        metrics = evaluation(state)
        metrics["train/grad_norm"] = float(step_metrics["grad_norm"])
        metrics["train/param_norm"] = float(step_metrics["param_norm"])
        metrics["time/epoch_seconds"] = time.perf_counter() - t0
        on_epoch(epoch, state, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", test=f"{metrics['test/loss']:.4g}")
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (train loss {metrics['train/loss']}); "
                "lower the learning rate"
            )
    return state
