"""Seconds per empirical NTK on the two reference networks of DESIGN.md, vs neural-tangents.

    python benchmarks/ntk_speed.py                       # everything: ~5–15 min on 2 CPU cores
    python benchmarks/ntk_speed.py --points 20 --models cnn --implementations jacobian

Each (model, implementation, m) runs in a fresh subprocess: compile once (first call), then
time `jax.block_until_ready(ntk(params, x))` for --repeats calls, each with new parameters of
the same shapes, and report the median. Memory is the worker's peak resident set
(`ru_maxrss`) minus its resident set after imports, parameters and inputs were in place, so
it counts what computing the kernel added (XLA buffers, compiled code, Python temporaries).
The neural-tangents numbers are DESIGN.md's (jax 0.4.23 legacy env, same machine, m = 20).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

# The editable install may resolve `ntk_tracking` as a namespace; import from this checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# neural-tangents at m = 20, 10 logits (DESIGN.md): seconds per kernel.
NT_REFERENCE = {
    "mlp": {"structured-derivatives": 0.053, "ntk-vector-products": 0.29, "jacobian": 1.41},
    "cnn": {"structured-derivatives": 4.53, "ntk-vector-products": 5.09, "jacobian": 4.53},
}
GOALS = {"mlp": 0.29, "cnn": 1.5}  # seconds per kernel at m = 20
NT_SHOWN = {"mlp": ("structured-derivatives", "ntk-vector-products"), "cnn": ("jacobian",)}


def build(model_name: str):
    """(apply_fn, init_fn) of a reference network on 28×28×1 inputs, float32."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            for _ in range(3):
                x = nn.relu(nn.Dense(512)(x))
            return nn.Dense(10)(x)

    class CNN(nn.Module):
        """Keras' MNIST convnet: VALID 3×3 convolutions, 28→26→24, pool to 12×12×64."""

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(10)(x)

    model = {"mlp": MLP, "cnn": CNN}[model_name]()
    return (lambda p, x: model.apply({"params": p}, x)), model.init


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(model_name: str, impl: str, m: int, repeats: int, memory_budget: int | None,
           limit_s: float) -> dict:
    """One configuration, in this (fresh) process; returns the measurements.

    Stops repeating once `limit_s` (counted from the first call) would be exceeded, after at
    least one timed repeat; the number of repeats done is reported.
    """
    import jax
    import numpy as np

    from ntk_tracking import NTK

    apply_fn, init = build(model_name)
    x = np.random.default_rng(0).normal(size=(m, 28, 28, 1)).astype(np.float32)
    init = jax.jit(init)
    param_sets = [init(jax.random.PRNGKey(i), x[:1])["params"] for i in range(min(repeats, 3) + 1)]
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(param_sets[0]))
    jax.block_until_ready(param_sets)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    ntk = NTK(apply_fn, impl, memory_budget=memory_budget)
    _, out_shape, _, act = ntk._prepare(param_sets[0], x, None)
    plan = ntk._plan(param_sets[0], m, out_shape, act)  # (implementation, block, chunk)
    t0 = time.perf_counter()
    jax.block_until_ready(ntk(param_sets[0], x))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for r in range(repeats):
        if times and time.perf_counter() - t0 + statistics.median(times) > limit_s:
            break
        params = param_sets[1 + r % (len(param_sets) - 1)]
        c0, start = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(ntk(params, x))
        times.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - c0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n_params": int(n_params), "first_s": first, "times": times, "n": len(times),
        "median_s": statistics.median(times), "cpu_s": statistics.median(cpu),
        "block": plan[1], "chunk": plan[2],
        "peak_mib": (peak_kib - baseline_kib) / 1024, "baseline_mib": baseline_kib / 1024,
    }


def run_config(model_name, impl, m, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", model_name, impl, str(m), "--repeats",
           str(args.repeats), "--timeout", str(args.timeout)]
    if args.memory_budget:
        cmd += ["--memory-budget", str(args.memory_budget)]
    try:
        # Imports and parameter init come on top of the limit; a first call (compile + one
        # kernel) plus one repeat that overruns it gets the configuration skipped.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 30)
    except subprocess.TimeoutExpired:
        return {"skipped": f"first call + one repeat took over {args.timeout:.0f} s; not measured"}
    if done.returncode != 0:
        return {"skipped": "worker failed: " + done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--points", type=int, nargs="+", default=[20, 100], help="m values")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--implementations", nargs="+", default=["jacobian", "ntvp", "structured"],
                        choices=["jacobian", "ntvp", "structured", "auto"])
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="bytes for NTK(memory_budget=...); default: the engine's default")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per configuration: repeats stop early to fit; a "
                             "configuration whose first call + one repeat overrun it is skipped")
    parser.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        model_name, impl, m = args._worker
        print(json.dumps(worker(model_name, impl, int(m), args.repeats, args.memory_budget,
                                args.timeout)))
        return

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; float32, 10 logits, {args.repeats} repeats")
    header = (f"{'model':5} {'impl':8} {'m':>4} {'block':>5} {'first s':>8} {'n':>2} "
              f"{'median s':>9} {'min s':>8} {'cpu s':>7} {'peak MiB':>8}   "
              f"neural-tangents at m=20 (our median / theirs)")
    print(header)
    print("-" * len(header))
    notes, params_seen = [], {}
    for model_name in args.models:
        for impl in args.implementations:
            for m in args.points:
                r = run_config(model_name, impl, m, args)
                if "skipped" in r:
                    print(f"{model_name:5} {impl:8} {m:>4}   SKIPPED: {r['skipped']}")
                    notes.append(f"{model_name}/{impl}/m={m} skipped: {r['skipped']}")
                    continue
                refs = ""
                if m == 20:
                    refs = "  ".join(
                        f"{k} {NT_REFERENCE[model_name][k]:.3g} s "
                        f"(x{r['median_s'] / NT_REFERENCE[model_name][k]:.2f})"
                        for k in NT_SHOWN[model_name])
                    goal = GOALS[model_name]
                    verdict = "met" if r["median_s"] < goal else "MISSED"
                    notes.append(f"goal {model_name}/{impl} m=20 < {goal} s: {verdict} "
                                 f"({r['median_s']:.3f} s)")
                print(f"{model_name:5} {impl:8} {m:>4} {r['block']:>5} {r['first_s']:>8.2f} "
                      f"{r['n']:>2} {r['median_s']:>9.3f} {min(r['times']):>8.3f} "
                      f"{r['cpu_s']:>7.2f} {r['peak_mib']:>8.0f}   {refs}", flush=True)
                params_seen[model_name] = r["n_params"]
    print()
    print("block = points per block (m×m kernel computed in upper-triangle tiles of this size);")
    print("first s = first call (trace + XLA compile + one kernel); n = timed repeats, new params")
    print("each; median/min s = wall seconds per kernel; cpu s = median user+sys CPU seconds per")
    print("kernel (robust to other load on the machine; sys is mostly page faults of fresh buffers);")
    print("peak MiB = worker's ru_maxrss minus its ru_maxrss after imports, params and inputs.")
    print("params: " + ", ".join(f"{k} {v:,}" for k, v in params_seen.items()))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
