"""--init-scale: the weights (kernels and embedding tables) of the freshly initialized network are
multiplied by it, and nothing else; 1 changes nothing; bad values are refused before any run;
it is a run parameter, a sweep field, and a resumed run is not rescaled."""

from __future__ import annotations

import json
import math

import jax
import mlflow
import numpy as np
import pytest

from ntk_tracking import tracking
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.train import config_from_args, train_main, train_parser
from ntk_tracking.models import INIT_SCALED_LEAVES, scale_initial_params
from ntk_tracking.cli.sweep import parse_sweep, sweep_main
from ntk_tracking.tasks import TASK_NAMES, get_task
from ntk_tracking.train.tracked import check_init_scale
from conftest import child_config, interrupt_logging_at, metric_history

pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster

# Tiny configurations trained for 0 epochs: the run holds only the epoch-0 CV checkpoint, the
# initial network.
RUNS = {
    "mnist_dense": ["--width", "8", "--depth", "1", "--train-size", "64", "--test-size", "32", "--batch-size", "16"],
    "fuel_efficiency": ["--width", "8", "--depth", "1", "--train-size", "64", "--test-size", "32"],
    "mnist_vae": ["--hidden", "16", "--latents", "2", "--train-size", "64", "--test-size", "32",
                  "--batch-size", "16"],
}
EPOCH_ZERO = ["--epochs", "0", "--cv-log-points", "0", "--no-progress"]


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def scaled_leaf(path: str) -> bool:
    """Whether --init-scale multiplies this leaf of a CV checkpoint: a kernel or embedding under `params`."""
    return "['params']" in path and any(path.endswith(f"['{name}']") for name in INIT_SCALED_LEAVES)


def assert_scaled(scaled: dict, reference: dict, scale: float) -> None:
    assert scaled.keys() == reference.keys()
    multiplied = [p for p in reference if scaled_leaf(p)]
    assert multiplied and len(multiplied) < len(reference), sorted(reference)  # weights and something else
    for path, ref in reference.items():
        expected = ref * np.asarray(scale, ref.dtype) if scaled_leaf(path) else ref
        assert scaled[path].dtype == ref.dtype, path
        np.testing.assert_array_equal(scaled[path], expected, err_msg=path)


def initial_variables(task_name: str, run_id: str) -> dict:
    """The run's epoch-0 CV checkpoint (the network as initialized), by leaf path."""
    task = get_task(task_name)
    saved = tracking.load_json_artifact(run_id, tracking.CONFIG_ARTIFACT)
    config = task.config_from_dict(saved)
    data = task.load_data(config)
    abstract = task.abstract_variables(config, data, task.build_model(config, data))
    reader = CheckpointStore(run_id, mlflow.MlflowClient())
    assert reader.cv_epochs() == [0]
    return leaves(reader.restore_cv(0, abstract))


def all_runs():
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("task", sorted(RUNS))
def test_init_scale_multiplies_the_initial_weights_and_is_a_run_param(store, task):
    reference = train_main(task, RUNS[task] + EPOCH_ZERO)
    halved = train_main(task, RUNS[task] + EPOCH_ZERO + ["--init-scale", "0.5"])
    client = mlflow.MlflowClient()
    assert client.get_run(reference).data.params["init_scale"] == "1.0"
    assert client.get_run(halved).data.params["init_scale"] == "0.5"
    assert_scaled(initial_variables(task, halved), initial_variables(task, reference), 0.5)
    # The initial network computes something else: the epoch-0 loss moves.
    assert metric_history(halved, "train/loss")[0][1] != pytest.approx(metric_history(reference, "train/loss")[0][1])


# Direct: every task's init_state, without MLflow (the trainer of each: supervised, image
# classifier with BatchNorm, VAE, tagger, GCN with LayerNorm, PPO's actor and critic).
TINY_CONFIGS = {
    "mnist_cnn": dict(width=4, depth=1, train_size=32, test_size=16),
    "cifar_resnet": dict(dataset="mnist5k", model="resnet_tiny", width=0.125, train_size=40, test_size=20,
                         batch_size=20),
    "molpcba_gnn": dict(dataset="molecules-offline", latent_size=8, message_passing_steps=2, mlp_layers=1,
                        batch_size=4, train_size=40, test_size=20, probe_pool=8),
    "pong_actor_critic": dict(num_envs=2, num_steps=8, num_minibatches=2, update_epochs=1, channels=2, hidden=8,
                              max_steps=40, eval_envs=2, probe_states=12),
    "greek_pos": dict(model_dim=8, num_heads=2, num_layers=1, mlp_dim=8, max_length=8, probe_max_tokens=8,
                      batch_size=4, min_count=1),
}


@pytest.fixture
def greek_treebank(tmp_path):
    from real_format import corpus

    folder = tmp_path / "UD_Tiny"
    folder.mkdir()
    for split, (n, seed) in {"train": (15, 0), "dev": (5, 1), "test": (6, 2)}.items():
        (folder / f"xx_tiny-ud-{split}.conllu").write_text(corpus(n, seed), encoding="utf-8")
    return folder


@pytest.mark.parametrize("task_name", sorted(TINY_CONFIGS))
def test_every_trainer_scales_only_the_weights(task_name, request):
    task = get_task(task_name)
    overrides = dict(TINY_CONFIGS[task_name])
    if task_name == "greek_pos":
        overrides["dataset"] = str(request.getfixturevalue("greek_treebank"))
    config = task.config(**overrides).validate()
    data = task.load_data(config)
    model = task.build_model(config, data)  # init_scale changes no architecture: one model, one dataset
    states = {s: task.init_state(config if s == 1 else task.config(**overrides, init_scale=s).validate(),
                                 data, model) for s in (1, 0.25)}
    assert_scaled(leaves(task.cv_variables(states[0.25])), leaves(task.cv_variables(states[1])), 0.25)
    scaled_config = task.config(**overrides, init_scale=0.25).validate()
    check_init_scale(task, scaled_config, data, model, states[0.25])  # the run-start check agrees
    if task_name == "greek_pos":  # the learned position table is not a kernel or an embedding
        positions = leaves(task.cv_variables(states[0.25]))["['params']['positions']"]
        np.testing.assert_array_equal(positions, leaves(task.cv_variables(states[1]))["['params']['positions']"])


