"""mnist_vae: data in [0, 1], the ELBO against closed forms, the NTK maps, the loop, end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking import NTK
from ntk_tracking.models.vae import VAE, bernoulli_nll, gaussian_kl
from ntk_tracking.tasks import get_task

TASK = get_task("mnist_vae")


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


def test_mnist5k_pixels_are_exactly_p_over_255():
    data = TASK.load_data(TASK.config(train_size=50, test_size=20))
    assert data.x_train.shape == (50, 784) and data.x_train.dtype == np.float32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    np.testing.assert_array_equal(np.rint(data.x_train * 255) / 255, data.x_train)


def test_the_hub_mnist_reads_through_the_existing_loader(monkeypatch):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(n):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in rng.integers(0, 256, (n, 28, 28),
                                                                                            np.uint8)],
                                           "label": list(range(n))}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", lambda repo: datasets.DatasetDict(train=split(10), test=split(5)))
    data = TASK.load_data(TASK.config(dataset="ylecun/mnist"))
    assert data.x_train.shape == (10, 784) and data.x_test.shape == (5, 784)


def test_bad_inputs_raise_clear_value_errors(tmp_path):
    import datasets
    from PIL import Image

    with pytest.raises(ValueError, match="No such file or folder"):
        TASK.load_data(TASK.config(dataset=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="28×28 single-channel"):
        TASK.load_data(TASK.config(dataset="autompg"))
    images = [Image.fromarray(a) for a in np.zeros((6, 32, 32), np.uint8)]
    path = tmp_path / "mnist32.parquet"
    datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"shape \(32, 32, 1\)"):
        TASK.load_data(TASK.config(dataset=str(path)))
    for field, value in (("latents", 0), ("hidden", -1), ("learning_rate", 0.0), ("batch_size", 0)):
        with pytest.raises(ValueError, match=field):
            TASK.config(**{field: value}).validate()


def test_loss_terms_match_closed_forms():
    logits = jnp.array([[0.0, 2.0, -1.0]])
    x = jnp.array([[0.5, 1.0, 0.0]])
    expected = -np.sum(np.asarray(x) * np.log(jax.nn.sigmoid(logits)) + (1 - np.asarray(x)) *
                       np.log(1 - jax.nn.sigmoid(logits)))
    np.testing.assert_allclose(bernoulli_nll(logits, x), [expected], rtol=1e-6)
    mean, logvar = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, np.log(4.0)]])
    # KL(N(1, 1) ‖ N(0, 1)) = ½, KL(N(0, 4) ‖ N(0, 1)) = ½ (4 − 1 − ln 4).
    np.testing.assert_allclose(gaussian_kl(mean, logvar), [0.5 + 0.5 * (3 - np.log(4.0))], rtol=1e-6)


@pytest.mark.parametrize("impl", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("network", ["model", "encoder"])
def test_ntk_of_the_vae_maps_matches_float64_brute_force(impl, network, x64):
    config = TASK.config(hidden=7, latents=3)
    x = np.random.default_rng(0).random((3, 16))  # 4×4 "images": the maps are the same for 784 pixels
    data = type("Data", (), {"x_train": x, "x_test": x})()
    apply_fn = TASK.probe(config, data, TASK.build_model(config, data)).networks[network]
    params = VAE(hidden=7, latents=3, outputs=16).init(jax.random.PRNGKey(0), jnp.zeros((1, 16)),
                                                       jax.random.PRNGKey(1))
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), {"params": params["params"]})
    flat, unravel = ravel_pytree(variables["params"])
    jac = jax.jit(jax.jacfwd(lambda t: apply_fn({"params": unravel(t)}, x).reshape(3, -1)))(flat)
    expected = np.einsum("iok,jok->ij", jac, jac)
    assert jac.shape[1] == (16 if network == "model" else 3)
    kernel = np.asarray(NTK(apply_fn, impl, block_size=2)(variables, x))
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_the_vae_learns_and_a_resumed_run_repeats_an_uninterrupted_one():
    config = TASK.config(train_size=200, test_size=100, epochs=3, batch_size=20, hidden=64).validate()
    data = TASK.load_data(config)
    model = TASK.build_model(config, data)
    state = TASK.init_state(config, data, model)
    log, states = {}, {}

    def record(epoch, s, metrics):
        log[epoch], states[epoch] = metrics, s

    final = TASK.fit(config, data, model, state, 0, record, progress=False)
    assert sorted(log) == [0, 1, 2, 3]
    for split in ("train", "test"):
        assert set(log[3]) >= {f"{split}/loss", f"{split}/reconstruction", f"{split}/kl"}
        np.testing.assert_allclose(log[3][f"{split}/loss"], log[3][f"{split}/reconstruction"] + log[3][f"{split}/kl"],
                                   rtol=1e-5)
    assert log[3]["test/loss"] < 0.6 * log[0]["test/loss"]
    resumed = TASK.fit(config, data, model, states[1], 1, lambda *a: None, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(final.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a whole run through MLflow in processes of its own: the fast tier leaves it out
def test_train_checkpoint_analyze_end_to_end_with_pictures(store):
    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main

    run_id = train_main("mnist_vae", ["--epochs", "2", "--train-size", "100", "--test-size", "40", "--hidden", "32",
                                      "--batch-size", "25", "--cv-every", "2", "--cv-log-points", "0",
                                      "--no-progress"])
    client = mlflow.MlflowClient()
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 2]
    metrics = client.get_run(run_id).data.metrics
    assert {"train/loss", "test/loss", "train/reconstruction", "test/reconstruction", "train/kl",
            "test/kl"} <= set(metrics)
    assert analyze_main([run_id, "--subsets", "1", "--points", "3", "--no-progress"]) == [0, 2]
    metrics = client.get_run(run_id).data.metrics
    for key in ("ntk/entropy/train", "ntk/encoder/entropy/train", "ntk/trace/test", "ntk/encoder/trace/test"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    pictures = {a.path for a in client.list_artifacts(run_id, "analysis/vae")}
    assert pictures == {"analysis/vae/epoch_000000.png", "analysis/vae/epoch_000002.png"}
