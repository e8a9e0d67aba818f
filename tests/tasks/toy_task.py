"""A paper model defined outside the package, as a researcher would add one (tests only).

Found through NTK_TRACKING_TASK_MODULES=toy_task: a tanh network with one hidden layer fitted to
sin(x) on synthetic points, trained with the product's epoch loop.
"""

from __future__ import annotations

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from ntk_tracking.models import scale_initial_params
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option
from ntk_tracking.train.loop import run_epochs, shuffled_batches, train_and_test


@dataclasses.dataclass(frozen=True)
class ToyConfig(TaskConfig):
    hidden: int = option(8, "hidden tanh units")
    learning_rate: float = option(0.05, "SGD step size")
    batch_size: int = option(16, "points per step")

    def checks(self):
        return [(self.hidden > 0, f"hidden must be ≥ 1, got {self.hidden}")] + super().checks()


class Net(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(self.hidden)(x)))


def mse(params, apply_fn, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


class ToyTask(Task):
    name = "toy_sine"
    config_class = ToyConfig
    summary = "a one-hidden-layer tanh network fitted to sin(x) (a test's toy model)"
    defaults = dict(epochs=3, train_size=64, test_size=32)
    learning_check = LearningCheck(dict(epochs=20, cv_every=20), falls={"train/loss": 0.5, "test/loss": 0.5})

    def load_data(self, config):
        n_train, n_test = config.train_size or 64, config.test_size or 32
        x = np.random.default_rng(1234).uniform(-3, 3, (n_train + n_test, 1)).astype(np.float32)
        y = np.sin(x)
        return types.SimpleNamespace(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:],
                                     y_test=y[n_train:], info={"train_size": n_train, "test_size": n_test})

    def build_model(self, config, data):
        # A task outside the package may build its network here; a package task names its
        # ntk_tracking/models/<arch>.py as `architecture` instead.
        return Net(config.hidden)

    def init_state(self, config, data, model):
        params = model.init(jax.random.PRNGKey(config.seed), data.x_train[:1])["params"]
        params = scale_initial_params(params, config.init_scale)  # --init-scale, which every task has
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(config.learning_rate))

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        @jax.jit
        def train_epoch(state, xs, ys):
            def step(state, batch):
                loss, grads = jax.value_and_grad(mse)(state.params, state.apply_fn, *batch)
                return state.apply_gradients(grads=grads), loss
            state, losses = jax.lax.scan(step, state, (xs, ys))
            return state, jnp.mean(losses)

        def evaluate(state, x, y):
            return {"loss": float(mse(state.params, state.apply_fn, x, y))}

        def step(state, epoch):
            state, loss = train_epoch(state, *shuffled_batches(config.seed, epoch, config.batch_size,
                                                              data.x_train, data.y_train))
            return state, {"train/step_loss": float(loss)}

        return run_epochs(config, state, start_epoch, on_epoch, step,
                          lambda state, epoch: train_and_test(evaluate, state, (data.x_train, data.y_train),
                                                              (data.x_test, data.y_test)), progress=progress)

    def cv_variables(self, state):
        return {"params": state.params}

    def probe(self, config, data, model, context=None):
        return Probe(networks={"model": lambda variables, x: model.apply(variables, x)},
                     sets={"train": ProbeSet(data.x_train), "test": ProbeSet(data.x_test)})


TASKS = {"toy_sine": ToyTask()}
