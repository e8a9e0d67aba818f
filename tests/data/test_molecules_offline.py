"""molecules-offline: real molecules from a wheel, featurized as OGB's smiles2graph, trained and analyzed."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from conftest import use_tracking_store
from ntk_tracking.data import molecules_offline as mo
from ntk_tracking.data.ogbg import load_molpcba

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_atom_and_bond_features_follow_ogb_vocabularies():
    """Hand-derived OGB features: ethanol's carbon 1 and oxygen, benzene's aromatic bonds."""
    g = mo.smiles_to_graph("CCO")
    # atomic number 6 -> index 5; CHI_UNSPECIFIED; total degree 4; charge 0 -> index 5; 3 H; no
    # radical; SP3 -> 2; not aromatic; not in a ring.
    assert g["nodes"][0].tolist() == [5, 0, 4, 5, 3, 0, 2, 0, 0]
    assert g["nodes"][2].tolist() == [7, 0, 2, 5, 1, 0, 2, 0, 0]  # O: number 8, degree 2, one H
    assert g["edges"].tolist() == [[0, 0, 0], [0, 0, 0]]  # single, no stereo, not conjugated
    assert sorted(zip(g["senders"], g["receivers"])) == [(0, 1), (1, 2)]
    benzene = mo.smiles_to_graph("c1ccccc1")
    assert len(benzene["nodes"]) == 6 and len(benzene["edges"]) == 6
    assert benzene["edges"].tolist() == [[3, 0, 1]] * 6  # aromatic, no stereo, conjugated
    assert set(benzene["nodes"][:, 6]) == {1} and set(benzene["nodes"][:, 7]) == {1}  # SP2, aromatic
    assert mo.smiles_to_graph("[Na+].[Cl-]")["nodes"][:, 3].tolist() == [6, 4]  # formal charges +1, -1
    with pytest.raises(ValueError, match="cannot parse"):
        mo.smiles_to_graph("C1CC(")


def write_sdf(path, records):
    from rdkit import Chem

    writer = Chem.SDWriter(str(path))
    for smiles, cls in records:
        mol = Chem.MolFromSmiles(smiles)
        mol.SetProp("SOL_classification", cls)
        mol.SetProp("SOL", "-1.0")
        writer.write(mol)
    writer.close()


def test_sdf_fixture_in_the_shipped_format_gives_graphs_and_labels(tmp_path):
    records = [("CCO", "(C) high"), ("c1ccccc1", "(A) low"), ("CC(=O)O", "(B) medium"), ("CCCCCC", "(A) low")] * 3
    write_sdf(tmp_path / mo.FILES["train"], records)
    write_sdf(tmp_path / mo.FILES["test"], records[:4])
    splits, info = mo.load_splits(str(tmp_path))
    assert len(splits["train"]) + len(splits["valid"]) == 12 and len(splits["test"]) == 4
    test = splits["test"]
    assert test.labels.astype(float).tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert test.n_node.tolist() == [3, 6, 4, 6]
    assert test.n_edge.tolist() == [4, 12, 6, 10]  # each bond in both directions
    assert info["stand_in_for"] == "ogbg-molpcba"
    write_sdf(tmp_path / mo.FILES["test"], [("CCO", "(D) unknown")])
    with pytest.raises(ValueError, match="unknown solubility classes"):
        mo.load_splits(str(tmp_path))


def test_the_bundled_set_loads_offline_with_its_published_split():
    data = load_molpcba("molecules-offline")
    assert (len(data.train), len(data.valid), len(data.test)) == (923, 102, 257)
    assert data.num_tasks == 3 and data.node_features == 9
    labels = np.concatenate([data.train.labels, data.valid.labels, data.test.labels]).astype(float)
    assert np.all(labels.sum(1) == 1)  # one class per molecule, none missing
    assert data.info["stand_in_for"] == "ogbg-molpcba"


def test_molpcba_gnn_trains_and_is_analyzed_on_molecules_offline(tmp_path, monkeypatch):
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    use_tracking_store(monkeypatch, tmp_path)
    run_id = train_main("molpcba_gnn", ["--dataset", "molecules-offline", "--epochs", "2", "--latent-size", "8",
                                        "--message-passing-steps", "1", "--mlp-layers", "1", "--batch-size", "64",
                                        "--train-size", "128", "--test-size", "64", "--train-eval-size", "64",
                                        "--probe-pool", "16", "--no-progress"])
    assert analyze_main([run_id, "--subsets", "2", "--points", "4", "--no-progress"]) == [0, 1, 2]
    run = mlflow.MlflowClient().get_run(run_id)
    m = run.data.metrics
    assert np.isfinite(m["test/mean_ap"]) and 0 < m["test/mean_ap"] <= 1
    for key in ("ntk/entropy/train", "ntk/entropy/test", "ntk/trace/train", "ntk/trace/test"):
        assert np.isfinite(m[key]) and m[key] > 0
    assert 0 < m["ntk/entropy/train"] <= np.log(4) + 1e-6
