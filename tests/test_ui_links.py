"""Links into the MLflow UI: the UI's address from the tracking URI, the routes, the sweep's saved
view and the links section of run descriptions, on a real SQLite store (the browser test that
opens them is tests/test_mlflow_ui.py)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, unquote, urlsplit

import mlflow
import pytest

from ntk_tracking import ui_links
from ntk_tracking.keys import DESCRIPTION_TAG, KEY_TAG, KIND_TAG, PARENT_TAG


@pytest.mark.parametrize("uri, base, serve", [
    ("http://127.0.0.1:5001", "http://127.0.0.1:5001", None),
    ("https://alice:s3cret@mlflow.example.org/prefix/", "https://mlflow.example.org/prefix", None),
    ("sqlite:////data/mlflow.db", "http://127.0.0.1:5000",
     "mlflow ui --backend-store-uri sqlite:////data/mlflow.db --port 5000"),
    ("file:///data/mlruns", "http://127.0.0.1:5000", "mlflow ui --backend-store-uri file:///data/mlruns --port 5000"),
    ("postgresql://bob:pw@db/mlflow", "http://127.0.0.1:5000",
     "mlflow ui --backend-store-uri postgresql://bob:***@db/mlflow --port 5000"),
    ("databricks", None, None),
])
def test_the_ui_address_follows_the_tracking_uri(uri, base, serve):
    assert ui_links.ui_address(uri) == (base, serve)


def test_routes_open_model_training_mode_and_name_the_runs():
    assert ui_links.run_route("3", "abc") == "#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"
    query = parse_qs(urlsplit(ui_links.compare_route(["a", "b"], ["3"])[1:]).query)
    assert json.loads(query["runs"][0]) == ["a", "b"] and json.loads(query["experiments"][0]) == ["3"]
    sweep = parse_qs(urlsplit(ui_links.sweep_route("3", "p1")[1:]).query)
    assert sweep == {"viewStateShareKey": ["ntk-sweep-p1"], "compareRunsMode": ["CHART"],
                     "workflowType": ["machine_learning"]}


def test_the_links_section_replaces_only_its_own_part():
    first = ui_links.with_section("", [("Model metrics", "#/a")])
    assert first.startswith(ui_links.SECTION_START) and "[Model metrics](#/a)" in first
    mine = f"My notes.\n\n{first}\n\nMore notes."
    again = ui_links.with_section(mine, [("Model metrics", "#/b")])
    assert again == mine.replace("(#/a)", "(#/b)")
    assert ui_links.with_section("Only mine.", [("x", "#/c")]).startswith("Only mine.\n\n" + ui_links.SECTION_START)


def _sweep(client):
    """A sweep's parent and two children as the sweep records them (no training needed here)."""
    experiment = client.create_experiment("ui")
    parent = client.create_run(experiment, tags={KIND_TAG: "sweep"}, run_name="sweep-mnist_dense").info.run_id
    children = [client.create_run(experiment, run_name=f"width={w}", tags={
        PARENT_TAG: parent, KIND_TAG: "training", KEY_TAG: f"width={w}"}).info.run_id for w in (4, 8)]
    return experiment, parent, children


def test_a_sweep_gets_a_saved_view_and_every_run_its_links(store, capsys):
    client = mlflow.MlflowClient()
    experiment, parent, children = _sweep(client)
    client.set_tag(children[0], DESCRIPTION_TAG, "Written by the user.")
    lines = ui_links.announce(parent)

    printed = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db --port 5000" in printed
    assert lines[0] == "in the MLflow UI (model-training mode):" and "\n".join(lines) in printed
    sweep_url = f"http://127.0.0.1:5000/{ui_links.sweep_route(experiment, parent)}"
    compare_url = f"http://127.0.0.1:5000/{ui_links.compare_route(children, [experiment])}"
    assert sweep_url in printed and compare_url in printed

    envelope = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.ntk-sweep-{parent}"])
    assert envelope["name"] == f"sweep-mnist_dense ({parent[:8]}): children's NTK charts"
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "mlflow.parentRunId"}]
    assert state["useGroupedValuesInCharts"] is False and state["runsHiddenMode"] == "SHOW_ALL"
    # The view's filter finds exactly the children.
    found = client.search_runs([experiment], filter_string=state["searchFilter"])
    assert sorted(r.info.run_id for r in found) == sorted(children)

    parent_note = client.get_run(parent).data.tags[DESCRIPTION_TAG]
    assert ui_links.sweep_route(experiment, parent) in parent_note
    assert ui_links.compare_route(children, [experiment]) in parent_note
    for child in children:
        note = client.get_run(child).data.tags[DESCRIPTION_TAG]
        assert ui_links.run_route(experiment, child) in note and ui_links.sweep_route(experiment, parent) in note
    assert client.get_run(children[0]).data.tags[DESCRIPTION_TAG].startswith("Written by the user.\n\n")

    # Announcing again changes nothing: one section, the same view.
    before = {r: client.get_run(r).data.tags[DESCRIPTION_TAG] for r in [parent, *children]}
    ui_links.announce(parent)
    assert {r: client.get_run(r).data.tags[DESCRIPTION_TAG] for r in before} == before
    assert before[children[0]].count(ui_links.SECTION_START) == 1


def test_a_training_run_links_its_model_metrics_and_a_child_its_sweep(store, capsys):
    client = mlflow.MlflowClient()
    experiment, parent, children = _sweep(client)
    alone = client.create_run(experiment).info.run_id
    assert ui_links.links(client, client.get_run(alone)) == [("Model metrics", ui_links.run_route(experiment, alone))]
    labels = [label for label, _ in ui_links.links(client, client.get_run(children[1]))]
    assert labels == ["Model metrics", "sweep charts", "sweep comparison"]
    # Children (trained at once) leave the view to the sweep, which saves it before they train.
    view = f"mlflow.sharedViewState.ntk-sweep-{parent}"
    assert view not in client.get_experiment(experiment).tags
    ui_links.prepare_sweep(client, parent)
    assert json.loads(client.get_experiment(experiment).tags[view])["name"].endswith("children's NTK charts")
    assert ui_links.announce(alone, show=False) == [] and capsys.readouterr().out == ""
    assert unquote(ui_links.run_route(experiment, alone)) in client.get_run(alone).data.tags[DESCRIPTION_TAG]


@pytest.mark.slow  # the session's tracking server takes seconds to start; the fast tier has no other user
def test_a_server_prints_its_own_address(shared_tracking_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_tracking_server.uri)
    mlflow.set_tracking_uri(shared_tracking_server.uri)
    try:
        client = mlflow.MlflowClient()
        run = client.create_run(client.create_experiment("ui-links-server")).info
        ui_links.announce(run.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    printed = capsys.readouterr().out
    assert "mlflow ui" not in printed
    assert f"{shared_tracking_server.uri}/{ui_links.run_route(run.experiment_id, run.run_id)}" in printed
