"""Does the default PPO agent learn the corrected Pong? Train (tracked, as a user would), evaluate,
compare with random and the scripted tracker, optionally analyze the NTK, draw the figures.

    nice python benchmarks/pong_learning.py --store pong_bench [--analyze] [-- --epochs 300 ...]

Prints env steps, wall time, returns and, with --analyze, the per-checkpoint collective
variables used in studies/pong_rl.md; writes pong_learning.png (and pong_rl_evolution.png) to
--figures (default: docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="folder for the MLflow SQLite store and artifacts")
    p.add_argument("--analyze", action="store_true", help="also run the NTK analyzer on the run")
    p.add_argument("--subsets", type=int, default=20)
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--eval-episodes", type=int, default=256)
    p.add_argument("--figures", default=str(ROOT / "docs"), help="folder for the two figures (default: docs/)")
    p.add_argument("train_args", nargs="*", help="task options after --, e.g. -- --epochs 300")
    args = p.parse_args()
    store, args.figures = os.path.abspath(args.store), os.path.abspath(args.figures)  # before the chdir
    os.makedirs(store, exist_ok=True)
    os.chdir(store)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"

    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    from ntk_tracking.checkpointing import CheckpointStore
    from ntk_tracking.cli.analyze import analyze_main
    from ntk_tracking.cli.train import train_main
    from ntk_tracking.envs import pong
    from ntk_tracking.figures_rl import return_jump_step, rl_evolution_figure
    from ntk_tracking.tasks import get_task
    from ntk_tracking.train.ppo import make_evaluate

    t0 = time.perf_counter()
    run_id = train_main("pong_actor_critic", args.train_args + ["--no-progress"])
    train_seconds = time.perf_counter() - t0
    client = mlflow.MlflowClient()

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    task = get_task("pong_actor_critic")
    config = task.config_from_dict(json.loads(open(client.download_artifacts(run_id, "config.json", ".")).read()))
    data = task.load_data(config)
    last = config.epochs
    networks = task.build_model(config, data)
    variables = CheckpointStore(run_id, client).restore_cv(last, task.abstract_variables(config, data, networks))
    evaluate = make_evaluate(config, networks, data.env, data.params, args.eval_episodes)
    final = float(evaluate({"actor": variables["actor"]["params"]}, jax.random.PRNGKey(12345)))
    key = jax.random.PRNGKey(0)
    baselines = {}
    for label, policy in [("random", pong.random_policy), ("tracker", pong.scripted_policy)]:
        r = pong.evaluate_policy(data.env, data.params, policy, key, args.eval_episodes, config.max_steps)
        baselines[label] = float(np.mean(r["returns"]))
    steps = history("train/env_steps")[-1][1]
    result = {"run_id": run_id, "env": config.env, "max_steps": config.max_steps, "updates": config.epochs,
              "env_steps": steps, "episodes": history("train/episodes")[-1][1],
              "train_wall_seconds": round(train_seconds, 1), "final_eval_return": final,
              "random_return": baselines["random"], "tracker_return": baselines["tracker"],
              "fraction_of_tracker": final / baselines["tracker"],
              "first_return_jump_update": return_jump_step(history("eval/episode_return"),
                                                             max_return=config.max_steps)}
    print(json.dumps(result, indent=2))

    docs = pathlib.Path(args.figures).resolve()
    docs.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    episodes = dict(history("train/episodes"))
    for key_, style, label in [("train/episode_return", "-", "training episodes (mean per update)"),
                               ("eval/episode_return", "o-", f"evaluation ({config.eval_envs} episodes)")]:
        pts = history(key_)
        ax.plot([max(episodes.get(s, 0), 1) for s, _ in pts], [v for _, v in pts], style, ms=3, label=label)
    ax.axhline(baselines["tracker"], color="C2", ls="--", label="scripted tracker")
    ax.axhline(0.9 * baselines["tracker"], color="C2", ls=":", label="90 % of tracker")
    ax.axhline(baselines["random"], color="0.5", ls="--", label="uniform random")
    ax.set_xscale("log")
    ax.set_xlabel("training episodes (log)")
    ax.set_ylabel(f"episode return (limit {config.max_steps})")
    ax.set_title(f"PPO on {config.env}: {int(steps):,} env steps, {train_seconds / 60:.1f} min on a shared 2-core CPU",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "pong_learning.png", dpi=110)

    if args.analyze:
        analyze_main([run_id, "--subsets", str(args.subsets), "--points", str(args.points), "--no-progress"])
        keys = [f"ntk/{n}/{v}/states" for n in ("actor", "critic") for v in ("entropy", "trace")]
        table = {k: dict(history(k)) for k in keys + ["eval/episode_return", "train/episodes"]}
        print("update episodes eval_return " + " ".join(keys))
        for step in sorted(table[keys[0]]):
            row = [step, table["train/episodes"].get(step, 0), table["eval/episode_return"].get(step)]
            print(" ".join(str(round(v, 4)) if isinstance(v, float) else str(v) for v in row + [table[k][step] for k in keys]))
        fig = rl_evolution_figure({k: history(k) for k in keys + ["train/episode_return", "eval/episode_return",
                                                                  "train/episodes"]},
                                  title=f"{config.env}, run {run_id[:8]}", max_return=config.max_steps)
        fig.savefig(docs / "pong_rl_evolution.png", dpi=110)


if __name__ == "__main__":
    main()
