"""Training configurations: one frozen dataclass, per-task defaults, validation, CV cadence."""

from __future__ import annotations

import dataclasses
import json
import math

from ntk_tracking.models import ACTIVATIONS, INITIALIZERS, MODELS

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")

# Task → what it trains on and how. The paper's test problems (Table 1, §3.1).
TASKS = {
    "mnist_dense": dict(model="mlp", dataset="mnist5k", objective="classification",
                        width=128, depth=2, epochs=20, batch_size=64, learning_rate=1e-3),
    "mnist_cnn": dict(model="cnn", dataset="mnist5k", objective="classification",
                      width=16, depth=2, epochs=10, batch_size=64, learning_rate=1e-3),
    "fuel_efficiency": dict(model="mlp", dataset="autompg", objective="regression",
                            width=64, depth=2, epochs=100, batch_size=32, learning_rate=1e-3,
                            cv_every=5),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything needed to rebuild a run's model and data (saved as the run's config.json)."""

    task: str
    model: str
    dataset: str
    objective: str
    # Architecture.
    width: int = 128
    depth: int = 2
    activation: str = "relu"
    init: str = "lecun_normal"
    # Optimizer.
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 64
    epochs: int = 20
    seed: int = 0
    # Data.
    train_size: int | None = None
    test_size: int | None = None
    # Collective-variable checkpoints: every `cv_every` epochs, plus `cv_log_points`
    # log-spaced early epochs; epoch 0 (initialization) and the last epoch always.
    cv_every: int = 1
    cv_log_points: int = 0

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field and how to fix it."""
        checks = [
            (self.task in TASKS, f"unknown task {self.task!r}; choose one of {sorted(TASKS)}"),
            (self.model in MODELS, f"unknown model {self.model!r}; choose one of {sorted(MODELS)}"),
            (self.width > 0, f"width must be a positive integer, got {self.width}"),
            (self.depth >= 0, f"depth must be ≥ 0 hidden layers, got {self.depth}"),
            (self.activation in ACTIVATIONS,
             f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"),
            (self.init in INITIALIZERS,
             f"unknown init {self.init!r}; choose one of {sorted(INITIALIZERS)}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.epochs >= 0, f"epochs must be ≥ 0, got {self.epochs}"),
            (self.cv_every > 0, f"cv_every (the CV cadence in epochs) must be ≥ 1, got {self.cv_every}"),
            (self.cv_log_points >= 0, f"cv_log_points must be ≥ 0, got {self.cv_log_points}"),
            (self.train_size is None or self.train_size > 0,
             f"train_size must be positive (or unset for all), got {self.train_size}"),
            (self.test_size is None or self.test_size > 0,
             f"test_size must be positive (or unset for all), got {self.test_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def cv_epochs(self) -> list[int]:
        """The epochs whose model variables are checkpointed for the NTK analysis."""
        epochs = {0, self.epochs} | set(range(0, self.epochs + 1, self.cv_every))
        if self.cv_log_points and self.epochs > 1:
            log_spaced = {round(10**e) for e in _linspace(0, math.log10(self.epochs), self.cv_log_points)}
            epochs |= log_spaced
        return sorted(e for e in epochs if 0 <= e <= self.epochs)

    def model_hyperparameters(self, num_outputs: int) -> dict:
        """Keyword arguments of models.create_model."""
        return dict(width=self.width, depth=self.depth, num_outputs=num_outputs,
                    activation=self.activation, initializer=self.init)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has fields this version does not know: {sorted(unknown)}")
        return cls(**d)


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]


def task_config(task: str, **overrides) -> TrainConfig:
    """The task's default configuration with `overrides` (None values keep the default)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    values = dict(TASKS[task], task=task)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
