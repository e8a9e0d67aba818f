"""molpcba_gnn: loaders on fixtures in both real formats, padding that leaks nowhere, the NTK
against a float64 brute force, a tiny config that learns, and train → checkpoints → analyze."""

from __future__ import annotations

import gzip
import os

import jax
import jax.numpy as jnp
import jraph
import mlflow
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import use_tracking_store
from ntk_tracking import NTK
from ntk_tracking.data.graph_batches import Budget, batches, budget_for, padded_points
from ntk_tracking.data.ogbg import load_molpcba, with_virtual_nodes
from ntk_tracking.models import graph_net
from ntk_tracking.tasks import get_task
from ntk_tracking.train import graph_classification as gc

TASKS = 128
SPLITS = {"train": 24, "valid": 6, "test": 10}
TINY = dict(latent_size=8, message_passing_steps=2, mlp_layers=1, dropout_rate=0.1, batch_size=4,
            train_eval_size=0, probe_pool=8, epochs=2)


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


# -- fixtures in the two real formats -------------------------------------------------------------


def random_molecules(n: int, seed: int = 0, max_atoms: int = 9) -> list[dict]:
    """Small connected molecules: 9 integer atom features, 3 bond features, 128 labels (NaN missing)."""
    rng = np.random.default_rng(seed)
    mols = []
    for _ in range(n):
        atoms = int(rng.integers(2, max_atoms + 1))
        bonds = [(int(rng.integers(0, i)), i) for i in range(1, atoms)]  # a tree ...
        bonds += [(0, atoms - 1)] if atoms > 3 and rng.random() < 0.5 else []  # ... and maybe a ring
        nodes = rng.integers(0, 6, size=(atoms, 9))
        edges = rng.integers(0, 4, size=(len(bonds), 3))
        # Learnable labels: task t is active when atom feature t % 9 is large on average.
        score = nodes[:, np.arange(TASKS) % 9].mean(0) + 0.3 * rng.standard_normal(TASKS)
        labels = (score > 2.5).astype(np.float32)
        labels[rng.random(TASKS) < 0.3] = np.nan
        mols.append(dict(nodes=nodes, edges=edges, bonds=np.array(bonds), labels=labels))
    return mols


def fixture_molecules():
    mols = random_molecules(sum(SPLITS.values()))
    order = np.random.default_rng(1).permutation(len(mols))  # split files list shuffled indices
    cuts = np.cumsum(list(SPLITS.values()))[:-1]
    return mols, dict(zip(SPLITS, np.split(order, cuts)))


def write_ogb_folder(root, mols, split_index) -> str:
    """OGB's download layout: each bond stored once (OGB adds the inverse edges on load)."""

    def write(name, rows, fmt="%d"):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with gzip.open(path, "wt") as f:
            np.savetxt(f, rows, fmt=fmt, delimiter=",")

    os.makedirs(os.path.join(root, "mapping"), exist_ok=True)
    with gzip.open(os.path.join(root, "mapping", "mol.csv.gz"), "wt") as f:
        f.write("mol_id,smiles\n" + "".join(f"{i},C\n" for i in range(len(mols))))
    write("raw/node-feat.csv.gz", np.concatenate([m["nodes"] for m in mols]))
    write("raw/edge-feat.csv.gz", np.concatenate([m["edges"] for m in mols]))
    write("raw/edge.csv.gz", np.concatenate([m["bonds"] for m in mols]))
    write("raw/num-node-list.csv.gz", [[len(m["nodes"])] for m in mols])
    write("raw/num-edge-list.csv.gz", [[len(m["bonds"])] for m in mols])
    with gzip.open(os.path.join(root, "raw", "graph-label.csv.gz"), "wt") as f:
        for m in mols:
            f.write(",".join("" if np.isnan(v) else str(int(v)) for v in m["labels"]) + "\n")
    for split, index in split_index.items():
        write(f"split/scaffold/{split}.csv.gz", [[i] for i in index])
    return str(root)


