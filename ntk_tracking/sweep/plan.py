"""Planning a sweep: every check before any run is created, and finding its child runs."""

from __future__ import annotations

import dataclasses
import os

import mlflow
from mlflow.entities import ViewType

from ntk_tracking import tracking
from ntk_tracking.keys import KEY_TAG, KIND_TAG, PARENT_TAG
from ntk_tracking.sweep.spec import SPEC_ARTIFACT, SweepSpec


@dataclasses.dataclass
class SweepPlan:
    spec: SweepSpec
    points: dict[str, dict]  # key -> grid point, in grid order
    parent_run_id: str | None  # None: a new parent run is created
    experiment_id: str | None  # None: the experiment `experiment` is created with the parent
    experiment: str | None
    client: mlflow.MlflowClient
    configs: dict[str, object] = dataclasses.field(default_factory=dict)  # key -> the task config its child trains


def plan_sweep(spec: SweepSpec, parent_run_id: str | None = None, experiment: str | None = None,
               mlflow_client=None) -> SweepPlan:
    """Validate every grid point, the data and the parent run; ValueError (RunError) if anything is off."""
    task = spec.definition
    points = {spec.key(p): p for p in spec.points()}
    configs = {key: spec.config(p) for key, p in points.items()}
    first = next(iter(configs.values()))
    try:  # one load catches bad paths and sizes (a grid over data options is checked at training)
        data = task.load_data(first)
    except ValueError as err:
        raise ValueError(f"dataset {getattr(first, 'dataset', '') or spec.task!r}: {err}") from None
    same_data = ("dataset", "train_size", "test_size", "batch_size")
    for key, config in configs.items():  # step checkpoints each run can take, on the data just loaded
        if all(getattr(config, f, None) == getattr(first, f, None) for f in same_data):
            try:
                task.check_cadence(config, data)
            except ValueError as err:
                raise ValueError(f"grid point {key}: {err}") from None
    client = mlflow_client or tracking.client()
    launched = os.environ.get("MLFLOW_RUN_ID")
    if parent_run_id and launched and parent_run_id != launched:
        raise ValueError(f"--parent-run-id {parent_run_id} differs from MLFLOW_RUN_ID {launched}; give one")
    parent_run_id = parent_run_id or launched or None
    if parent_run_id is None:
        if not experiment:
            # What start_run would use: MLFLOW_EXPERIMENT_ID/NAME, set_experiment, else Default.
            experiment_id = mlflow.tracking.fluent._get_experiment_id()
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else None
        return SweepPlan(spec, points, None, experiment_id, experiment, client, configs)
    parent = tracking.get_run(parent_run_id, client)
    kind = parent.data.tags.get(KIND_TAG)
    if kind not in (None, "sweep") or PARENT_TAG in parent.data.tags:
        raise tracking.RunError(f"run {parent_run_id} is a {kind or 'child'} run, not a sweep's parent run")
    saved = tracking.load_json_artifact(parent_run_id, SPEC_ARTIFACT)
    if saved is not None and saved != spec.to_dict():
        was, now = _flat(saved), _flat(spec.to_dict())
        changed = "; ".join(f"{k}: run has {was.get(k)!r}, now {now.get(k)!r}"
                            for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
        raise tracking.RunError(f"sweep {parent_run_id} was launched with other options ({changed}); "
                                "relaunch it with the original options, or start a new sweep")
    if experiment and client.get_experiment(parent.info.experiment_id).name != experiment:
        raise ValueError(f"sweep {parent_run_id} is not in experiment {experiment!r}")
    return SweepPlan(spec, points, parent_run_id, parent.info.experiment_id, experiment, client, configs)


def _flat(spec: dict) -> dict:
    """sweep.json as {"task": …, "grid.width": […], "fixed.epochs": …} for naming differences."""
    flat = {"task": spec.get("task")}
    for part in ("grid", "fixed"):
        flat.update({f"{part}.{k}": v for k, v in spec.get(part, {}).items()})
    return flat



def find_children(client, parent_run_id: str, experiment_id: str | None = None) -> dict[str, object]:
    """The sweep's child runs by key (a FINISHED duplicate wins, then the newest)."""
    experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    runs.sort(key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0))
    return {r.data.tags[KEY_TAG]: r for r in runs if KEY_TAG in r.data.tags}


def is_sweep_run(run_id: str, mlflow_client=None) -> bool:
    """Whether `run_id` is a sweep's parent run (what `ntk-tracking analyze` routes on)."""
    run = tracking.get_run(run_id, mlflow_client)
    return run.data.tags.get(KIND_TAG) == "sweep"
