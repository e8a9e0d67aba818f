"""Sweep reports from MLflow data alone: regimes, evolution grids, scaling maps, CSV tables.

    ntk-tracking report PARENT_RUN_ID [--split train]   (the command: ntk_tracking/cli/report.py)
    mlflow run . -e report --env-manager local -P run_id=PARENT_RUN_ID

Reads the sweep parent (tag ntk_tracking.kind=sweep, artifact sweep.json) and its training
children (tag mlflow.parentRunId), never a checkpoint. Writes to each analyzed child its
regime (regimes.py) as metrics `regime/entropy_{recovery,drop,rise}/<split>` (step = last NTK
epoch) and tag `ntk_tracking.regime`; writes to the parent, under report/:

    evolution.png           paper Figs. 1, 4, 5: a row per varied property, the others held at
                            a reference value (numbers: the lower middle of the sorted values;
                            names: the first listed in sweep.json), every seed drawn
    scaling_<act>.png       paper Fig. 2: entropy, trace, loss over width × depth at epoch 0
                            and at the last epoch, mean over seeds, cells marked with the regime
                            (scaling_<act>_<init>_<lr>.png where init, learning rate vary)
    history.csv             every logged point (run, metric, step, timestamp, value)
    runs.csv                per child: grid values, regime and its numbers, each metric at
                            epoch 0 and at its last step, and the figures it appears in
    summary.json            settings, references, regime counts, skipped runs

Children without NTK metrics: an error if none has any; otherwise skipped with a warning
(kept in the tables, absent from figures), so a sweep can be reported while analysis runs.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import tempfile
import warnings

import numpy as np
from tqdm.auto import tqdm

from ntk_tracking import figures, regimes, tracking
from ntk_tracking.keys import (EPOCH_METRIC, KIND_TAG, NTK_PREFIX, PRIMARY_NETWORK, REGIME_SPLIT_TAG, REGIME_TAG,
                               STEP_UNIT_TAG, TRAIN_LOSS, metric_key, regime_key, split_key)
from ntk_tracking.tasks import task_names, get_task

SWEEP_ARTIFACT = "sweep.json"
# The architecture scan's axes but the seed; evolution rows in the paper's order. Other sweeps'
# properties are their grid's fields (sweep.json), in the order given.
PROPERTIES = ("activation", "width", "depth", "init", "learning_rate")
TUPLE_ORDER = ("width", "depth", "activation", "init", "learning_rate")  # the paper's (W, D, A) titles
HISTORY_PREFIXES = ("train/", "test/", NTK_PREFIX)
SPLITS = ("train", "test")


@dataclasses.dataclass
class Child:
    """One training run of the sweep, as read from MLflow."""

    run_id: str
    name: str
    status: str
    grid: dict[str, str]  # the swept properties and seed, as MLflow stores params (strings)
    points: dict[str, list]  # metric key → Metric entities, sorted by (step, timestamp)
    num_subsets: int | None
    regime: regimes.Regime | None = None
    figures: list[str] = dataclasses.field(default_factory=list)
    epochs: dict[int, float] | None = None  # step -> epoch of a run counted in optimizer steps

    def series(self, key: str) -> list[tuple[float, float]]:
        """(epoch, value), the latest value where a step was logged twice; a run counted in
        optimizer steps gives its (fractional) epochs, so every child shares the epoch axis."""
        points = {m.step: m.value for m in self.points.get(key, [])}
        if self.epochs:
            points = {self.epochs.get(step, math.nan): value for step, value in points.items()}
        return sorted(points.items())

    def last_step(self, key: str) -> int:
        return max(m.step for m in self.points[key])

    def analyzed(self, split: str) -> bool:
        return bool(self.points.get(metric_key(PRIMARY_NETWORK, "entropy", split)))


@dataclasses.dataclass
class SweepReport:
    """What `report` did: each analyzed child's regime, the skipped children, the artifacts."""

    parent_run_id: str
    split: str
    regimes: dict[str, regimes.Regime]
    skipped: list[str]
    artifacts: list[str]


def properties(sweep: dict) -> tuple[str, ...]:
    """The swept properties but the seed: the architecture scan's five in the paper's order (a
    task with width, depth and activation options sweeping no other), else sweep.json's."""
    fields = [f for f in sweep.get("grid", {}) if f != "seed"]
    task = sweep.get("task")
    scans = task in task_names() and all(hasattr(get_task(task).default_config(), p)
                                         for p in ("width", "depth", "activation"))
    if set(fields) <= set(PROPERTIES) and (scans or task is None):
        return PROPERTIES
    return tuple(fields)


