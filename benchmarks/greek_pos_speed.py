"""greek_pos on this machine: seconds per training epoch and per analyzed checkpoint, peak memory.

    python benchmarks/greek_pos_speed.py PATH/grc_perseus-ud-dev.conllu --subsets 20 --points 20

PATH is a UD treebank folder or a .conllu file (a lone dev file is split into train and test).
Training epochs are timed after the first (compiling) one; one checkpoint's analysis is K kernels
of m sentences on each of the train and test probe sets, as the analyzer computes them, timed on
the second call (the first compiles). Any config field can be overridden: --set model_dim=64.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_overrides(task, pairs):
    from ntk_tracking.tasks.base import field_type

    values = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        kind, _ = field_type(task.config_class, name)
        values[name] = kind(text)
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="UD treebank folder or .conllu file")
    p.add_argument("--epochs", type=int, default=3, help="training epochs to run (the first is not timed)")
    p.add_argument("--subsets", type=int, default=20, help="K kernels per probe set")
    p.add_argument("--points", type=int, default=20, help="m sentences per kernel")
    p.add_argument("--implementation", default="auto")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from ntk_tracking.ntk import NTK, Measurement, draw_subsets
    from ntk_tracking.tasks import get_task
    from ntk_tracking.train.tagging import epoch_batches, make_train_epoch, word_dropout_probabilities

    task = get_task("greek_pos")
    config = task.config(dataset=args.dataset, epochs=args.epochs, **parse_overrides(task, args.set)).validate()
    t0 = time.perf_counter()
    data = task.load_data(config)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"data: {data.info['splits_note']}; load {time.perf_counter() - t0:.1f} s")
    print("config: " + ", ".join(f"{k}={getattr(config, k)}" for k in (
        "max_length", "model_dim", "num_heads", "num_layers", "mlp_dim", "batch_size", "probe_max_tokens")))
    model = task.build_model(config, data)
    state = task.init_state(config, data, model)
    print(f"parameters: {sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,}, "
          f"train points {len(data.splits['train'])}")

    train_epoch = make_train_epoch(config.seed, *word_dropout_probabilities(config, data))
    times = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        state, metrics = train_epoch(state, epoch_batches(data.splits["train"], config.batch_size,
                                                          config.seed, epoch), epoch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    print(f"train epoch: first (compiling) {times[0]:.2f} s, then median {np.median(times[1:]):.2f} s "
          f"over {len(times) - 1}; peak {peak_mib():.0f} MiB")

    probe = task.probe(config, data, model)
    ntk = NTK(probe.networks["model"], args.implementation)
    variables = task.cv_variables(state)
    measurements = []
    for i, name in enumerate(("train", "test")):
        ps = probe.sets[name]
        subsets = draw_subsets(len(ps.output_mask), args.subsets, args.points, seed=1000 * i)
        measurements.append(Measurement(ntk, ps.inputs, subsets, ps.output_mask))
    print(f"NTK implementation: {ntk.resolved_implementation(variables, measurements[0].inputs[0], measurements[0].masks[0])}")
    for label in ("first (compiling)", "second"):
        t0 = time.perf_counter()
        values = [dict(m.run(variables)) for m in measurements]
        print(f"analyzed checkpoint ({label}): {time.perf_counter() - t0:.1f} s for "
              f"2 x {args.subsets} kernels of {args.points} sentences; entropy train "
              f"{values[0]['entropy']:.3f}, test {values[1]['entropy']:.3f}; peak {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
