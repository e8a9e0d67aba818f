"""Seconds per PPO update of the Pong CNN agent with XLA's convolution and with `sliced_conv`.

    nice python benchmarks/pong_update_speed.py [--channels 8 16] [--repeats 5]

Same configuration (the task's defaults with the given channels), same parameters and
environments; prints the median seconds per jitted update (compilation excluded) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def seconds_per_update(config, conv, repeats: int) -> tuple[float, float]:
    import jax

    import ntk_tracking.models.actor_critic as actor_critic
    from ntk_tracking.envs import make_env
    from ntk_tracking.train import ppo

    actor_critic.sliced_conv = conv  # what PongCNN passes to nn.Conv (None: lax.conv_general_dilated)
    env, env_params = make_env(config.env, config.max_steps)
    networks = actor_critic.make(config, {"num_actions": int(env.action_space(env_params).n)})
    runner = ppo.init_runner(config, networks, env, env_params)
    update = ppo.make_update(config, networks, env, env_params)
    t0 = time.perf_counter()
    runner, metrics = update(runner)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner, metrics = update(runner)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[8], help="first-layer channels to measure")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from ntk_tracking.models.conv import sliced_conv
    from ntk_tracking.tasks import get_task

    task = get_task("pong_actor_critic")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; median of {args.repeats} updates")
    print(f"{'channels':>9} {'lax first s':>12} {'lax s':>8} {'sliced first s':>15} {'sliced s':>9} {'lax/sliced':>11}")
    for channels in args.channels:
        config = task.config(channels=channels).validate()
        lax_first, lax_s = seconds_per_update(config, None, args.repeats)
        sliced_first, sliced_s = seconds_per_update(config, sliced_conv, args.repeats)
        print(f"{channels:>4}->{2 * channels:<4} {lax_first:12.2f} {lax_s:8.2f} {sliced_first:15.2f} {sliced_s:9.2f} "
              f"{lax_s / sliced_s:10.1f}x")


if __name__ == "__main__":
    main()