def title_order(props) -> tuple[str, ...]:
    return TUPLE_ORDER if tuple(props) == PROPERTIES else tuple(props)


def _numeric(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values if v != "") and any(v != "" for v in values)
    except ValueError:
        return False


def _sort_key(numeric: bool, value: str):
    try:
        return (0, float(value), value) if numeric else (0, 0.0, value)
    except ValueError:
        return (1, 0.0, value)


def _search_children(client, parent) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return [r for r in runs if r.data.tags.get(KIND_TAG) == "training"]


def load_sweep(client, parent_run_id: str) -> tuple[dict, list]:
    """sweep.json and the training child runs; ValueError if the run is no sweep parent."""
    parent = tracking.get_run(parent_run_id, client)
    kind = parent.data.tags.get(KIND_TAG)
    if kind != "sweep":
        raise tracking.RunError(
            f"run {parent_run_id} is not a sweep parent (tag {KIND_TAG}={kind!r}, expected 'sweep'); "
            "pass the id of the parent run a sweep created"
        )
    sweep = tracking.load_json_artifact(parent_run_id, SWEEP_ARTIFACT)
    if sweep is None:
        raise tracking.RunError(f"sweep run {parent_run_id} has no {SWEEP_ARTIFACT} artifact describing its grid")
    children = _search_children(client, parent)
    if not children:
        raise tracking.RunError(f"sweep run {parent_run_id} has no training child runs (tag mlflow.parentRunId)")
    return sweep, children


def read_child(client, run, props=PROPERTIES) -> Child:
    """Params, every train/test/ntk metric history and K of one child run."""
    run_id = run.info.run_id
    points = {}
    for key in sorted(run.data.metrics):
        if key.startswith(HISTORY_PREFIXES):
            points[key] = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    settings = tracking.load_json_artifact(run_id, "analysis/settings.json") if any(
        k.startswith(NTK_PREFIX) for k in points) else None
    params = run.data.params
    epochs = None
    if run.data.tags.get(STEP_UNIT_TAG) == "optimizer step":
        epochs = {m.step: m.value for m in client.get_metric_history(run_id, EPOCH_METRIC)}
    return Child(run_id=run_id, name=run.info.run_name or "", status=run.info.status,
                 grid={p: params.get(p, "") for p in (*props, "seed")}, points=points,
                 num_subsets=None if settings is None else int(settings["num_subsets"]), epochs=epochs)


def classify_child(child: Child, split: str, threshold: float) -> regimes.Regime:
    """The regime of the child's entropy on `split`, noise from the logged std over K subsets."""
    stds = dict(child.series(metric_key(PRIMARY_NETWORK, "entropy_std", split)))
    stderr = regimes.standard_errors(stds, child.num_subsets or 1)
    entropy = child.series(metric_key(PRIMARY_NETWORK, "entropy", split))
    return regimes.classify_entropy(entropy, stderr, threshold=threshold)


def log_regime(client, child: Child, split: str) -> None:
    """Regime numbers as child metrics at the last NTK epoch (not repeated on reruns), class as tag."""
    r = child.regime
    step = child.last_step(metric_key(PRIMARY_NETWORK, "entropy", split))
    values = {regime_key("entropy_recovery", split): r.recovery, regime_key("entropy_drop", split): r.drop,
              regime_key("entropy_rise", split): r.rise}

    def same(a, b):
        return a == b or (math.isnan(a) and math.isnan(b))

    new = {k: v for k, v in values.items()
           if not any(m.step == step and same(m.value, v) for m in client.get_metric_history(child.run_id, k))}
    if new:
        tracking.log_metrics(client, child.run_id, new, step)
    client.set_tag(child.run_id, REGIME_TAG, r.label)
    client.set_tag(child.run_id, REGIME_SPLIT_TAG, split)


# -- the grid -------------------------------------------------------------------------------

def grid_values(sweep: dict, children: list[Child]) -> dict[str, list[str]]:
    """Each property's values as strings (as MLflow params): numbers ascending, names in sweep.json's order."""
    grid = sweep.get("grid", {})
    out = {}
    for prop in (*properties(sweep), "seed"):
        values = [_param_text(v) for v in grid.get(prop, [])]
        values += sorted({c.grid[prop] for c in children} - set(values))
        values = list(dict.fromkeys(values))
        numeric = _numeric(values)
        out[prop] = sorted(values, key=lambda v: _sort_key(numeric, v)) if numeric else values
    return out