def hub_dataset_dict(mols, split_index):
    """The hub format (PyG-derived): edge_index [2, E] with both directions, y [1, 128] with NaN."""
    import datasets

    def rows(index):
        out = {c: [] for c in ("node_feat", "edge_index", "edge_attr", "y", "num_nodes")}
        for i in index:
            m = mols[i]
            both = np.concatenate([m["bonds"], m["bonds"][:, ::-1]])
            out["node_feat"].append(m["nodes"].tolist())
            out["edge_index"].append(both.T.tolist())
            out["edge_attr"].append(np.concatenate([m["edges"], m["edges"]]).tolist())
            out["y"].append([m["labels"].tolist()])
            out["num_nodes"].append(len(m["nodes"]))
        return datasets.Dataset.from_dict(out)

    names = {"train": "train", "valid": "validation", "test": "test"}
    return datasets.DatasetDict({names[s]: rows(idx) for s, idx in split_index.items()})


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("molpcba")
    mols, split_index = fixture_molecules()
    ogb = write_ogb_folder(root / "ogbg_molpcba", mols, split_index)
    hub = hub_dataset_dict(mols, split_index)
    hub.save_to_disk(str(root / "saved"))
    os.makedirs(root / "parquet")
    for split, ds in hub.items():
        ds.to_parquet(str(root / "parquet" / f"{split}.parquet"))
    return dict(ogb=ogb, saved=str(root / "saved"), parquet=str(root / "parquet"), mols=mols, split=split_index)


def config(**overrides):
    return get_task("molpcba_gnn").config(**{**TINY, **overrides})


def model(cfg):
    """The task's GCN with TASKS logits."""
    return graph_net.make(cfg, {"num_outputs": TASKS})


# -- loaders --------------------------------------------------------------------------------------


