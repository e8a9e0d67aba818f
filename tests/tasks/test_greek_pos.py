"""greek_pos: CoNLL-U loading, the transformer tagger, its masked metrics and NTK, the tracked pipeline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking.data.ud_pos import (FEATURES, HELD_OUT_FRACTION, TAGSETS, find_splits, load_ud_pos,
                                      most_frequent_tag_baseline, read_conllu)
from ntk_tracking.tasks import get_task
from ntk_tracking.tasks.greek_pos import TAGSETS as CONFIG_TAGSETS
from conftest import use_tracking_store
from real_format import NFD_ANTHROPOS, corpus, sentence_text, token_line

TASK = get_task("greek_pos")
TINY = dict(model_dim=8, num_heads=2, num_layers=1, mlp_dim=8, max_length=8, probe_max_tokens=8,
            batch_size=4, min_count=1, dropout_rate=0.0, attention_dropout_rate=0.0, word_dropout=0.0)


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


def test_reader_skips_ranges_and_empty_nodes_and_normalizes_forms(treebank):
    sentences = read_conllu(treebank / "xx_tiny-ud-train.conllu")
    special = sentences[0]
    assert special.forms == ("ὁ", "ἄνθρωπος", "καὶ", "οὐ", "λέγει", ".")
    assert special.tags == ("DET", "NOUN", "CCONJ", "ADV", "VERB", "PUNCT")
    assert NFD_ANTHROPOS != "ἄνθρωπος" and special.forms[1] == "ἄνθρωπος"
    xpos = read_conllu(treebank / "xx_tiny-ud-train.conllu", "xpos")[0]
    assert xpos.tags[1] == "n-s---mn-"
    assert CONFIG_TAGSETS == tuple(TAGSETS)


def test_loader_encodes_padded_pieces(treebank):
    data = load_ud_pos(treebank, max_length=4, min_count=1)
    assert set(data.splits) == {"train", "dev", "test"}
    train = data.splits["train"]
    assert train.features.shape[1:] == (4, len(FEATURES)) and train.features.dtype == np.int32
    assert int(train.mask.sum()) == sum(len(s.forms) for s in data.sentences["train"])  # no token lost
    assert (train.features[~train.mask] == 0).all() and (train.features[train.mask] > 0).all()
    # Composed and decomposed spellings are one word: the special sentence's ἄνθρωπος is known.
    word = data.vocab.features[0]
    assert "ἄνθρωπος" in word and NFD_ANTHROPOS not in word
    assert data.info["train_sentences"] == 16 and "official splits" in data.info["splits_note"]


def test_lone_dev_file_is_split_deterministically_into_train_and_test(tmp_path):
    path = tmp_path / "only-ud-dev.conllu"
    path.write_text(corpus(20, 3), encoding="utf-8")
    for source in (tmp_path, path):
        data = load_ud_pos(source, min_count=1)
        assert set(data.splits) == {"train", "test"}
        assert len(data.sentences["test"]) == round(20 * HELD_OUT_FRACTION)
        assert len(data.sentences["train"]) + len(data.sentences["test"]) == 20
        assert "split by sentence" in data.info["splits_note"]
    again = load_ud_pos(path, min_count=1, seed=5)
    assert again.sentences["test"] == data.sentences["test"]  # the split ignores the training seed


def test_malformed_conllu_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad-ud-train.conllu"
    good = sentence_text(["ὁ", "λόγος", "."], "ok")
    path.write_text(good + "# sent_id = bad\n1\tὁ\t_\tDET\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad-ud-train\.conllu: line 7: expected 10 tab-separated"):
        read_conllu(path)
    path.write_text(good + token_line("x", "ὁ", "DET") + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 6: bad token ID 'x'"):
        read_conllu(path)
    path.write_text(token_line(1, "ὁ", "DET", "_") + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: token 'ὁ' has no XPOS tag"):
        read_conllu(path, "xpos")


def test_unknown_tagset_is_refused(treebank):
    with pytest.raises(ValueError, match="unknown tagset 'feats'"):
        load_ud_pos(treebank, tagset="feats")
    with pytest.raises(ValueError, match="unknown tagset 'feats'"):
        TASK.config(tagset="feats").validate()


def test_folder_without_the_expected_files(tmp_path):
    (tmp_path / "README.md").write_text("no treebank here")
    with pytest.raises(ValueError, match=r"holds no \*-ud-train\.conllu"):
        find_splits(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_ud_pos(tmp_path / "missing")


def test_most_frequent_tag_baseline_with_suffix_fallback():
    from ntk_tracking.data.ud_pos import Sentence

    train = [Sentence(("ὁ", "λόγος", "λέγει"), ("DET", "NOUN", "VERB")),
             Sentence(("λόγος",), ("VERB",)), Sentence(("λόγος",), ("NOUN",))]
    test = [Sentence(("ὁ", "λόγος", "νόμος", "γράφει", "ξ"), ("DET", "NOUN", "NOUN", "VERB", "NOUN"))]
    # seen forms by majority; νόμος via suffix "ος", γράφει via "ει"; ξ falls back to NOUN (commonest)
    assert most_frequent_tag_baseline(train, test) == 1.0


def tiny_setup(treebank, **overrides):
    config = TASK.config(dataset=str(treebank), **{**TINY, **overrides}).validate()
    data = TASK.load_data(config)
    model = TASK.build_model(config, data)
    return config, data, model, TASK.init_state(config, data, model)


def test_lookup_and_multi_hot_embeddings_are_the_same_function(treebank):
    config, data, model, state = tiny_setup(treebank)
    probe = TASK.probe(config, data, model)
    inputs = probe.sets["train"].inputs
    np.testing.assert_allclose(probe.networks["model"]({"params": state.params}, inputs),
                               state.apply_fn({"params": state.params}, inputs), rtol=1e-5, atol=1e-6)


def brute_force_ntk(apply_fn, variables, x, mask):
    flat, unravel = ravel_pytree(variables)
    jac = jax.jit(jax.jacrev(lambda v: (apply_fn(unravel(v), x) * mask[..., None]).reshape(len(mask), -1)))(flat)
    return jnp.einsum("iop,jop->ij", jac, jac)


@pytest.mark.parametrize("impl", ["jacobian", "ntvp", "structured"])
def test_ntk_matches_float64_brute_force_with_padding(treebank, x64, impl):
    from ntk_tracking.ntk import NTK

    config, data, model, state = tiny_setup(treebank)
    probe = TASK.probe(config, data, model)
    ps = probe.sets["test"]
    assert not ps.output_mask.all()  # padding present
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), {"params": state.params})
    apply_fn = probe.networks["model"]
    kernel = np.asarray(NTK(apply_fn, impl)(variables, ps.inputs, output_mask=ps.output_mask))
    assert kernel.dtype == np.float64
    reference = np.asarray(brute_force_ntk(apply_fn, variables, ps.inputs, ps.output_mask))
    assert np.abs(kernel - reference).max() / np.abs(reference).max() <= 1e-8


def test_padded_tokens_change_no_metric_and_no_kernel_entry(treebank, x64):
    from ntk_tracking.ntk import NTK
    from ntk_tracking.train.tagging import make_evaluate

    config, data, model, state = tiny_setup(treebank)
    probe = TASK.probe(config, data, model)
    ps = probe.sets["test"]
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), {"params": state.params})
    ntk = NTK(probe.networks["model"], "structured")
    kernel = np.asarray(ntk(variables, ps.inputs, output_mask=ps.output_mask))
    changed = dict(ps.inputs, features=np.where(ps.output_mask[..., None], ps.inputs["features"], 7))
    assert (changed["features"] != ps.inputs["features"]).any()
    np.testing.assert_allclose(ntk(variables, changed, output_mask=ps.output_mask), kernel, rtol=1e-12, atol=0)

    split = data.splits["test"]
    evaluate = make_evaluate(state.apply_fn)
    other = dataclasses.replace(split, features=np.where(split.mask[..., None], split.features, 3),
                                tags=np.where(split.mask, split.tags, 1))
    assert evaluate(state, other) == evaluate(state, split)


def fit_history(config, data, model, state, start=0):
    history = {}
    state = TASK.fit(config, data, model, state, start, lambda e, s, m: history.__setitem__(e, m), progress=False)
    return state, history


def test_tiny_config_learns_and_resumes_identically(treebank):
    config, data, model, state = tiny_setup(treebank, epochs=6, learning_rate=0.03, warmup_epochs=0.5,
                                     word_dropout=0.2, dropout_rate=0.1)
    final, history = fit_history(config, data, model, state)
    assert history[0]["train/accuracy"] < 0.5
    assert history[6]["train/accuracy"] > 0.9 and history[6]["test/accuracy"] > 0.9
    assert {"train/loss", "test/loss", "dev/accuracy", "test/accuracy"} <= set(history[6])
    assert history[6]["train/loss"] < history[0]["train/loss"] / 3
    # A run resumed from its state after epoch 1 ends where the uninterrupted run ends.
    short = dataclasses.replace(config, epochs=2)
    states = {}
    uninterrupted = TASK.fit(short, data, model, state, 0, lambda e, s, m: states.__setitem__(e, s), progress=False)
    resumed, _ = fit_history(short, data, model, states[1], start=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, uninterrupted.params, resumed.params)


def test_tagger_stops_inside_an_epoch_without_changing_training(treebank):
    from conftest import fit_in_stretches

    config, data, _, _ = tiny_setup(treebank, epochs=2, word_dropout=0.2, dropout_rate=0.1, cv_steps="1,2,5")
    n = TASK.steps_per_epoch(config, data)  # 16 sentences in batches of 4
    assert n == 4
    points = fit_in_stretches(TASK, config, data, [1, 2, 5])
    assert [(step, end) for step, _, end in points] == [(0, True), (1, False), (2, False), (4, True), (5, False),
                                                        (8, True)]
    assert [epoch for _, epoch, _ in points] == [0.0, 0.25, 0.5, 1.0, 1.25, 2.0]


@pytest.mark.slow  # a whole run through MLflow in processes of its own: the fast tier leaves it out
def test_train_checkpoint_analyze_through_mlflow(treebank, tmp_path, monkeypatch):
    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main
    from ntk_tracking import tracking

    use_tracking_store(monkeypatch, tmp_path)
    argv = ["--dataset", str(treebank), "--epochs", "2", "--cv-every", "1", "--no-progress"]
    for name, value in TINY.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    try:
        run_id = train_main("greek_pos", argv)
        client = mlflow.MlflowClient()
        metrics = client.get_run(run_id).data.metrics
        assert {"train/accuracy", "test/accuracy", "dev/accuracy", "train/loss", "test/loss"} <= set(metrics)
        assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2]
        info = tracking.load_json_artifact(run_id, "data.json")
        assert info["tagset"] == "upos" and 0 < info["baseline_test_accuracy"] <= 1
        assert analyze_main([run_id, "--subsets", "2", "--points", "3", "--no-progress"]) == [0, 1, 2]
        for split in ("train", "test"):
            history = client.get_metric_history(run_id, f"ntk/entropy/{split}")
            assert sorted(m.step for m in history) == [0, 1, 2]
            assert all(0 < m.value <= np.log(3) + 1e-6 for m in history)
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