def _param_text(value) -> str:
    """A grid value as MLflow stores the child's param (str of the config value)."""
    return str(value)


def references(values: dict[str, list[str]]) -> dict[str, str]:
    """The value a property is held at while another varies: lower middle number, first name."""
    return {p: values[p][(len(values[p]) - 1) // 2] if _numeric(values[p]) else values[p][0]
            for p in values if p != "seed"}


def _loss_label(task: str | None) -> str:
    if task not in task_names():
        return "loss"
    objective = getattr(get_task(task).default_config(), "objective", None)
    return get_task(task).loss_label or {"classification": "loss (cross-entropy, nats)",
                                         "regression": "loss (mean squared error)"}.get(objective, "loss")


def row_title(prop: str | None, values: list[str], held: dict[str, str], seeds: int) -> str:
    """'latents = 4, 8 · width = 64 · mean ± std over 2 seeds': the varied property, the ones held, the seeds."""
    parts = ([f"{prop} = {', '.join(values)}"] if prop else []) + [f"{q} = {v}" for q, v in held.items()]
    parts += [f"mean ± std over {seeds} seeds"] if seeds > 1 else []
    return " · ".join(parts) or "all runs"


def evolution_rows(children: list[Child], values: dict, ref: dict) -> list[dict]:
    """One row per property with > 1 value (the others at `ref`); one row if nothing varies."""
    props = [p for p in values if p != "seed"]
    varied = [p for p in props if len(values[p]) > 1]
    shown = [p for p in title_order(props) if values[p] != [""]]  # properties the runs have at all
    rows = []
    for prop in varied or [None]:
        members = [c for c in children if all(c.grid[q] == ref[q] for q in varied if q != prop)]
        if not members:
            continue
        row_values = values[prop] if prop else ["all runs"]
        lines = [{"value": c.grid[prop] if prop else "all runs",
                  "histories": {k: c.series(k) for k in c.points}} for c in members]
        row_values = [v for v in row_values if any(line["value"] == v for line in lines)]
        seeds = len({c.grid["seed"] for c in members})
        title = row_title(prop, row_values, {q: ref[q] for q in shown if q != prop}, seeds)
        for c in members:
            c.figures.append("evolution")
        rows.append({"title": title, "property": prop, "values": row_values, "lines": lines})
    return rows


def _cell_value(points: list[tuple[int, float]], when: str) -> float:
    if not points:
        return math.nan
    if when == "initial":
        return dict(points).get(0, math.nan)
    return points[-1][1]


def scaling_figures(children: list[Child], values: dict, split: str, loss_label: str, threshold: float):
    """(name, figure) per activation (and init, learning rate where they vary): Fig. 2. Only for
    the architecture scan (width, depth and activation among the properties)."""
    if not {"width", "depth", "activation"} <= set(values):
        return []
    widths, depths = values["width"], values["depth"]  # ascending
    columns = [(f"NTK entropy S on {split} (nats)", False), (f"NTK trace Tr Θ on {split}", True),
               (f"{split} {loss_label}", True)]
    keys = [metric_key(PRIMARY_NETWORK, "entropy", split), metric_key(PRIMARY_NETWORK, "trace", split),
            split_key(split, "loss")]
    others = [p for p in ("init", "learning_rate") if len(values.get(p, [])) > 1]  # one map set per combination
    try:
        geometric = all(math.log2(float(w)).is_integer() for w in widths) and len(widths) > 1
    except ValueError:
        geometric = False
    xlabel = "width (units per hidden layer" + (", log₂ axis)" if geometric else ")")
    out = []
    for act in values["activation"]:
        for combo in itertools.product(*(values[p] for p in others)):
            fixed = dict(zip(others, combo), activation=act)
            group = [c for c in children if all(c.grid[p] == v for p, v in fixed.items())]
            if not group:
                continue
            name = "_".join(["scaling", act, *combo])
            grids = {when: [np.full((len(depths), len(widths)), np.nan) for _ in keys]
                     for when in ("initial", "final")}
            marks = [["" for _ in widths] for _ in depths]
            last_epochs = set()
            for d, depth in enumerate(depths):
                for w, width in enumerate(widths):
                    cell = [c for c in group if c.grid["width"] == width and c.grid["depth"] == depth]
                    for c in cell:
                        c.figures.append(name)
                        last_epochs.add(c.series(keys[0])[-1][0])
                    for when, arrays in grids.items():
                        for array, key in zip(arrays, keys):
                            vals = [_cell_value(c.series(key), when) for c in cell]
                            array[d, w] = np.mean(vals) if vals else np.nan
                    labels = {c.regime.label for c in cell}
                    marks[d][w] = "" if not labels else (regimes.MARKS[labels.pop()] if len(labels) == 1 else "mix")
            last = f"epoch {last_epochs.pop():g}" if len(last_epochs) == 1 else "last epoch"
            legend = " · ".join(f"{m} {label.replace('_', ' ')}" for label, m in regimes.MARKS.items())
            seeds = len(values["seed"])
            if seeds > 1:
                legend += " · mix: seeds disagree"
            fig = figures.scaling_map(
                widths, depths,
                [("a) initialization (epoch 0)", grids["initial"]), (f"b) after training ({last})", grids["final"])],
                columns, marks=marks, mark_row=1, xlabel=xlabel,
                title="width × depth scan · " + ", ".join(f"{p}={v}" for p, v in reversed(fixed.items()))
                + (f" · mean over {seeds} seeds" if seeds > 1 else ""),
                footnote=f"cell marks: entropy regime on {split} (recovery threshold {threshold:g}): {legend}",
            )
            out.append((name, fig))
    return out


def field_figures(children: list[Child], values: dict, ref: dict, split: str):
    """(name, figure) per numeric swept property with > 1 value: entropy and trace at epoch 0 and
    at the last epoch against it, the other properties at `ref`, mean ± std over seeds."""
    out = []
    for prop in (p for p in values if p != "seed" and len(values[p]) > 1 and _numeric(values[p])):
        members = [c for c in children if all(c.grid[q] == ref[q] for q in ref if q != prop)]
        xs = [float(v) for v in values[prop]]
        panels = {}
        for variable in ("entropy", "trace"):
            for when in ("initial", "final"):
                rows = []
                key = metric_key(PRIMARY_NETWORK, variable, split)
                for v in values[prop]:
                    vals = [_cell_value(c.series(key), when) for c in members if c.grid[prop] == v]
                    vals = [x for x in vals if math.isfinite(x)]
                    rows.append((np.mean(vals) if vals else math.nan, np.std(vals) if len(vals) > 1 else 0.0, len(vals)))
                panels[variable, when] = rows
        if not any(n for rows in panels.values() for _, _, n in rows):
            continue
        held = ", ".join(f"{q}={ref[q]}" for q in ref if q != prop and len(values[q]) > 1)
        seeds = len(values["seed"])
        title = f"NTK on {split} against {prop}" + (f" · {held}" if held else "") + (
            f" · mean ± std over {seeds} seeds" if seeds > 1 else "")
        for c in members:
            c.figures.append(f"against_{prop}")
        out.append((f"against_{prop}", figures.against_field(prop, xs, panels, title)))
    return out


# -- tables ---------------------------------------------------------------------------------

def grid_columns(children: list[Child]) -> tuple[str, ...]:
    """The CSVs' property columns: the swept properties (in title order) and seed."""
    props = [p for p in (children[0].grid if children else {}) if p != "seed"]
    return (*title_order(props), "seed")


def write_history(path: str, children: list[Child]) -> None:
    """Every logged point of every child: the data behind every figure."""
    columns = grid_columns(children)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(("run_id",) + columns + ("metric", "step", "timestamp", "value"))
        for c in children:
            for key, points in sorted(c.points.items()):
                for m in points:
                    out.writerow([c.run_id] + [c.grid[g] for g in columns] + [key, m.step, m.timestamp, repr(m.value)])


def write_runs(path: str, children: list[Child], split: str) -> None:
    """One row per child: grid values, regime, each metric at epoch 0 and at its last step."""
    keys = sorted({k for c in children for k in c.points})
    regime_fields = [f.name for f in dataclasses.fields(regimes.Regime) if f.name != "label"]
    columns = grid_columns(children)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["run_id", "run_name", "status", *columns, "analyzed", "num_subsets", "epochs",
                      "regime_split", "regime", "regime_mark", *(f"regime_{n}" for n in regime_fields),
                      *(f"{k}@{w}" for k in keys for w in ("epoch0", "last")), "last_ntk_epoch", "figures"])
        for c in children:
            r = c.regime
            loss = c.series(TRAIN_LOSS)
            ntk = c.series(metric_key(PRIMARY_NETWORK, "entropy", split))
            out.writerow([
                c.run_id, c.name, c.status, *(c.grid[g] for g in columns), c.analyzed(split),
                c.num_subsets or "", f"{loss[-1][0]:g}" if loss else "", split,
                r.label if r else "", r.mark if r else "",
                *((repr(getattr(r, n)) if not isinstance(getattr(r, n), str) else getattr(r, n)) if r else ""
                  for n in regime_fields),
                *(repr(_cell_value(c.series(k), w)) for k in keys for w in ("initial", "final")),
                f"{ntk[-1][0]:g}" if ntk else "", ";".join(dict.fromkeys(c.figures)),
            ])


