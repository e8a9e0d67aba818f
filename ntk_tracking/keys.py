"""Every MLflow tag name and NTK metric key the product writes, and the training metric keys more
than one module reads or writes, defined once."""

from __future__ import annotations

PRIMARY_NETWORK = "model"  # its metrics keep the short names `ntk/<variable>/<set>`

KIND_TAG = "ntk_tracking.kind"  # training | sweep
TASK_TAG = "ntk_tracking.task"
KEY_TAG = "ntk_tracking.sweep_key"  # a sweep child's grid point
PARENT_TAG = "mlflow.parentRunId"
FAILED_TAG = "ntk_tracking.sweep_failed"
DIVERGED_TAG = "ntk_tracking.diverged"
REGIME_TAG = "ntk_tracking.regime"
REGIME_SPLIT_TAG = "ntk_tracking.regime_split"
ANALYZED_RUN_TAG = "ntk_tracking.analyzed_run"  # on an `mlflow run . -e analyze` launch's own run
ANALYZED_BY_TAG = "ntk_tracking.analyzed_by"  # on the analyzed run: that launch
REPORTED_RUN_TAG = "ntk_tracking.reported_run"
DESCRIPTION_TAG = "mlflow.note.content"  # the description the MLflow UI shows
# What a run's metric steps and checkpoint names count: `epoch`, `PPO update`, or `optimizer step`
# (runs with CV checkpoints at optimizer steps); runs made before the tag existed count epochs.
STEP_UNIT_TAG = "ntk_tracking.step_unit"
STEPS_PER_EPOCH_TAG = "ntk_tracking.steps_per_epoch"  # optimizer steps of the first epoch (step-unit runs)
EPOCH_METRIC = "epoch"  # logged at every step: (fractional) epochs, a common x-axis for every run

NTK_PREFIX = "ntk/"  # every NTK metric key starts with it (metric_key)
TRAIN_LOSS = "train/loss"  # the loss on the training split after each epoch; divergence is judged on it
TEST_LOSS = "test/loss"
TEST_ACCURACY = "test/accuracy"
# The RL task's: returns of the training episodes ended in an update, of the evaluation episodes
# (at CV checkpoints), and the training episodes ended so far (the paper's x axis).
TRAIN_EPISODE_RETURN = "train/episode_return"
EVAL_EPISODE_RETURN = "eval/episode_return"
TRAIN_EPISODES = "train/episodes"


def metric_key(network: str, name: str, probe_set: str) -> str:
    """`ntk/<variable>/<set>` for the primary network, `ntk/<network>/<variable>/<set>` otherwise."""
    if network == PRIMARY_NETWORK:
        return f"ntk/{name}/{probe_set}"
    return f"ntk/{network}/{name}/{probe_set}"


def split_key(split: str, name: str) -> str:
    """`<split>/<name>`: a training metric on a data split, e.g. `train/loss`, `test/accuracy`."""
    return f"{split}/{name}"


def regime_key(name: str, split: str) -> str:
    """`regime/<name>/<split>`: a number of the entropy regime a report found on `split`."""
    return f"regime/{name}/{split}"
