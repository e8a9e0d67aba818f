"""RL environments (gymnax), never importing models."""

from ntk_tracking.envs.pong import DEFAULT_ENV, ENVS, FixedPong, evaluate_policy, make_env, tracker_action

__all__ = ["DEFAULT_ENV", "ENVS", "FixedPong", "evaluate_policy", "make_env", "tracker_action"]