def test_both_real_formats_load_the_same_molecules(fixture_paths):
    ogb = load_molpcba(fixture_paths["ogb"])
    mols, split_index = fixture_paths["mols"], fixture_paths["split"]
    for other in ("saved", "parquet"):
        hub = load_molpcba(fixture_paths[other])
        for split in SPLITS:
            a, b = getattr(ogb, split), getattr(hub, split)
            for field in ("nodes", "edges", "senders", "receivers", "node_offsets", "edge_offsets"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{other} {split} {field}")
            np.testing.assert_array_equal(a.labels, b.labels)
    assert ogb.num_tasks == TASKS and ogb.node_features == 9 and len(ogb.test) == SPLITS["test"]
    # Split files choose the molecules; bonds appear in both directions, once each.
    first = mols[split_index["train"][0]]
    g = ogb.train.graph(0)
    np.testing.assert_array_equal(g["nodes"], first["nodes"])
    assert len(g["senders"]) == 2 * len(first["bonds"])
    assert {(int(s), int(r)) for s, r in zip(g["senders"], g["receivers"])} == \
        {(int(s), int(r)) for s, r in first["bonds"]} | {(int(r), int(s)) for s, r in first["bonds"]}
    np.testing.assert_array_equal(np.isnan(g["labels"]), np.isnan(first["labels"]))
    sub = load_molpcba(fixture_paths["ogb"], train_size=5, test_size=3, seed=2)
    assert (len(sub.train), len(sub.valid), len(sub.test)) == (5, SPLITS["valid"], 3)


def test_folder_without_the_expected_files_is_refused(tmp_path, fixture_paths):
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match=r"lacks OGB files .*raw/edge.csv.gz.*ogbg_molpcba"):
        load_molpcba(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no molecules found"):
        load_molpcba(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="neither"):
        load_molpcba(str(tmp_path / "nowhere"))


def test_hub_format_with_one_split_or_missing_columns_is_refused(tmp_path, fixture_paths):
    import datasets

    hub = hub_dataset_dict(fixture_paths["mols"], fixture_paths["split"])
    datasets.DatasetDict({"train": hub["train"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ValueError, match="expected train, validation and test"):
        load_molpcba(str(tmp_path / "one"))
    hub.remove_columns("edge_attr").save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(ValueError, match=r"lacks columns \['edge_attr'\]"):
        load_molpcba(str(tmp_path / "cols"))


def test_hub_unreachable_says_what_works_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="OGB's ogbg_molpcba folder"):
        load_molpcba("ogbg-molpcba")


def test_virtual_nodes_join_every_atom(fixture_paths):
    g = load_molpcba(fixture_paths["ogb"]).test
    v = with_virtual_nodes(g)
    np.testing.assert_array_equal(v.n_node, g.n_node + 1)
    np.testing.assert_array_equal(v.n_edge, g.n_edge + 2 * g.n_node)
    one = v.graph(0)
    assert not one["nodes"][-1].any() and (one["senders"] == g.n_node[0]).sum() == g.n_node[0]


# -- batching, masks and metrics ------------------------------------------------------------------


def test_batches_have_one_shape_and_hold_every_molecule_once(fixture_paths):
    g = load_molpcba(fixture_paths["ogb"]).train
    budget = budget_for(g, 4)
    out = list(batches(g, budget, order=np.arange(len(g))[::-1]))
    shapes = {jax.tree_util.tree_map(np.shape, b) for b in out}
    assert len(shapes) == 1
    real = [np.asarray(b.globals)[np.asarray(jraph.get_graph_padding_mask(b))] for b in out]
    np.testing.assert_array_equal(np.concatenate(real), g.labels[::-1].astype(np.float32))


def test_graph_over_budget_names_the_budget_to_raise(fixture_paths):
    task = get_task("molpcba_gnn")
    with pytest.raises(ValueError, match=r"nodes but the node budget 4 .*raise --node-budget to at least"):
        task.load_data(config(dataset=fixture_paths["ogb"], node_budget=4))
    with pytest.raises(ValueError, match=r"edges but the edge budget is 3; raise --edge-budget"):
        task.load_data(config(dataset=fixture_paths["ogb"], edge_budget=3))


def test_mean_ap_uses_tasks_with_both_classes_only():
    from sklearn.metrics import average_precision_score

    labels = np.array([[1, 0, np.nan], [0, 0, 1], [1, np.nan, 1], [np.nan, 0, 1]], np.float32)
    logits = np.array([[2.0, -1, 5], [0.5, 1, 0], [-1, 3, 1], [9, 0, 2]], np.float32)
    expected = average_precision_score([1, 0, 1], [2.0, 0.5, -1])  # tasks 1 and 2 have one class
    assert gc.mean_average_precision(logits, labels) == pytest.approx(expected)
    present = ~np.isnan(labels)
    x, y = logits[present].astype(float), labels[present].astype(float)
    assert gc.bce_loss(logits, labels) == pytest.approx(np.mean(-y * np.log(1 / (1 + np.exp(-x)))
                                                               - (1 - y) * np.log(1 - 1 / (1 + np.exp(-x)))))


def scramble_padding(points: dict, seed: int) -> dict:
    """Random large features on every padding node and edge, padding edges rewired among padding nodes."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in points.items()}
    n_max = out["nodes"].shape[1]
    for p in range(len(out["nodes"])):
        n, e = out["n_node"][p, 0], out["n_edge"][p, 0]
        out["nodes"][p, n:] = rng.normal(0, 50, out["nodes"][p, n:].shape)
        out["edges"][p, e:] = rng.normal(0, 50, out["edges"][p, e:].shape)
        out["senders"][p, e:] = rng.integers(n, n_max, out["senders"][p, e:].shape)
        out["receivers"][p, e:] = rng.integers(n, n_max, out["receivers"][p, e:].shape)
    return out


def test_padding_changes_no_metric_no_loss_and_no_kernel_entry(fixture_paths):
    data = load_molpcba(fixture_paths["ogb"])
    cfg = config()
    budget = budget_for(data.test, 4)
    state = gc.create_train_state(model(cfg), cfg, next(batches(data.test, budget)))
    predict = gc.make_predict(model(cfg))
    step = gc.make_train_step(model(cfg))
    key = jax.random.PRNGKey(3)
    for batch in batches(data.test, budget):
        mask = np.asarray(jraph.get_graph_padding_mask(batch))
        node_pad = np.asarray(jraph.get_node_padding_mask(batch))
        edge_pad = np.asarray(jraph.get_edge_padding_mask(batch))
        rng = np.random.default_rng(0)
        noisy = batch._replace(
            nodes=np.where(node_pad[:, None], batch.nodes, rng.normal(0, 50, batch.nodes.shape)).astype(np.float32),
            edges=np.where(edge_pad[:, None], batch.edges, 7.0).astype(np.float32),
            globals=np.where(mask[:, None], batch.globals, np.nan).astype(np.float32))
        np.testing.assert_allclose(np.asarray(predict(state.params, noisy))[mask],
                                   np.asarray(predict(state.params, batch))[mask], rtol=1e-6, atol=1e-6)
        (s1, m1), (s2, m2) = step(state, batch, key), step(state, noisy, key)
        assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    base = gc.evaluate(predict, state.params, data.test, budget, "test")
    bigger = gc.evaluate(predict, state.params, data.test, Budget(budget.n_node * 2, budget.n_edge * 3, 3), "test")
    assert base == pytest.approx(bigger, rel=1e-5)
    # The NTK: same kernel whatever the padding holds.
    points = padded_points(data.test.subset(np.arange(3)))
    fn = get_ntk_fn(cfg)
    variables = {"params": state.params}
    ntk = NTK(fn, "jacobian")
    k1, k2 = ntk(variables, points), ntk(variables, scramble_padding(points, 1))
    np.testing.assert_allclose(np.asarray(k2), np.asarray(k1), rtol=1e-5)


def get_ntk_fn(cfg):
    from ntk_tracking.tasks.molpcba import ntk_apply_fn

    return ntk_apply_fn(model(cfg))


# -- model and NTK --------------------------------------------------------------------------------


def test_default_model_has_the_flax_examples_695936_parameters():
    from ntk_tracking.models import count_params
    from ntk_tracking.models.graph_net import GraphConvNet

    g = jraph.GraphsTuple(nodes=jnp.ones((3, 9)), edges=None, senders=jnp.array([0, 1]), receivers=jnp.array([1, 0]),
                          n_node=jnp.array([2, 1]), n_edge=jnp.array([2, 0]), globals=None)
    shapes = jax.eval_shape(lambda: GraphConvNet().init(jax.random.PRNGKey(0), g))
    assert count_params(shapes["params"]) == 695_936
    cfg = get_task("molpcba_gnn").default_config()
    shapes = jax.eval_shape(lambda: graph_net.make(cfg, {"num_outputs": 128}).init(jax.random.PRNGKey(0), g))
    assert count_params(shapes["params"]) == 695_936


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "structured"])
def test_ntk_matches_a_float64_brute_force_with_padding_present(fixture_paths, x64, implementation):
    data = load_molpcba(fixture_paths["ogb"])
    cfg = config(virtual_node=True)
    graphs = with_virtual_nodes(data.train.subset(np.arange(3)))
    points = jax.tree_util.tree_map(lambda a: a.astype(np.float64) if a.dtype.kind == "f" else a,
                                    padded_points(graphs))
    assert (points["n_node"][:, 1] > 0).all() and (points["n_edge"][:, 1] >= 0).all()
    example = next(batches(graphs, budget_for(graphs, 2)))
    params = gc.create_train_state(model(cfg), cfg, example).params
    variables = {"params": jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)}
    fn = get_ntk_fn(cfg)
    flat, unravel = ravel_pytree(variables)
    jac = jax.jit(jax.jacrev(lambda w: fn(unravel(w), points)))(flat)  # (m, 128, P)
    assert jac.dtype == jnp.float64
    expected = np.einsum("iop,jop->ij", jac, jac)
    kernel = NTK(fn, implementation)(variables, points)
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-8, atol=0)


# -- training -------------------------------------------------------------------------------------


def test_tiny_config_learns(fixture_paths):
    task = get_task("molpcba_gnn")
    cfg = config(dataset=fixture_paths["ogb"], epochs=6, learning_rate=2e-2)
    data = task.load_data(cfg)
    history = []
    gcn = task.build_model(cfg, data)
    task.fit(cfg, data, gcn, task.init_state(cfg, data, gcn), 0, lambda e, s, m: history.append(m), progress=False)
    losses = [m["train/loss"] for m in history]
    assert len(history) == 7 and losses[-1] < 0.8 * losses[0], losses
    assert history[-1]["train/mean_ap"] > history[0]["train/mean_ap"]
    assert all(np.isfinite(m["test/mean_ap"]) for m in history)


@pytest.mark.slow  # a whole run through MLflow in processes of its own: the fast tier leaves it out
def test_train_checkpoint_analyze_through_mlflow(fixture_paths, tmp_path, monkeypatch):
    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    use_tracking_store(monkeypatch, tmp_path)
    try:
        argv = ["--dataset", fixture_paths["ogb"], "--epochs", "1", "--latent-size", "8", "--message-passing-steps",
                "2", "--mlp-layers", "1", "--batch-size", "4", "--probe-pool", "8", "--eval-valid", "yes",
                "--no-progress"]
        run_id = train_main("molpcba_gnn", argv)
        client = mlflow.MlflowClient()
        metrics = client.get_run(run_id).data.metrics
        for key in ("train/loss", "test/loss", "train/mean_ap", "test/mean_ap", "valid/mean_ap"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == [0, 1], key
        assert not any(k.startswith("ntk/") for k in metrics)
        assert CheckpointStore(run_id, client).cv_epochs() == [0, 1]
        # The fixture lives outside the working directory: the analyzer reads it only when allowed.
        assert analyze_main([run_id, "--subsets", "2", "--points", "3", "--no-progress",
                             "--allow-data-path", fixture_paths["ogb"]]) == [0, 1]
        metrics = client.get_run(run_id).data.metrics
        for split in ("train", "test"):
            assert 0 < metrics[f"ntk/entropy/{split}"] <= np.log(3) + 1e-9
            assert metrics[f"ntk/trace/{split}"] > 0
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_batch_count_matches_the_batches_for_any_order_and_budget(fixture_paths):
    from ntk_tracking.data.graph_batches import Budget, batches, count_batches, budget_for

    train = load_molpcba(fixture_paths["ogb"]).train
    rng = np.random.default_rng(0)
    for batch_size in (2, 4, 7):
        budget = budget_for(train, batch_size)
        for tight in (budget, Budget(n_node=int(train.n_node.max()) + 1, n_edge=int(train.n_edge.max()), n_graph=3)):
            order = rng.permutation(len(train))
            assert count_batches(train, tight, order) == len(list(batches(train, tight, order)))


@pytest.mark.slow
def test_step_checkpoints_count_the_batches_really_trained(fixture_paths, tmp_path, monkeypatch):
    """Epochs of molecules batched by size differ in steps: the global step adds up the real ones."""
    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.train import train_main

    use_tracking_store(monkeypatch, tmp_path)
    try:
        run_id = train_main("molpcba_gnn", ["--dataset", fixture_paths["ogb"], "--epochs", "2", "--latent-size", "8",
                                            "--message-passing-steps", "1", "--mlp-layers", "1", "--batch-size", "4",
                                            "--probe-pool", "8", "--cv-steps", "1,2", "--no-progress"])
        client = mlflow.MlflowClient()
        counts = [int(m.value) for m in sorted(client.get_metric_history(run_id, "train/steps"), key=lambda m: m.step)]
        ends = [counts[0], counts[0] + counts[1]]
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/steps")) == ends
        assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2] + ends
        epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
        assert epochs == {0: 0.0, 1: 1 / counts[0], 2: 2 / counts[0], ends[0]: 1.0, ends[1]: 2.0}
    finally:
        mlflow.set_tracking_uri(None)
