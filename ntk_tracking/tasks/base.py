"""The task interface: what every paper model provides to training, the analyzer, sweeps and the CLI.

A task owns its configuration (a frozen dataclass), data loading, model, train loop, default
CV cadence and its NTK probe: which networks are measured and on which probe sets. Training
(`train/tracked.py`), the analyzer, sweeps, reports and the command lines see only this
interface, so a new paper model is one module under `tasks/` (and one under `models/` for a new
architecture) plus an MLproject entry.

The model is built once per command: `build_model(config, data)` calls the task's architecture
module's `make(config, data_info)` (`ntk_tracking/models/<arch>.py`), and training (`init_state`,
`fit`), the analyzer (`abstract_variables`, `probe`, `checkpoint_artifacts`) receive that one
object as `model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Iterable

from ntk_tracking.keys import PRIMARY_NETWORK, metric_key  # noqa: F401 (the task interface exports them)
from ntk_tracking.keys import TEST_LOSS, TRAIN_LOSS


def option(default, help: str, cli: bool = True):
    """A config field with its --help text; `cli=False` keeps it off the command line."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Fields every task has; tasks subclass it with their own (all with defaults)."""

    task: str = option("", "the task's name", cli=False)
    dataset: str = option("", "dataset name or local path")
    epochs: int = option(10, "training epochs (passes over the training set)")
    seed: int = option(0, "initialization and data order")
    train_size: int | None = option(None, "training points; 0 = all")
    test_size: int | None = option(None, "test points; 0 = all")
    cv_every: int = option(1, "checkpoint model variables for the NTK every k epochs (epoch 0 and the last always)")
    cv_log_points: int = option(0, "extra log-spaced checkpoint epochs between 1 and the last (dense early sampling)")
    cv_steps: str = option("none", "extra CV checkpoints at these global optimizer steps, comma-separated "
                           "(e.g. 1,2,4,8,16); none = epochs only. Any step checkpoint logs every metric at "
                           "step = optimizer step")
    cv_log_steps: int = option(0, "N extra CV checkpoints log-spaced over the optimizer steps inside the first "
                               "epoch (1 … steps per epoch − 1, rounded, repeats dropped)")
    init_scale: float = option(1.0, "multiplies every weight matrix/kernel (dense, convolution, attention) and "
                               "embedding table of the freshly initialized network, i.e. the `params` leaves named "
                               "kernel or embedding, before the optimizer state is made; biases, normalization "
                               "parameters, BatchNorm statistics and any other parameter (the tagger's position "
                               "table) are unchanged. Fresh runs only: a resumed run keeps its trained parameters. "
                               "1 = the initializers' own scale")

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message) pairs; subclasses extend the list with their own fields."""
        return [
            (self.epochs >= 0, f"epochs must be ≥ 0, got {self.epochs}"),
            (self.cv_every > 0, f"cv_every (the CV cadence in epochs) must be ≥ 1, got {self.cv_every}"),
            (self.cv_log_points >= 0, f"cv_log_points must be ≥ 0, got {self.cv_log_points}"),
            (self.cv_log_steps >= 0, f"cv_log_steps must be ≥ 0, got {self.cv_log_steps}"),
            (isinstance(self.init_scale, (int, float)) and math.isfinite(self.init_scale) and self.init_scale > 0,
             f"init_scale must be a finite number > 0 (the factor on the initial weights; 1 = the initializers' "
             f"own scale), got {self.init_scale!r}: pass e.g. --init-scale 0.5"),
            (self.train_size is None or self.train_size > 0,
             f"train_size must be positive (or unset for all), got {self.train_size}"),
            (self.test_size is None or self.test_size > 0,
             f"test_size must be positive (or unset for all), got {self.test_size}"),
        ]

    def validate(self):
        """Raise ValueError naming the first bad field and how to fix it."""
        parse_steps(self.cv_steps)
        for ok, message in self.checks():
            if not ok:
                raise ValueError(message)
        return self

    @property
    def step_checkpoints(self) -> bool:
        """Whether CV checkpoints are taken at optimizer steps (then every metric has step = optimizer step)."""
        return bool(parse_steps(self.cv_steps)) or self.cv_log_steps > 0

    def cv_optimizer_steps(self, steps_per_epoch: int) -> list[int]:
        """The global optimizer steps of step checkpoints: --cv-steps, plus --cv-log-steps N
        log-spaced steps inside the first epoch: round(10**x) for N values of x evenly spaced
        from 0 to log10(steps_per_epoch − 1), repeats dropped (so fewer than N in a short epoch)."""
        steps = set(parse_steps(self.cv_steps))
        if self.cv_log_steps and steps_per_epoch > 1:
            exponents = _linspace(0, math.log10(steps_per_epoch - 1), self.cv_log_steps)
            steps |= {round(10**e) for e in exponents}
        return sorted(steps)

    def cv_epochs(self) -> list[int]:
        """The epochs whose model variables are checkpointed for the NTK analysis."""
        epochs = {0, self.epochs} | set(range(0, self.epochs + 1, self.cv_every))
        if self.cv_log_points and self.epochs > 1:
            exponents = _linspace(0, math.log10(self.epochs), self.cv_log_points)
            epochs |= {round(10**e) for e in exponents}
        return sorted(e for e in epochs if 0 <= e <= self.epochs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        """A saved config.json; fields added since it was written take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has fields this version does not know: {sorted(unknown)}")
        return cls(**d)


