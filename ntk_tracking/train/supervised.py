"""Supervised training (classification and regression): jitted epochs, evaluation, the loop.

The loop never computes an NTK: it saves the model variables at the CV cadence and leaves the
kernel to the post-hoc analyzer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ntk_tracking.models import scale_initial_params
from ntk_tracking.train.loop import chunked_means, full_batches, run_epochs, shuffled_batches, train_and_test

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


def create_train_state(model, config, data) -> TrainState:
    """Variables of `model` (seeded by config.seed; weights times config.init_scale) and the
    optimizer in one TrainState."""
    variables = model.init(jax.random.PRNGKey(config.seed), jnp.asarray(data.x_train[:1]))
    return TrainState.create(
        apply_fn=model.apply,
        params=scale_initial_params(variables["params"], config.init_scale),
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
        return chunked_means(chunk_sums, state, (x, y), EVAL_BATCH)

    return evaluate


def fit(
    config,
    dataset,
    state: TrainState,
    start_epoch: int,
    on_epoch: Callable[[int, TrainState, dict], None],
    progress: bool = True,
) -> TrainState:
    """Train from `start_epoch` (the epochs already done) to config.epochs (train/loop.py).

    `on_epoch(epoch, state, metrics)` runs after evaluating epoch 0 (initialization, when
    start_epoch is 0) and after every epoch: it logs, checkpoints and saves the resume state.
    """
    train_epoch = make_train_epoch(config.objective)
    evaluate = make_evaluate(config.objective)
    train, test = (dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)

    def evaluation(state, epoch):
        return train_and_test(evaluate, state, train, test)

    def step(state, epoch, steps=slice(None)):
        xs, ys = shuffled_batches(config.seed, epoch, config.batch_size, *train)
        state, m = train_epoch(state, xs[steps], ys[steps])
        return state, {"train/grad_norm": float(m["grad_norm"]), "train/param_norm": float(m["param_norm"])}

    return run_epochs(config, state, start_epoch, on_epoch, step, evaluation, progress=progress,
                      epoch_steps=lambda epoch: full_batches(len(train[0]), config.batch_size))
