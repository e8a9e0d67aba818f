"""The RL study (paper §4, Fig. 3c): PPO with an actor and a critic network on Pong.

    mlflow run . -e pong_actor_critic --env-manager local
    ntk-tracking train pong_actor_critic --epochs 600

One task epoch is one PPO update; metrics and checkpoints use step = update, and
`train/episodes` maps updates to training episodes (the paper's x axis).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ntk_tracking.keys import EVAL_EPISODE_RETURN, TRAIN_EPISODE_RETURN, TRAIN_EPISODES, metric_key, split_key
from ntk_tracking.models import actor_critic
from ntk_tracking.tasks.base import LearningCheck, Probe, ProbeSet, Task, TaskConfig, option

PROBE_ARTIFACT = "analysis/probe_states.npz"


@dataclasses.dataclass(frozen=True)
class PongConfig(TaskConfig):
    """Environment, agent and PPO settings; defaults learn the corrected Pong on a CPU (benchmarks/pong_learning.py)."""

    dataset: str = option("", "unused: an RL run has no dataset (see --env)", cli=False)
    epochs: int = option(600, "PPO updates: one rollout of num_envs × num_steps steps, then update_epochs passes")
    train_size: int | None = option(None, "unused by RL", cli=False)
    test_size: int | None = option(None, "unused by RL", cli=False)
    # Environment.
    env: str = option("Pong-fixed", "Pong-fixed (corrected, see docs/models.md) or Pong-misc (gymnax's original)")
    max_steps: int = option(200, "episode step limit (return = steps the ball stays in play; gymnax: 1000)")
    # Agent.
    encoder: str = option("cnn", "cnn (two strided 3×3 convolutions on the frame, as in the paper) or positions "
                          "(a parameter-free read-out of paddle and ball positions); dense layers follow either")
    channels: int = option(8, "cnn encoder: channels of the first convolution (the second has twice as many)")
    hidden: int = option(256, "units of each dense hidden layer of actor and critic")
    dense_layers: int = option(2, "dense ReLU layers between the encoder and the linear head")
    # PPO.
    num_envs: int = option(32, "environments stepped in parallel (vmapped)")
    num_steps: int = option(128, "steps per environment per rollout (one update)")
    num_minibatches: int = option(8, "minibatches per optimization epoch; must divide num_envs × num_steps")
    update_epochs: int = option(4, "optimization epochs over each rollout")
    learning_rate: float = option(1e-3, "Adam step size")
    anneal_lr: bool = option(True, "anneal the step size linearly to 0 over the updates")
    gamma: float = option(0.99, "discount factor")
    gae_lambda: float = option(0.95, "GAE λ")
    clip_eps: float = option(0.2, "PPO ratio (and value) clipping")
    ent_coef: float = option(0.01, "entropy bonus coefficient")
    vf_coef: float = option(0.5, "value loss coefficient")
    max_grad_norm: float = option(0.5, "global gradient norm clip")
    eval_envs: int = option(32, "episodes of the evaluation return at update 0 and at each CV checkpoint")
    # Probe.
    probe_states: int = option(2000, "states pooled for the NTK probe (a third from each of three stages)")

    def checks(self):
        from ntk_tracking.envs import ENVS
        from ntk_tracking.models.actor_critic import ENCODERS

        batch = self.num_envs * self.num_steps
        finite = [("learning_rate", self.learning_rate), ("gamma", self.gamma), ("gae_lambda", self.gae_lambda),
                  ("clip_eps", self.clip_eps), ("ent_coef", self.ent_coef), ("vf_coef", self.vf_coef),
                  ("max_grad_norm", self.max_grad_norm)]
        return [
            (self.env in ENVS, f"unknown environment {self.env!r}; choose one of {list(ENVS)}"),
            (self.encoder in ENCODERS, f"unknown encoder {self.encoder!r}; choose one of {list(ENCODERS)}"),
            (self.max_steps > 0, f"max_steps (episode step limit) must be positive, got {self.max_steps}"),
            (self.num_envs > 0, f"num_envs must be ≥ 1 environment, got {self.num_envs}"),
            (self.num_steps > 0, f"num_steps must be ≥ 1 step per rollout, got {self.num_steps}"),
            (self.num_minibatches > 0, f"num_minibatches must be ≥ 1, got {self.num_minibatches}"),
            (self.num_minibatches <= 0 or batch % self.num_minibatches == 0,
             f"the rollout of num_envs × num_steps = {self.num_envs} × {self.num_steps} = {batch} transitions "
             f"does not split into {self.num_minibatches} equal minibatches; choose num_minibatches dividing {batch}"),
            (self.update_epochs > 0, f"update_epochs must be ≥ 1, got {self.update_epochs}"),
            (all(math.isfinite(v) for _, v in finite), f"PPO coefficients must be finite numbers: {dict(finite)}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (0 <= self.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {self.gae_lambda}"),
            (self.clip_eps > 0, f"clip_eps must be positive, got {self.clip_eps}"),
            (self.ent_coef >= 0 and self.vf_coef >= 0, "ent_coef and vf_coef must be ≥ 0"),
            (self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}"),
            (self.channels > 0 and self.hidden > 0, "channels and hidden must be positive"),
            (self.dense_layers >= 0, f"dense_layers must be ≥ 0, got {self.dense_layers}"),
            (self.eval_envs > 0, f"eval_envs must be ≥ 1, got {self.eval_envs}"),
            (self.probe_states >= 3, f"probe_states must be ≥ 3 (one per stage), got {self.probe_states}"),
        ] + super().checks()


@dataclasses.dataclass(frozen=True)
class PongData:
    """What an RL task has instead of a dataset: the environment and its parameters."""

    env: object
    params: object
    info: dict


class PongActorCriticTask(Task):
    name = "pong_actor_critic"
    config_class = PongConfig
    defaults = dict(epochs=600, cv_every=50, cv_log_points=16)
    summary = "an actor-critic (PPO) learning Pong (paper §4, Fig. 3c)"
    step_name = "PPO update"
    loss_metrics = (TRAIN_EPISODE_RETURN,)
    architecture = actor_critic  # make returns the pair ActorCritic(actor, critic)
    # Within seconds the critic learns the scale of the returns: its value loss halves (means of 3
    # updates: one batch of 64 transitions is noisy). The CNN encoder is named so the check keeps it.
    learning_check = LearningCheck(dict(epochs=12, num_envs=4, num_steps=16, num_minibatches=2, update_epochs=4,
                                        channels=2, hidden=8, max_steps=40, eval_envs=2, probe_states=12,
                                        learning_rate=1e-2, anneal_lr=False, encoder="cnn", cv_every=12,
                                        cv_log_points=0),
                                   falls={split_key("train", "value_loss"): 0.5}, window=3)

    def run_name(self, config) -> str:
        return f"{config.task}-{config.env}-s{config.seed}"

    def config_from_dict(self, saved: dict):
        """Runs saved before the `encoder` option existed used the CNN; CNN runs saved before
        `dense_layers` existed had one dense layer (positions runs had two, today's default)."""
        saved = {"encoder": "cnn", **saved}
        if saved["encoder"] == "cnn":
            saved = {"dense_layers": 1, **saved}
        return super().config_from_dict(saved)

    def load_data(self, config) -> PongData:
        from ntk_tracking.envs import make_env

        env, params = make_env(config.env, config.max_steps)
        info = {"env": config.env, "max_steps": config.max_steps, "obs_shape": list(env.obs_shape),
                "num_actions": int(env.action_space(params).n)}
        return PongData(env, params, info)

    def model_data_info(self, data):
        return {"num_actions": int(data.info["num_actions"])}

    def init_state(self, config, data, model):
        from ntk_tracking.train.ppo import init_runner

        return init_runner(config, model, data.env, data.params)

    def fit(self, config, data, model, state, start_epoch, on_epoch, progress=True):
        from ntk_tracking.train.ppo import fit

        return fit(config, data, model, state, start_epoch, on_epoch, progress=progress,
                   eval_epochs=config.cv_epochs() + config.cv_optimizer_steps(1))

    def steps_per_epoch(self, config, data):
        """One epoch is one PPO update, the unit of --cv-steps here (its Adam steps run inside one jitted call)."""
        return 1

    def cv_variables(self, state):
        params = state.train.params
        return {"actor": {"params": params["actor"]}, "critic": {"params": params["critic"]}}

    def network_names(self, config):
        return ("actor", "critic")

    def default_probe_sets(self):
        return ("states",)

    def probe(self, config, data, model, context=None) -> Probe:
        """Actor (summed logits) and critic (value) on states the agent visited at three stages."""
        arrays = context.load_arrays(PROBE_ARTIFACT) if context is not None else None
        if arrays is None:
            arrays = self._collect_probe_states(config, data, model, context)
            if context is not None:
                context.save_arrays(PROBE_ARTIFACT, arrays)
        states = np.asarray(arrays["states"], np.float32)
        return Probe(networks=actor_critic.ntk_apply_fns(model), sets={"states": ProbeSet(states)})

    def _collect_probe_states(self, config, data, model, context) -> dict:
        from ntk_tracking.train.ppo import make_state_collector

        if context is None:  # no run: the untrained agent only
            stages = [0]
            variables = [self.cv_variables(self.init_state(config, data, model))]
        else:
            # +1 per step in play: the best possible return is the episode's step limit.
            stages = probe_stages(context.cv_epochs, context.metric_history(EVAL_EPISODE_RETURN),
                                  max_return=config.max_steps)
            variables = [context.restore(e) for e in stages]
        per_stage = -(-config.probe_states // len(stages))
        collect = make_state_collector(config, model, data.env, data.params, per_stage)
        pooled = [collect(v["actor"]["params"], config.seed + e) for e, v in zip(stages, variables)]
        states = np.concatenate(pooled)[: config.probe_states]
        return {"states": states.astype(np.uint8), "stages": np.asarray(stages, np.int64)}

    def evolution_figure(self, config, history, networks, probe_sets, title=""):
        from ntk_tracking.figures_rl import rl_evolution_figure

        keys = [metric_key(n, v, s) for n in networks for v in ("entropy", "trace") for s in probe_sets]
        keys += [TRAIN_EPISODE_RETURN, EVAL_EPISODE_RETURN, TRAIN_EPISODES]
        return rl_evolution_figure({k: history(k) for k in keys}, title=title, max_return=config.max_steps)


def probe_stages(cv_epochs, eval_history, max_return: float | None = None) -> list[int]:
    """Untrained (0), "occasionally successful" (the first CV checkpoint whose evaluation return
    is at least twice the untrained one's, or halfway from it to `max_return` if that is lower;
    the middle checkpoint if none is) and the last."""
    from ntk_tracking.figures_rl import return_jump_step

    epochs = sorted(cv_epochs)
    if not epochs:
        raise ValueError("the run has no CV checkpoints to collect probe states from")
    jump = return_jump_step([(s, v) for s, v in eval_history if s in set(epochs)], max_return=max_return)
    middle = jump if jump is not None else epochs[len(epochs) // 2]
    return sorted({epochs[0], middle, epochs[-1]})


TASKS = {"pong_actor_critic": PongActorCriticTask()}
