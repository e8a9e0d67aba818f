"""Molecules as one flat set of graphs (jraph's layout): the form every molecular dataset loads into."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Many graphs in concatenated arrays; senders/receivers index nodes within their graph."""

    nodes: np.ndarray  # (total nodes, F) node features as stored (integer codes for OGB)
    edges: np.ndarray  # (total edges, F_e)
    senders: np.ndarray  # (total edges,) int32, local to the graph
    receivers: np.ndarray  # (total edges,) int32
    node_offsets: np.ndarray  # (n + 1,) int64: graph i's nodes are node_offsets[i]:node_offsets[i+1]
    edge_offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray  # (n, T) float16, NaN = missing

    def __len__(self) -> int:
        return len(self.node_offsets) - 1

    @property
    def n_node(self) -> np.ndarray:
        return np.diff(self.node_offsets)

    @property
    def n_edge(self) -> np.ndarray:
        return np.diff(self.edge_offsets)

    def graph(self, i: int) -> dict:
        """Graph i's arrays (views)."""
        ns, ne = slice(*self.node_offsets[i:i + 2]), slice(*self.edge_offsets[i:i + 2])
        return dict(nodes=self.nodes[ns], edges=self.edges[ne], senders=self.senders[ne],
                    receivers=self.receivers[ne], labels=self.labels[i])

    def subset(self, index) -> "Graphs":
        """The graphs at `index`, in that order."""
        index = np.asarray(index, np.int64)
        node_idx, node_off = concatenated_ranges(self.node_offsets[index], self.n_node[index])
        edge_idx, edge_off = concatenated_ranges(self.edge_offsets[index], self.n_edge[index])
        return Graphs(self.nodes[node_idx], self.edges[edge_idx], self.senders[edge_idx],
                      self.receivers[edge_idx], node_off, edge_off, self.labels[index])


def concatenated_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges start_i:start_i+count_i, and the offsets of the result."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], counts)
    return np.repeat(np.asarray(starts, np.int64), counts) + within, offsets


def make_graphs(nodes, edges, senders, receivers, n_node, n_edge, labels) -> Graphs:
    """Graphs from concatenated arrays and per-graph counts, checked, with edges made undirected."""
    n_node, n_edge = np.asarray(n_node, np.int64), np.asarray(n_edge, np.int64)
    nodes, edges = np.asarray(nodes), np.asarray(edges)
    senders, receivers = np.asarray(senders, np.int64), np.asarray(receivers, np.int64)
    labels = np.asarray(labels, np.float32)
    if labels.ndim == 1:
        labels = labels[:, None]
    if nodes.ndim != 2 or edges.ndim != 2:
        raise ValueError(f"node and edge features must be 2-D (count, features); got {nodes.shape}, {edges.shape}")
    if nodes.shape[0] != n_node.sum() or edges.shape[0] != n_edge.sum() or senders.shape != receivers.shape \
            or senders.shape[0] != n_edge.sum() or labels.shape[0] != len(n_node):
        raise ValueError(
            f"graph sizes disagree with the arrays: {len(n_node)} graphs with {n_node.sum()} nodes and "
            f"{n_edge.sum()} edges, but {nodes.shape[0]} node rows, {edges.shape[0]} edge rows, "
            f"{senders.shape[0]} edge indices and {labels.shape[0]} label rows; the files are inconsistent")
    local_n = np.repeat(n_node, n_edge)
    if senders.size and (min(senders.min(), receivers.min()) < 0
                         or (senders >= local_n).any() or (receivers >= local_n).any()):
        raise ValueError("an edge index points outside its graph's nodes; edge indices must be "
                         "0-based and local to each graph (OGB's raw layout)")
    node_offsets = np.concatenate([[0], np.cumsum(n_node)]).astype(np.int64)
    senders, receivers, edges, edge_offsets = _undirected(senders, receivers, edges, n_edge, n_node.max(initial=0))
    labels = np.where(np.isfinite(labels), labels, np.nan).astype(np.float16)
    return Graphs(_compact(nodes), _compact(edges), senders, receivers, node_offsets, edge_offsets, labels)


def _undirected(senders, receivers, edges, n_edge, max_nodes):
    """Each edge in both directions, once (OGB stores a bond once; PyG-derived data twice)."""
    graph = np.repeat(np.arange(len(n_edge), dtype=np.int64), n_edge)
    s = np.concatenate([senders, receivers])
    r = np.concatenate([receivers, senders])
    g = np.concatenate([graph, graph])
    m = int(max_nodes) + 1
    _, first = np.unique((g * m + s) * m + r, return_index=True)  # sorted: graphs stay contiguous
    counts = np.bincount(g[first], minlength=len(n_edge))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (s[first].astype(np.int32), r[first].astype(np.int32),
            np.concatenate([edges, edges])[first], offsets)


def _compact(features: np.ndarray) -> np.ndarray:
    """Integer codes in the smallest integer type that holds them; floats as float32."""
    if np.issubdtype(features.dtype, np.integer) or (features.size and np.all(features == np.round(features))):
        lo, hi = (int(features.min()), int(features.max())) if features.size else (0, 0)
        for kind in (np.int8, np.int16, np.int32):
            if np.iinfo(kind).min <= lo and hi <= np.iinfo(kind).max:
                return features.astype(kind)
    return features.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MolecularData:
    """Train / valid / test graphs of one dataset and its provenance."""

    name: str
    train: Graphs
    valid: Graphs
    test: Graphs
    info: dict

    @property
    def num_tasks(self) -> int:
        return self.train.labels.shape[1]

    @property
    def node_features(self) -> int:
        return self.train.nodes.shape[1]
