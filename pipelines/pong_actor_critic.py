"""An actor-critic learning Pong with PPO (paper §4, Fig. 3c).

    mlflow run . -e pong_actor_critic --env-manager local -P epochs=600
    python -m pipelines.pong_actor_critic --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("pong_actor_critic", prog="python -m pipelines.pong_actor_critic")
