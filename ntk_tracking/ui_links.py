"""Links into the MLflow UI that open a run's or a sweep's NTK charts, printed at the end of each
command and kept in the runs' descriptions (docs/analysis.md, "In the MLflow UI").

MLflow 3 opens in its GenAI mode, where training runs' charts are hard to find: every link carries
`workflowType=machine_learning`, the UI's model-training mode. A sweep's children are folded under
their parent on the runs page; a saved view of the experiment (the runs page's "Views" menu)
groups them instead, so that every child's curve of a metric is drawn on one chart.
"""

from __future__ import annotations

import json
import warnings
from urllib.parse import quote, urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException

from ntk_tracking import tracking
from ntk_tracking.keys import DESCRIPTION_TAG, KIND_TAG, PARENT_TAG

MODEL_TRAINING = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui --port 5000` serves a local store
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # an experiment tag per saved view of the runs page
SECTION_START = "<!-- ntk_tracking links -->"  # our part of a description (the UI hides the comments)
SECTION_END = "<!-- /ntk_tracking links -->"


def ui_address(tracking_uri: str) -> tuple[str | None, str | None]:
    """(the UI's base URL, the command that serves it): a tracking server serves its own UI; a local
    store is served by `mlflow ui`; (None, None) for stores whose UI lies elsewhere (databricks)."""
    parts = urlsplit(tracking_uri)
    if tracking.is_http_uri(tracking_uri):
        host = parts.hostname + (f":{parts.port}" if parts.port else "")  # no credentials in a link
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", "")), None
    if tracking_uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):
        return None, None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {tracking.redact_uri(tracking_uri)} --port 5000"


def run_route(experiment_id: str, run_id: str) -> str:
    """The run's Model metrics tab: a chart per metric against step (= epoch)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODEL_TRAINING}"


def compare_route(run_ids: list[str], experiment_ids: list[str]) -> str:
    """The compare-runs page: parameters and metrics side by side, parallel coordinates."""
    as_json = lambda ids: quote(json.dumps(ids, separators=(",", ":")))  # noqa: E731
    return f"#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"


def view_key(parent_run_id: str) -> str:
    return f"ntk-sweep-{parent_run_id}"


def sweep_route(experiment_id: str, parent_run_id: str) -> str:
    """The runs page in chart mode, with the sweep's saved view: its children's curves together."""
    return (f"#/experiments/{experiment_id}/runs?viewStateShareKey={view_key(parent_run_id)}"
            f"&compareRunsMode=CHART&{MODEL_TRAINING}")


def save_sweep_view(client, parent) -> None:
    """The experiment's saved view of the sweep `parent` (a Run): its children only, grouped together
    (grouping unfolds them from the parent) and each drawn as its own curve, every child shown."""
    state = {"searchFilter": f"tags.{PARENT_TAG} = '{parent.info.run_id}'",
             "groupBy": {"aggregateFunction": "average",
                         "groupByKeys": [{"mode": "tag", "groupByData": PARENT_TAG}]},
             "useGroupedValuesInCharts": False, "runsHiddenMode": "SHOW_ALL"}
    name = f"{parent.info.run_name or 'sweep'} ({parent.info.run_id[:8]}): children's NTK charts"
    envelope = json.dumps({"name": name, "createdAt": parent.info.start_time,
                           "updatedAt": parent.info.start_time, "state": json.dumps(state)})
    tag = VIEW_TAG_PREFIX + view_key(parent.info.run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    if experiment.tags.get(tag) != envelope:
        client.set_experiment_tag(parent.info.experiment_id, tag, envelope)


def children_of(client, parent) -> list:
    """The sweep's child runs, in the order they were created (the grid's)."""
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_name or ""))


def prepare_sweep(client, parent_run_id: str) -> None:
    """Save the sweep's view before its children train (their descriptions link it; the charts can
    be watched while it runs). A store that refuses it only warns: the sweep's end tries again."""
    try:
        save_sweep_view(client, client.get_run(parent_run_id))
    except MlflowException as err:
        warnings.warn(f"could not save the MLflow UI view of sweep {parent_run_id}: {tracking.redact(str(err))}",
                      RuntimeWarning, stacklevel=2)


def sweep_links(client, parent, save: bool = True) -> list[tuple[str, str]]:
    """(label, route) of a sweep's children compared; `save`: (re)write the view they need."""
    if save:
        save_sweep_view(client, parent)
    children = children_of(client, parent)
    return [("sweep charts", sweep_route(parent.info.experiment_id, parent.info.run_id)),
            ("sweep comparison", compare_route([r.info.run_id for r in children],
                                                   [parent.info.experiment_id]))]


def links(client, run) -> list[tuple[str, str]]:
    """(label, route) of the pages that show the run's results: for a sweep, its children compared;
    for a training run, its Model metrics (and, for a sweep's child, its sweep's pages)."""
    if run.data.tags.get(KIND_TAG) == "sweep":
        return sweep_links(client, run)
    found = [("Model metrics", run_route(run.info.experiment_id, run.info.run_id))]
    parent_id = run.data.tags.get(PARENT_TAG)
    if parent_id:
        parent = client.get_run(parent_id)
        if parent.data.tags.get(KIND_TAG) == "sweep":  # its view: saved by the sweep (children run at once)
            found += sweep_links(client, parent, save=False)
    return found


def with_section(description: str, items: list[tuple[str, str]]) -> str:
    """`description` with our links section put in place of the earlier one, or appended."""
    section = "\n".join([SECTION_START, "**NTK charts in the MLflow UI** (model-training mode): "
                         + " · ".join(f"[{label}]({route})" for label, route in items), SECTION_END])
    start, end = description.find(SECTION_START), description.find(SECTION_END)
    if 0 <= start < end:
        return description[:start] + section + description[end + len(SECTION_END):]
    return f"{description.rstrip()}\n\n{section}" if description.strip() else section


def describe(client, run, items: list[tuple[str, str]]) -> None:
    """Put the links into the run's description (the UI shows it), keeping what the user wrote."""
    before = run.data.tags.get(DESCRIPTION_TAG, "")
    after = with_section(before, items)
    if after != before:
        client.set_tag(run.info.run_id, DESCRIPTION_TAG, after)


def announce(run_id: str, mlflow_client=None, show: bool = True) -> list[str]:
    """Put the run's links into its description (for a sweep, also into each child's) and print
    (`show`) where to click; returns those lines. A store that refuses the tags loses only those."""
    client = mlflow_client or tracking.client()
    base, serve = ui_address(mlflow.get_tracking_uri())
    try:
        run = client.get_run(run_id)
        items = links(client, run)
        describe(client, run, items)
        if run.data.tags.get(KIND_TAG) == "sweep":
            for child in children_of(client, run):
                describe(client, child, [("Model metrics", run_route(child.info.experiment_id,
                                                                     child.info.run_id))] + items)
    except MlflowException as err:
        warnings.warn(f"could not link run {run_id} to its MLflow UI pages: {tracking.redact(str(err))}",
                      RuntimeWarning, stacklevel=2)
        return []
    if base is None or not show:
        return []
    lines = ["in the MLflow UI (model-training mode):"]
    if serve:
        lines.append(f"  start it: {serve}")
    width = max(len(label) for label, _ in items) + 1
    lines += [f"  {label + ':':<{width}} {base}/{route}" for label, route in items]
    print("\n".join(lines))
    return lines
