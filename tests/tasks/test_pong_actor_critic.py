"""The RL task: PPO actor-critic on Pong through the real train → checkpoint → analyze loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import mlflow
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking import NTK, tracking
from ntk_tracking.checkpointing import CheckpointStore
from ntk_tracking.cli.analyze import analyze_main
from ntk_tracking.cli.train import train_main
from ntk_tracking.tasks import get_task
from conftest import metric_history

TASK = "pong_actor_critic"
TINY = ["--epochs", "4", "--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "1",
        "--channels", "2", "--hidden", "8", "--max-steps", "40", "--eval-envs", "2", "--probe-states", "12",
        "--cv-every", "2", "--cv-log-points", "0", "--resume-interval-seconds", "0", "--no-progress"]
TINY_ANALYSIS = ["--subsets", "2", "--points", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


def tiny_config(**overrides):
    values = dict(epochs=4, num_envs=2, num_steps=8, num_minibatches=2, update_epochs=1, channels=2, hidden=8,
                  max_steps=40, eval_envs=2, probe_states=12)
    values.update(overrides)
    return get_task(TASK).config(**values).validate()


# -- bad input: a clear ValueError before any run exists ------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (dict(env="Breakout-MinAtar"), "unknown environment"),
    (dict(num_envs=0), "num_envs"),
    (dict(num_envs=3, num_steps=5, num_minibatches=2), "does not split into 2 equal minibatches"),
    (dict(learning_rate=-1e-3), "learning_rate must be positive"),
])
def test_bad_input_is_a_clear_value_error(overrides, words):
    with pytest.raises(ValueError, match=words):
        tiny_config(**overrides)


def test_bad_input_stops_before_a_run_is_created(store, capsys):
    with pytest.raises(SystemExit):
        train_main(TASK, TINY + ["--env", "Pong-nope"])
    assert "unknown environment 'Pong-nope'" in capsys.readouterr().err
    assert mlflow.MlflowClient().search_runs(["0"]) == []
    with pytest.raises(ValueError, match="unknown environment"):  # load_data checks too
        get_task(TASK).load_data(get_task(TASK).config(env="Pong"))


# -- NTK of actor and critic against a float64 brute force ----------------------------------

def brute_force_ntk(fn, variables, x):
    flat, unravel = ravel_pytree(variables)
    jac = jax.jit(jax.jacobian(lambda p: fn(unravel(p), x)))(flat)  # (points, parameters)
    return jac @ jac.T


@pytest.fixture(scope="module")
def untrained_probe():
    """Probe and variables of an untrained agent, built in float32 (gymnax steps only in float32)."""
    task = get_task(TASK)
    config = tiny_config()
    data = task.load_data(config)
    model = task.build_model(config, data)
    variables = jax.device_get(task.cv_variables(task.init_state(config, data, model)))
    return task.probe(config, data, model), variables  # no run: states the untrained agent visits


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "structured"])
def test_actor_and_critic_ntk_match_float64_brute_force(untrained_probe, x64, implementation):
    probe, variables = untrained_probe
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jnp.asarray(probe.sets["states"].inputs[:5], jnp.float64)
    assert x.shape == (5, 30, 40, 3)
    for name in ("actor", "critic"):
        fn = probe.networks[name]
        assert fn(variables, x).shape == (5,)
        expected = brute_force_ntk(fn, variables, x)
        got = NTK(fn, implementation)(variables, x)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(expected))))


def test_runs_saved_by_earlier_versions_load_with_their_networks():
    """Before `encoder` existed every run was a CNN; before `dense_layers` existed a CNN had one
    dense layer and the positions encoder two. Their checkpoints restore only into those networks."""
    task = get_task(TASK)
    saved = dataclasses.asdict(task.default_config())
    for key, value, expected in [(("encoder", "dense_layers"), None, ("cnn", 1)),
                                 (("dense_layers",), "cnn", ("cnn", 1)),
                                 (("dense_layers",), "positions", ("positions", 2))]:
        old = {k: v for k, v in saved.items() if k not in key}
        if value is not None:
            old["encoder"] = value
        config = task.config_from_dict(old)
        assert (config.encoder, config.dense_layers) == expected
    assert task.config_from_dict(saved) == task.default_config()


def test_the_cnn_convolutions_take_the_structured_path(untrained_probe):
    """The agent's convolutions run through `sliced_conv`; the engine must still claim their kernels
    for its convolution rule, not fall back to per-point Jacobians."""
    probe, variables = untrained_probe
    x = probe.sets["states"].inputs[:4]
    for name in ("actor", "critic"):
        leaves = NTK(probe.networks[name], "auto").structured_leaves(variables, x)
        assert {f"{name}/params/Conv_{i}/kernel" for i in (0, 1)} <= set(leaves), leaves


# -- learning, through the loop itself ------------------------------------------------------

def test_a_few_updates_fit_the_critic():
    """Within seconds: the critic's value loss falls as it learns the scale of the returns.

    With the CNN encoder (the default, named so this test keeps it): at this size the "positions"
    encoder's losses fluctuate with the
    episodes each 64-transition batch happens to end and do not halve within 12 updates."""
    from ntk_tracking.train.ppo import fit

    task = get_task(TASK)
    config = tiny_config(epochs=12, num_envs=4, num_steps=16, update_epochs=4, learning_rate=1e-2, anneal_lr=False,
                         encoder="cnn")
    data = task.load_data(config)
    seen = {}
    model = task.build_model(config, data)
    fit(config, data, model, task.init_state(config, data, model), 0, lambda e, s, m: seen.__setitem__(e, m),
        progress=False)
    assert sorted(seen) == list(range(13))
    losses = [seen[e]["train/value_loss"] for e in range(1, 13)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert seen[12]["train/env_steps"] == 12 * 4 * 16
    assert seen[12]["train/episodes"] > 0


# -- the real tracked loop --------------------------------------------------------------------

def test_train_checkpoint_analyze_end_to_end(store):
    run_id = train_main(TASK, TINY)
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/episode_return", "train/episodes", "train/env_steps"):
        assert [s for s, _ in metric_history(run_id, key)] == [0, 1, 2, 3, 4], key
    for key in ("train/episode_length", "train/policy_loss", "train/value_loss", "train/entropy", "train/approx_kl"):
        assert [s for s, _ in metric_history(run_id, key)] == [1, 2, 3, 4], key
    assert [s for s, _ in metric_history(run_id, "eval/episode_return")] == [0, 2, 4]
    assert [v for _, v in metric_history(run_id, "train/env_steps")] == [0, 16, 32, 48, 64]
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 2, 4]

    assert analyze_main([run_id] + TINY_ANALYSIS) == [0, 2, 4]
    for network in ("actor", "critic"):
        for name in ("entropy", "trace"):
            points = metric_history(run_id, f"ntk/{network}/{name}/states")
            assert [s for s, _ in points] == [0, 2, 4], (network, name)
            assert all(np.isfinite(v) and v > 0 for _, v in points)
    artifacts = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/probe_states.npz", "analysis/evolution.png"} <= artifacts
    saved = CheckpointlessArrays(run_id).load()
    assert saved["states"].shape == (12, 30, 40, 3) and saved["states"].dtype == np.uint8
    assert list(saved["stages"])[0] == 0 and list(saved["stages"])[-1] == 4


def test_step_checkpoints_are_ppo_updates(store):
    """--cv-steps on Pong name PPO updates: checkpoints and evaluations there too, steps stay updates."""
    run_id = train_main(TASK, TINY + ["--cv-steps", "1,3"])
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).data.tags["ntk_tracking.step_unit"] == "PPO update"
    assert CheckpointStore(run_id, client).cv_epochs() == [0, 1, 2, 3, 4]
    assert [s for s, _ in metric_history(run_id, "eval/episode_return")] == [0, 1, 2, 3, 4]
    assert metric_history(run_id, "epoch") == [(s, float(s)) for s in range(5)]
    assert analyze_main([run_id] + TINY_ANALYSIS) == [0, 1, 2, 3, 4]


class CheckpointlessArrays:
    def __init__(self, run_id):
        self.run_id = run_id

    def load(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            with np.load(tracking.download_artifact(self.run_id, "analysis/probe_states.npz", tmp)) as npz:
                return {k: npz[k] for k in npz.files}


def test_resume_after_interruption_matches_uninterrupted(store, monkeypatch, capsys):
    """Killed after update 3's resume checkpoint (env states, keys, optimizer): the resumed run
    logs exactly the metrics of an uninterrupted one."""
    keys = ("train/episode_return", "train/value_loss", "train/entropy", "train/episodes", "eval/episode_return")
    reference = train_main(TASK, TINY)
    ref = {k: metric_history(reference, k) for k in keys}
    real_log = tracking.log_metrics

    def dying_log(client, run_id, metrics, step):
        if step == 3:
            raise KeyboardInterrupt
        real_log(client, run_id, metrics, step)

    monkeypatch.setattr(tracking, "log_metrics", dying_log)
    with pytest.raises(SystemExit) as exit_info:  # Ctrl-C: one line and exit status 130
        train_main(TASK, TINY)
    assert exit_info.value.code == 130
    runs = mlflow.MlflowClient().search_runs(["0"], order_by=["attributes.start_time DESC"])
    interrupted = runs[0].info.run_id
    assert interrupted != reference
    monkeypatch.setattr(tracking, "log_metrics", real_log)
    monkeypatch.setenv("MLFLOW_RUN_ID", interrupted)
    capsys.readouterr()
    assert train_main(TASK, TINY) == interrupted
    assert "after epoch 3" in capsys.readouterr().out
    for key in keys:
        assert metric_history(interrupted, key) == ref[key], key


@pytest.mark.parametrize("points, max_return, expected", [
    # an untrained agent at half the cap: doubling would need a perfect policy; halfway to the cap counts
    ([(0, 99.0), (45, 103.0), (66, 151.0), (300, 195.0)], 200.0, 66),
    ([(0, 99.0), (45, 103.0), (66, 151.0), (300, 195.0)], None, None),
    # far below the cap (gymnax's 1000 steps): doubling comes first
    ([(0, 87.0), (10, 120.0), (20, 180.0), (40, 600.0)], 1000.0, 20),
    ([(0, 87.0), (10, 120.0)], 1000.0, None),
])
def test_return_jump_is_doubling_or_halfway_to_the_best_return(points, max_return, expected):
    from ntk_tracking.figures_rl import return_jump_step
    from ntk_tracking.tasks.pong_actor_critic import probe_stages

    assert return_jump_step(points, max_return=max_return) == expected
    epochs = [s for s, _ in points]
    middle = expected if expected is not None else epochs[len(epochs) // 2]
    assert probe_stages(epochs, points, max_return=max_return) == sorted({epochs[0], middle, epochs[-1]})