def parse_steps(text: str) -> list[int]:
    """`1,2,4` (any order, repeats allowed) -> [1, 2, 4]; `none` or empty -> []; ValueError otherwise."""
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        return []
    steps = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"cv_steps must be positive integers (global optimizer steps) separated by commas, "
                             f"e.g. --cv-steps 1,2,4,8; got {part!r} in {text!r}")
        steps.append(int(part))
    return sorted(set(steps))


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]


def field_type(config_class, name: str) -> tuple[type, bool]:
    """(scalar type, optional) of a config field: `int | None` gives (int, True)."""
    hint = typing.get_type_hints(config_class)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def yes_no(text: str) -> bool:
    """A boolean option's value: yes/no, true/false, 1/0, on/off (ValueError otherwise)."""
    if str(text).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def cli_fields(config_class) -> list[dataclasses.Field]:
    """The config fields that are command-line options and MLproject parameters."""
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True)]


@dataclasses.dataclass(frozen=True)
class Option:
    """A config field as a training option (of `ntk-tracking train TASK` and of a sweep): its
    scalar type, its default as the command line takes it (0 for an unset optional field), its help."""

    name: str
    kind: type
    optional: bool
    default: Any
    help: str | None

    @property
    def flags(self) -> list[str]:
        """--field-name and --field_name (one of them for a one-word field)."""
        return list(dict.fromkeys([f"--{self.name.replace('_', '-')}", f"--{self.name}"]))

    @property
    def convert(self) -> Callable[[str], Any]:
        """Text to value: the field's type; yes/no (true/false, 1/0, on/off) for a boolean."""
        if self.kind is bool:
            return yes_no
        return self.kind

    def value(self, value):
        """`value` as the field holds it: None for 0 of an optional field, a float field's int as a float."""
        if self.optional and value == 0:
            return None
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """Points the NTK is measured on: a pytree whose leaves lead with the point axis, and an
    optional output mask (the output shape or a leading part of it) that zeroes padding."""

    inputs: Any
    output_mask: Any = None


@dataclasses.dataclass(frozen=True)
class Probe:
    """Which networks are measured, `{name: apply_fn(variables, inputs)}`, on which sets.

    `apply_fn` receives a CV checkpoint's variables as saved by `Task.cv_variables` and must
    differentiate only trainable parameters (non-parameter state held fixed).
    """

    networks: dict[str, Callable]
    sets: dict[str, ProbeSet]


@dataclasses.dataclass
class ProbeContext:
    """What a probe may use besides config and data: the run's checkpoints and artifacts."""

    run_id: str
    cv_epochs: list[int]
    restore: Callable[[int], Any]  # epoch -> the CV checkpoint's variables
    load_arrays: Callable[[str], dict | None]  # artifact path -> arrays of an .npz, or None
    save_arrays: Callable[[str, dict], None]  # artifact path, arrays -> an .npz artifact
    metric_history: Callable[[str], list[tuple[int, float]]]  # key -> [(step, value)]


