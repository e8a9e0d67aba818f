"""molpcba_gnn cost on this machine: training steps, evaluation and one analyzed checkpoint.

    python benchmarks/molpcba_gnn.py                      # all parts: ~15 min on 2 free CPU cores
    python benchmarks/molpcba_gnn.py --part train --steps 5
    python benchmarks/molpcba_gnn.py --part ntk --timed 2 --implementation jacobian

Synthetic molecules of realistic size (OGB's molpcba: 26.0 atoms and 28.1 bonds on average;
9 integer atom features, 3 bond features, 128 tasks with 70 % of labels missing) go through
the real code paths: compact Graphs, `jraph.dynamically_batch`, the jitted train step and
the analyzer's NTK measurement (K subsets of m molecules, each padded alone). Each part runs
in a fresh subprocess; memory is its peak resident set (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def synthetic_graphs(n: int, seed: int = 0):
    """n molecule-like graphs: a random tree plus ~2 ring bonds each, sizes like molpcba's."""
    import numpy as np

    from ntk_tracking.data.ogbg import make_graphs

    rng = np.random.default_rng(seed)
    n_node = np.clip(rng.normal(26, 8, n).round().astype(np.int64), 4, 120)
    rings = np.minimum(rng.poisson(2.1, n), n_node // 3)
    n_edge = n_node - 1 + rings
    senders, receivers = [], []
    for count, extra in zip(n_node, rings):  # host-side fixture building only
        child = np.arange(1, count)
        senders.append(np.concatenate([(rng.random(count - 1) * child).astype(np.int64),
                                       rng.integers(0, count // 2, extra)]))
        receivers.append(np.concatenate([child, count // 2 + rng.integers(0, count - count // 2, extra)]))
    nodes = rng.integers(0, 36, (int(n_node.sum()), 9))
    edges = rng.integers(0, 4, (int(n_edge.sum()), 3))
    labels = (rng.random((n, 128)) < 0.02).astype(np.float32)
    labels[rng.random((n, 128)) < 0.7] = np.nan
    return make_graphs(nodes, edges, np.concatenate(senders), np.concatenate(receivers), n_node, n_edge, labels)


def default_config(**overrides):
    from ntk_tracking.tasks import get_task

    return get_task("molpcba_gnn").config(**overrides)


def part_train(args) -> dict:
    import jax
    import numpy as np

    from ntk_tracking.data.graph_batches import batches, budget_for
    from ntk_tracking.models import graph_net
    from ntk_tracking.train import graph_classification as gc

    cfg = default_config(batch_size=args.batch_size)
    model = graph_net.make(cfg, {"num_outputs": 128})
    graphs = synthetic_graphs(args.batch_size * (args.steps + 3) * 2)
    budget = budget_for(graphs, cfg.batch_size)
    t0 = time.perf_counter()
    host = list(batches(graphs, budget, gc.epoch_order(0, 1, len(graphs))))
    batch_seconds = (time.perf_counter() - t0) / len(host)
    state = gc.create_train_state(model, cfg, host[0])
    step = gc.make_train_step(model)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    state, m = step(state, host[0], key)
    jax.block_until_ready(m["loss"])
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        state, m = step(state, host[i], jax.random.fold_in(key, i))
    jax.block_until_ready(m["loss"])
    step_seconds = (time.perf_counter() - t0) / args.steps
    predict = gc.make_predict(model)
    eval_graphs = graphs.subset(np.arange(args.batch_size * 4))
    gc.predict_split(predict, state.params, eval_graphs, budget)  # compile
    t0 = time.perf_counter()
    gc.evaluate(predict, state.params, eval_graphs, budget, "test")
    eval_per_graph = (time.perf_counter() - t0) / len(eval_graphs)
    steps_per_epoch = 350_343 / (len(graphs) / len(host))  # molpcba's scaffold train split
    return dict(part="train", batch_size=cfg.batch_size, node_budget=budget.n_node, edge_budget=budget.n_edge,
                graphs_per_batch=len(graphs) / len(host), compile_seconds=compile_seconds,
                seconds_per_step=step_seconds, seconds_per_1000_steps=1000 * (step_seconds + batch_seconds),
                host_batching_seconds_per_1000_steps=1000 * batch_seconds,
                estimated_hours_per_molpcba_epoch=steps_per_epoch * (step_seconds + batch_seconds) / 3600,
                eval_seconds_per_1000_graphs=1000 * eval_per_graph, steps_timed=args.steps)


def part_ntk(args) -> dict:
    import numpy as np

    from ntk_tracking.data.graph_batches import padded_points
    from ntk_tracking.models import graph_net
    from ntk_tracking.ntk import NTK, Measurement, draw_subsets
    from ntk_tracking.tasks.molpcba import ntk_apply_fn
    from ntk_tracking.train import graph_classification as gc
    from ntk_tracking.data.graph_batches import batches, budget_for

    cfg = default_config()
    pool = synthetic_graphs(cfg.probe_pool, seed=1)
    points = padded_points(pool)
    model = graph_net.make(cfg, {"num_outputs": 128})
    params = gc.create_train_state(model, cfg, next(batches(pool, budget_for(pool, 8)))).params
    ntk = NTK(ntk_apply_fn(model), args.implementation)
    subsets = draw_subsets(len(pool), args.subsets, args.points, seed=0)
    measurement = Measurement(ntk, points, subsets)
    variables = {"params": params}
    t0 = time.perf_counter()
    np.asarray(ntk(variables, measurement.inputs[0]))
    first = time.perf_counter() - t0
    print(f"first kernel (compiles): {first:.1f} s", file=sys.stderr, flush=True)
    times = []
    for i, xs in enumerate(measurement.inputs[: args.timed]):
        t0 = time.perf_counter()
        np.asarray(ntk(variables, xs))
        times.append(time.perf_counter() - t0)
        print(f"kernel {i}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    per_kernel = float(np.median(times))
    impl, block, _ = ntk._plan(variables, args.points, (128,), ntk._prepare(variables, measurement.inputs[0], None)[3])
    return dict(part="ntk", implementation=args.implementation, chosen=impl, block=block, subsets=args.subsets,
                points=args.points, padded_nodes_per_point=int(points["nodes"].shape[1]),
                padded_edges_per_point=int(points["edges"].shape[1]), kernels_timed=len(times),
                first_kernel_seconds_incl_compile=first, seconds_per_kernel=per_kernel,
                seconds_per_checkpoint_two_sets=2 * args.subsets * per_kernel)


def part_load(args) -> dict:
    """Building the compact representation for all 437,929 molecules (undirected edges)."""
    t0 = time.perf_counter()
    g = synthetic_graphs(437_929)
    seconds = time.perf_counter() - t0
    size = sum(getattr(g, f).nbytes for f in ("nodes", "edges", "senders", "receivers", "node_offsets",
                                               "edge_offsets", "labels"))
    return dict(part="load", molecules=len(g), mean_nodes=float(g.n_node.mean()),
                mean_directed_edges=float(g.n_edge.mean()), build_seconds=seconds, compact_megabytes=size / 2**20)


PARTS = {"train": part_train, "ntk": part_ntk, "load": part_load}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), action="append", help="default: all, each in a subprocess")
    p.add_argument("--steps", type=int, default=5, help="timed train steps after the compiling one")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--subsets", type=int, default=20, help="K")
    p.add_argument("--points", type=int, default=20, help="m")
    p.add_argument("--implementation", default="auto")
    p.add_argument("--timed", type=int, default=3, help="kernels timed after the first (per checkpoint = 2 K × median)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        (part,) = args.part
        result = PARTS[part](args)
        result["peak_rss_megabytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    for part in args.part or ["load", "train", "ntk"]:
        argv = [sys.executable, __file__, "--worker", "--part", part, "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--subsets", str(args.subsets), "--points", str(args.points),
                "--implementation", args.implementation, "--timed", str(args.timed)]
        out = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if out.returncode:
            raise SystemExit(out.returncode)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
