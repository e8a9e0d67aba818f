"""Padded jraph batches from compact Graphs: fixed node/edge/graph budgets, one compiled shape.

Training and evaluation batch with `jraph.dynamically_batch`; the NTK pads each molecule alone
to a per-point budget, so every point's pytree has the same shapes. Never imports models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jraph
import numpy as np

from ntk_tracking.data.ogbg import Graphs


@dataclasses.dataclass(frozen=True)
class Budget:
    """Nodes, edges and graphs of one padded batch (one node and one graph go to padding)."""

    n_node: int
    n_edge: int
    n_graph: int


def _next_power_of_two(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def budget_for(graphs: Graphs, batch_size: int, n_node: int = 0, n_edge: int = 0) -> Budget:
    """Budgets for `batch_size` graphs per batch: the next power of two above the mean size times
    batch_size, and at least the largest graph plus padding (0 = choose automatically)."""
    mean_nodes = float(graphs.n_node.mean()) if len(graphs) else 1.0
    mean_edges = float(graphs.n_edge.mean()) if len(graphs) else 1.0
    auto_nodes = max(_next_power_of_two(mean_nodes * batch_size), int(graphs.n_node.max(initial=0)) + 1)
    auto_edges = max(_next_power_of_two(mean_edges * batch_size), int(graphs.n_edge.max(initial=0)), 1)
    return Budget(n_node or auto_nodes, n_edge or auto_edges, batch_size + 1)


def check_budget(graphs: Graphs, budget: Budget, what: str = "graphs", node_flag: str = "--node-budget",
                 edge_flag: str = "--edge-budget") -> None:
    """ValueError naming the budget to raise when a graph does not fit in one padded batch."""
    if not len(graphs):
        return
    big_n, big_e = int(graphs.n_node.max()), int(graphs.n_edge.max())
    if big_n > budget.n_node - 1:
        raise ValueError(
            f"{what}: graph {int(graphs.n_node.argmax())} has {big_n} nodes but the node budget {budget.n_node} "
            f"holds at most {budget.n_node - 1} (one node pads); raise {node_flag} to at least {big_n + 1}")
    if big_e > budget.n_edge:
        raise ValueError(
            f"{what}: graph {int(graphs.n_edge.argmax())} has {big_e} edges but the edge budget is "
            f"{budget.n_edge}; raise {edge_flag} to at least {big_e}")
    if budget.n_graph < 2:
        raise ValueError(f"the graph budget must be ≥ 2 (one graph pads), got {budget.n_graph}")


def single_graphs(graphs: Graphs, order=None) -> Iterator[jraph.GraphsTuple]:
    """One float32 GraphsTuple per molecule; `globals` holds its labels (1, T), NaN = missing."""
    order = range(len(graphs)) if order is None else order
    for i in order:
        g = graphs.graph(int(i))
        yield jraph.GraphsTuple(
            nodes=g["nodes"], edges=g["edges"], senders=g["senders"], receivers=g["receivers"],
            n_node=np.array([len(g["nodes"])], np.int32), n_edge=np.array([len(g["senders"])], np.int32),
            globals=g["labels"][None])


def batches(graphs: Graphs, budget: Budget, order=None) -> Iterator[jraph.GraphsTuple]:
    """Padded batches of the graphs in `order` (default: stored order), float32 features."""
    check_budget(graphs, budget)
    for batch in jraph.dynamically_batch(single_graphs(graphs, order), budget.n_node, budget.n_edge,
                                         budget.n_graph):
        yield _as_float32(batch)


def count_batches(graphs: Graphs, budget: Budget, order=None) -> int:
    """How many batches `batches` yields, from the graphs' sizes alone (jraph.dynamically_batch's
    greedy rule: a batch closes when the next graph would overflow a budget, one node and one
    graph kept for padding)."""
    order = range(len(graphs)) if order is None else order
    n_nodes, n_edges = graphs.n_node.tolist(), graphs.n_edge.tolist()
    count, nodes, edges, members = 0, 0, 0, 0
    for i in order:
        a, b = n_nodes[int(i)], n_edges[int(i)]
        if members and (members + 1 > budget.n_graph - 1 or nodes + a > budget.n_node - 1
                        or edges + b > budget.n_edge):
            count, nodes, edges, members = count + 1, 0, 0, 0
        nodes, edges, members = nodes + a, edges + b, members + 1
    return count + (1 if members else 0)


def _as_float32(g: jraph.GraphsTuple) -> jraph.GraphsTuple:
    return g._replace(nodes=g.nodes.astype(np.float32), edges=g.edges.astype(np.float32),
                      globals=g.globals.astype(np.float32), senders=g.senders.astype(np.int32),
                      receivers=g.receivers.astype(np.int32), n_node=g.n_node.astype(np.int32),
                      n_edge=g.n_edge.astype(np.int32))


def point_budget(graphs: Graphs) -> Budget:
    """The per-point budget of the NTK: the largest graph plus one padding node (two graphs)."""
    return Budget(int(graphs.n_node.max(initial=0)) + 1, max(int(graphs.n_edge.max(initial=0)), 1), 2)


def padded_points(graphs: Graphs, budget: Budget | None = None) -> dict[str, np.ndarray]:
    """Every molecule padded alone to the same budget, stacked on a leading point axis.

    Per point: nodes (N, F), edges (E, F_e), senders/receivers (E,), n_node and n_edge (2,): the
    molecule, then one padding graph holding the padding nodes and edges.
    """
    budget = budget or point_budget(graphs)
    check_budget(graphs, budget, "NTK probe set", "the probe budget", "the probe budget")
    points = [jraph.pad_with_graphs(g, budget.n_node, budget.n_edge, 2) for g in single_graphs(graphs)]
    points = [_as_float32(p) for p in points]
    fields = ("nodes", "edges", "senders", "receivers", "n_node", "n_edge")
    return {f: np.stack([getattr(p, f) for p in points]) for f in fields}


def labels_of(graphs: Graphs) -> np.ndarray:
    """(n, T) float32 labels, NaN = missing."""
    return graphs.labels.astype(np.float32)