@dataclasses.dataclass(frozen=True)
class LearningCheck:
    """How the tests prove that a task learns (tests/tasks/test_learning.py runs this for every task
    in the registry): `options`, a tiny configuration, is trained through the tracked loop, then
    each metric in `falls` must end below that fraction of where it started, each in `rises` must end
    above where it started by that margin, and each in `above` must end above that value. Where it
    started and ended: the mean of the first and of the last `window` values the run logged.
    `dataset_fixture`: where no data for it ships offline, the test fixture that writes the task's
    dataset in its real format; its path becomes the `dataset` option."""

    options: dict
    falls: dict = dataclasses.field(default_factory=dict)
    rises: dict = dataclasses.field(default_factory=dict)
    above: dict = dataclasses.field(default_factory=dict)
    window: int = 1
    dataset_fixture: str | None = None


class Task:
    """One paper model. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    config_class: type[TaskConfig] = TaskConfig
    defaults: dict = {}  # overrides of config_class's defaults for this task
    summary: str = ""  # one line for --help
    step_name: str = "epoch"  # what one training step of the metrics is (RL: update)
    loss_metrics: tuple[str, ...] = (TRAIN_LOSS, TEST_LOSS)  # drawn in the evolution figure
    loss_label: str = ""  # the loss axis's label in figures; empty: the metric names
    # The network's module under ntk_tracking/models/ (or any module with `make(config, data_info)`).
    architecture: types.ModuleType | None = None
    # A tiny configuration that must visibly learn; every task declares one (tests/tasks/test_learning.py).
    learning_check: LearningCheck | None = None

    # -- configuration ----------------------------------------------------------------------

    def default_config(self) -> TaskConfig:
        return self.config_class(task=self.name, **self.defaults)

    def config(self, **overrides) -> TaskConfig:
        """The task's default configuration with `overrides` (None values keep the default)."""
        values = dataclasses.asdict(self.default_config())
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["task"] = self.name
        return self.config_class(**values)

    def config_from_dict(self, saved: dict) -> TaskConfig:
        return self.config_class.from_dict(saved)

    def options(self) -> dict[str, Option]:
        """The training options by field name: the config's command-line fields, defaulted from this task."""
        d = self.default_config()
        options = {}
        for field in cli_fields(self.config_class):
            kind, optional = field_type(self.config_class, field.name)
            default = getattr(d, field.name)
            options[field.name] = Option(field.name, kind, optional, 0 if optional and default is None else default,
                                         field.metadata.get("help"))
        return options

    def config_from_options(self, values: dict) -> TaskConfig:
        """The validated config of option values {field: value} (what `ntk-tracking train` and a sweep's
        grid point give): 0 of an optional field means unset (None) even where the default is a number."""
        options = self.options()
        values = {k: options[k].value(v) if k in options else v for k, v in values.items()}
        config = self.config(**values)
        config = dataclasses.replace(config, **{k: None for k, v in values.items() if v is None})
        return config.validate()

    def run_name(self, config) -> str:
        return config.task

    # -- training ---------------------------------------------------------------------------

    def load_data(self, config) -> Any:
        """The data (ValueError with a fix for bad input: before any run or file is created)."""
        raise NotImplementedError

    def data_info(self, data) -> dict:
        """JSON provenance of the data, saved as the run's data.json."""
        return dict(getattr(data, "info", {}) or {})

    def model_data_info(self, data) -> dict:
        """What the data fixes about the network, the `data_info` of the architecture's make: a
        plain dict of sizes such as {"num_outputs": 10} (empty by default)."""
        return {}

    def build_model(self, config, data) -> Any:
        """The task's network: `architecture.make(config, model_data_info(data))`, a flax module or
        what the architecture needs (the actor-critic pair). Called once per command; every method
        taking `model` receives this object. Override it to build a model without an architecture module."""
        if self.architecture is None:
            raise NotImplementedError(f"task {self.name!r} names no architecture module (the class attribute "
                                      "`architecture`, a module with make(config, data_info)) and does not "
                                      "override build_model")
        return self.architecture.make(config, self.model_data_info(data))

    def init_state(self, config, data, model) -> Any:
        """The initial training state of `model` (a pytree: everything a resumed run needs)."""
        raise NotImplementedError

    def fit(self, config, data, model, state, start_epoch: int,
            on_epoch: Callable[[int, Any, dict], None], progress: bool = True) -> Any:
        """Train `model` from `start_epoch` to config.epochs, calling on_epoch(epoch, state, metrics)
        after epoch 0 (when start_epoch is 0) and after every epoch."""
        raise NotImplementedError

    def steps_per_epoch(self, config, data) -> int | None:
        """Optimizer steps in one epoch (the first epoch's where the count varies); None when the
        trainer cannot stop inside an epoch (then step checkpoints are refused)."""
        return None

    def step_unit(self, config) -> str:
        """What a logged step counts: `optimizer step` for a run with step checkpoints, else step_name."""
        return "optimizer step" if config.step_checkpoints and self.step_name == "epoch" else self.step_name

    def check_cadence(self, config, data) -> None:
        """ValueError naming step checkpoints this run cannot take (checked before any run exists)."""
        if not config.step_checkpoints:
            return
        n = self.steps_per_epoch(config, data)
        if n is None:
            raise ValueError(f"{self.name} cannot checkpoint inside an epoch (its trainer runs whole epochs): "
                             "drop --cv-steps and --cv-log-steps, or use --cv-every and --cv-log-points")
        unit = self.step_name if self.step_name != "epoch" else "optimizer step"
        if config.cv_log_steps and n < 2:
            raise ValueError(f"--cv-log-steps places checkpoints inside the first epoch, but a {self.name} epoch "
                             f"is {n} {unit}: use --cv-steps (or --cv-log-points) instead")
        total = n * config.epochs
        beyond = [s for s in config.cv_optimizer_steps(n) if s > total]
        if beyond:
            raise ValueError(f"--cv-steps {','.join(map(str, beyond))}: beyond the run's last {unit}, {total} "
                             f"({config.epochs} epoch{'s' if config.epochs != 1 else ''} × {n}); drop them "
                             "or train more epochs")

    def cv_variables(self, state) -> Any:
        """What a CV checkpoint holds: the model variables (parameters and fixed state)."""
        raise NotImplementedError

    def abstract_variables(self, config, data, model) -> Any:
        """Shapes and dtypes of cv_variables, to restore checkpoints into."""
        import jax

        return jax.eval_shape(lambda: self.cv_variables(self.init_state(config, data, model)))

    # -- analysis ---------------------------------------------------------------------------

    def probe(self, config, data, model, context: ProbeContext | None = None) -> Probe:
        """The networks of `model` the analyzer measures and the sets it measures them on."""
        raise NotImplementedError

    def default_probe_sets(self) -> tuple[str, ...]:
        return ("train", "test")

    def network_names(self, config) -> tuple[str, ...]:
        """The names of the probe's networks, known without loading data."""
        return (PRIMARY_NETWORK,)

    def evolution_figure(self, config, history: Callable[[str], list], networks, probe_sets, title: str = ""):
        """The run's evolution figure; `history(key)` gives a metric's (step, value) points."""
        from ntk_tracking.figures import evolution_figure

        keys = [metric_key(n, v, s) for n in networks for v in ("entropy", "trace", "entropy_std", "trace_std")
                for s in probe_sets]
        histories = {k: history(k) for k in keys + list(self.loss_metrics)}
        unit = self.step_unit(config)
        return evolution_figure(histories, probe_sets, title=title, networks=networks,
                                loss_keys=self.loss_metrics, xlabel=unit, log_x=unit == "optimizer step",
                                loss_label=self.loss_label)

    def checkpoint_artifacts(self, config, data, model, variables, epoch: int) -> Iterable[tuple[str, Any]]:
        """(artifact path, matplotlib figure) pairs the analyzer logs per checkpoint (VAE pictures)."""
        return ()