# -- the report -----------------------------------------------------------------------------

def report(parent_run_id: str, split: str = "train", progress: bool = True,
           recovery_threshold: float = regimes.RECOVERY_THRESHOLD, mlflow_client=None) -> SweepReport:
    """Classify every child's regime and log figures and tables to the sweep's parent run."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not recovery_threshold >= 0:
        raise ValueError(f"recovery threshold must be ≥ 0, got {recovery_threshold}")
    client = mlflow_client or tracking.client()
    sweep, runs = load_sweep(client, parent_run_id)
    props = properties(sweep)
    children = [read_child(client, r, props) for r in tqdm(runs, desc="reading runs", unit="run", disable=not progress)]
    values = grid_values(sweep, children)
    children.sort(key=lambda c: tuple(_sort_key(_numeric(values[p]), c.grid[p]) for p in (*props, "seed")))
    analyzed = [c for c in children if c.analyzed(split)]
    skipped = [c.run_id for c in children if not c.analyzed(split)]
    entropy = metric_key(PRIMARY_NETWORK, "entropy", split)
    if not analyzed:
        raise tracking.RunError(
            f"no child run of sweep {parent_run_id} has NTK metrics on {split!r} ({entropy}); "
            f"analyze them first: ntk-tracking analyze {parent_run_id}"
        )
    if skipped:
        warnings.warn(
            f"{len(skipped)} of {len(children)} child runs have no {entropy} yet and are left out "
            f"of the figures (run `ntk-tracking analyze RUN_ID` on each): {', '.join(skipped)}",
            RuntimeWarning, stacklevel=2,
        )
    for c in analyzed:
        c.regime = classify_child(c, split, recovery_threshold)
        log_regime(client, c, split)

    ref = references(values)
    loss_label = _loss_label(sweep.get("task"))
    task = sweep.get("task", "sweep")
    artifacts = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = evolution_rows(analyzed, values, ref)
        if not rows:  # no analyzed run sits at the reference values yet
            warnings.warn(f"no evolution figure: no analyzed run has the reference values {ref}",
                          RuntimeWarning, stacklevel=2)
        made = [("evolution", figures.evolution_grid(
            rows, loss_label, title=f"{task} · sweep {parent_run_id[:8]} · train (blue) and test (orange)"))] if rows else []
        maps = scaling_figures(analyzed, values, split, loss_label, recovery_threshold)
        # The architecture scan's maps already show width, depth (and learning rate): other sweeps
        # get entropy and trace against each numeric option.
        made += maps or field_figures(analyzed, values, ref, split)
        for name, fig in made:
            fig.savefig(os.path.join(tmp, f"{name}.png"), dpi=110)
            figures.plt.close(fig)
        write_history(os.path.join(tmp, "history.csv"), children)
        write_runs(os.path.join(tmp, "runs.csv"), children, split)
        counts = {label: sum(c.regime.label == label for c in analyzed) for label in regimes.REGIMES}
        summary = dict(parent_run_id=parent_run_id, task=task, split=split, recovery_threshold=recovery_threshold,
                       z_score=regimes.Z_SCORE, rel_tol=regimes.REL_TOL, references=ref, values=values,
                       regime_counts=counts, skipped=skipped, children=len(children))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        client.log_artifacts(parent_run_id, tmp, "report")
        artifacts = sorted(f"report/{name}" for name in os.listdir(tmp))
    return SweepReport(parent_run_id, split, {c.run_id: c.regime for c in analyzed}, skipped, artifacts)
