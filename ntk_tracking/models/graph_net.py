"""Graph convolutional network on jraph GraphsTuples (the flax examples/ogbg_molpcba GCN).

Embed nodes, then `message_passing_steps` rounds of a self-looped, symmetrically normalized
graph convolution whose node update is an MLP (dropout after each layer), with skip
connections and LayerNorm; mean-pool nodes per graph and decode to one logit per task.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph


class MLP(nn.Module):
    """Dense layers with ReLU and dropout after each."""

    sizes: Sequence[int]
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        for size in self.sizes:
            x = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(nn.relu(nn.Dense(size)(x)))
        return x


class GraphConvNet(nn.Module):
    """GCN + mean pooling; returns (n_graph, num_outputs) logits, padding graphs included."""

    num_outputs: int = 128
    latent_size: int = 256
    num_mlp_layers: int = 2
    message_passing_steps: int = 5
    dropout_rate: float = 0.1
    skip_connections: bool = True
    layer_norm: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple) -> jax.Array:
        nodes = nn.Dense(self.latent_size)(jnp.asarray(graphs.nodes, jnp.result_type(float)))
        graphs = graphs._replace(nodes=nodes, edges=None, globals=None)
        for _ in range(self.message_passing_steps):
            mlp = MLP([self.latent_size] * self.num_mlp_layers, self.dropout_rate, self.deterministic)
            conv = jraph.GraphConvolution(update_node_fn=mlp, add_self_edges=True)
            new_nodes = conv(graphs).nodes
            nodes = new_nodes + graphs.nodes if self.skip_connections else new_nodes
            if self.layer_norm:
                nodes = nn.LayerNorm()(nodes)
            graphs = graphs._replace(nodes=nodes)
        pooled = mean_pool(graphs)
        return nn.Dense(self.num_outputs)(pooled)


def make(config, data_info: dict) -> GraphConvNet:
    """The GCN a task config describes (`latent_size`, `mlp_layers`, `message_passing_steps`,
    `dropout_rate`; skip connections and LayerNorm on, as in the flax example) with
    `data_info["num_outputs"]` task logits, dropout off (`model.clone(deterministic=False)` trains)."""
    return GraphConvNet(num_outputs=data_info["num_outputs"], latent_size=config.latent_size,
                        num_mlp_layers=config.mlp_layers, message_passing_steps=config.message_passing_steps,
                        dropout_rate=config.dropout_rate, skip_connections=True, layer_norm=True, deterministic=True)


def mean_pool(graphs: jraph.GraphsTuple) -> jax.Array:
    """Mean of each graph's node features (zero for graphs without nodes)."""
    n_graph = graphs.n_node.shape[0]
    graph_of_node = jnp.repeat(jnp.arange(n_graph), graphs.n_node, total_repeat_length=graphs.nodes.shape[0])
    return jraph.segment_mean(graphs.nodes, graph_of_node, n_graph)


def merge_points(points: dict) -> jraph.GraphsTuple:
    """One GraphsTuple from per-point padded graphs stacked on a leading axis (m, ...).

    Point p's nodes move to rows p·N..p·N+N-1, so its edge indices shift by p·N; its graphs
    become graphs 2p (the molecule) and 2p + 1 (padding).
    """
    m, n_max = points["nodes"].shape[:2]
    shift = (jnp.arange(m) * n_max)[:, None]
    return jraph.GraphsTuple(
        nodes=points["nodes"].reshape(m * n_max, -1),
        edges=points["edges"].reshape(-1, points["edges"].shape[-1]),
        senders=(points["senders"] + shift).reshape(-1),
        receivers=(points["receivers"] + shift).reshape(-1),
        n_node=points["n_node"].reshape(-1), n_edge=points["n_edge"].reshape(-1), globals=None)


def point_logits(model: nn.Module, variables, points: dict) -> jax.Array:
    """(m, num_outputs): each point's molecule's logits (its padding graph dropped)."""
    logits = model.apply(variables, merge_points(points))
    return logits.reshape(points["nodes"].shape[0], -1, logits.shape[-1])[:, 0]