def test_default_scale_returns_the_parameters_themselves():
    params = {"Dense_0": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
              "Embed_0": {"embedding": np.ones((4, 2), np.float32)}, "LayerNorm_0": {"scale": np.ones(3, np.float32)}}
    assert scale_initial_params(params, 1.0) is params
    halved = scale_initial_params(params, 0.5)
    assert float(halved["Dense_0"]["kernel"][0, 0]) == 0.5 and float(halved["Embed_0"]["embedding"][0, 0]) == 0.5
    assert float(halved["LayerNorm_0"]["scale"][0]) == 1.0 and float(halved["Dense_0"]["bias"][0]) == 0.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_init_scale_is_refused_before_any_run(store, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train_main("mnist_dense", RUNS["mnist_dense"] + EPOCH_ZERO + ["--init-scale", value])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "init_scale must be a finite number > 0" in err and "--init-scale 0.5" in err, err
    assert all_runs() == []
    assert not (store / "mlruns").exists() or not any((store / "mlruns").rglob("checkpoints"))


def test_a_resumed_run_is_not_rescaled(store, monkeypatch, capsys):
    """Killed after epoch 2's resume checkpoint and resumed: the same numbers as a run never
    killed (a resumed run rescaling its restored, trained parameters would differ from epoch 3 on)."""
    argv = RUNS["mnist_dense"] + ["--epochs", "3", "--cv-every", "1", "--resume-interval-seconds", "0",
                                  "--no-progress", "--init-scale", "0.5"]
    reference = train_main("mnist_dense", argv)
    real_log = interrupt_logging_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train_main("mnist_dense", argv)
    monkeypatch.setattr(tracking, "log_metrics", real_log)
    (interrupted,) = [r.info.run_id for r in all_runs() if r.info.run_id != reference]
    monkeypatch.setenv("MLFLOW_RUN_ID", interrupted)
    capsys.readouterr()
    assert train_main("mnist_dense", argv) == interrupted
    assert "after epoch 2" in capsys.readouterr().out
    for key in ("train/loss", "test/loss"):
        resumed, ref = metric_history(interrupted, key), metric_history(reference, key)
        assert [s for s, _ in resumed] == [0, 1, 2, 3], key
        np.testing.assert_allclose([v for _, v in resumed], [v for _, v in ref], rtol=1e-6, err_msg=key)
    task = get_task("mnist_dense")
    config = task.config_from_dict(tracking.load_json_artifact(reference, tracking.CONFIG_ARTIFACT))
    data = task.load_data(config)
    abstract = task.abstract_variables(config, data, task.build_model(config, data))
    client = mlflow.MlflowClient()
    last = [leaves(CheckpointStore(r, client).restore_cv(3, abstract)) for r in (reference, interrupted)]
    for path in last[0]:
        np.testing.assert_allclose(last[1][path], last[0][path], rtol=1e-6, atol=1e-7, err_msg=path)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_sweeps_over_init_scale(task, tmp_path):
    spec, _ = parse_sweep(["--task", task, "--grid", "init_scale=1,0.5", "--epochs", "1"])
    assert spec.grid == {"init_scale": [1.0, 0.5]}
    assert [spec.key(p) for p in spec.points()] == ["init_scale=1.0", "init_scale=0.5"]
    for point in spec.points():
        config, argv, path = child_config(spec, point, tmp_path)
        assert repr(json.loads(path.read_text())["init_scale"]) == repr(point["init_scale"])  # a float
        assert config == spec.config(point)
        assert config_from_args(task, train_parser(task).parse_args(argv)) == spec.config(point)
        assert spec.config(point).init_scale == point["init_scale"]


def test_a_sweep_over_a_bad_init_scale_is_refused_before_any_run(store, capsys):
    with pytest.raises(SystemExit):
        sweep_main(["--task", "mnist_vae", "--grid", "init_scale=1,0", "--epochs", "0", "--no-progress"])
    assert "init_scale must be a finite number > 0" in capsys.readouterr().err
    assert all_runs() == []


def test_the_option_is_declared_once_for_every_task():
    """One TaskConfig field: every task has it, with the same default and help."""
    from ntk_tracking.tasks.base import TaskConfig, cli_fields

    (base,) = [f for f in cli_fields(TaskConfig) if f.name == "init_scale"]
    for name in TASK_NAMES:
        task = get_task(name)
        (field,) = [f for f in cli_fields(task.config_class) if f.name == "init_scale"]
        assert field.metadata == base.metadata and task.default_config().init_scale == 1.0
        assert math.isclose(task.config(init_scale=0.5).validate().init_scale, 0.5)


def test_a_task_that_ignores_init_scale_fails_loudly(store, monkeypatch):
    """A trainer that leaves its new network unscaled is caught at the run's start, against the same
    initialization at scale 1, instead of training at the default scale under a scaled run's name."""
    from ntk_tracking.train import vae

    monkeypatch.setattr(vae, "scale_initial_params", lambda params, scale: params)
    with pytest.raises(RuntimeError, match="does not apply --init-scale 0.5.*scale_initial_params"):
        train_main("mnist_vae", RUNS["mnist_vae"] + EPOCH_ZERO + ["--init-scale", "0.5"])
