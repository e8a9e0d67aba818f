"""What the analyzer's engine check costs on its first checkpoint, per paper model, against one checkpoint.

    python benchmarks/engine_check.py                          # every model, both checks (hours, 2 CPU cores)
    python benchmarks/engine_check.py --models resnet18e gcn --checks spread

On the run's first checkpoint the analyzer compares the first subset's kernel, as the fast path
computed it, with an ntvp kernel (ntk_tracking/ntk/guard.py; a float32 mismatch is rechecked in
float64). Two ways, each in a fresh subprocess per model so neither reuses the other's compiled code:

    all      the reference on all m points of the subset (the check before this benchmark)
    spread   the reference on CHECK_POINTS points spread over the subset, their entries compared

Each worker measures, on the analyzer's protocol (K subsets of m points from one probe set, the
task's own probe network via benchmarks/ntk_speed.py's builders, synthetic inputs of the real
shapes): the first Measurement.run (compiles the fast path), a second one (one probe set at
steady state), and then the check. One checkpoint = probe sets × the steady time of this network
(VAE and Pong analyze two networks per checkpoint: each is compared with its own share, the
stricter reading). Prints a table and writes JSON with --json.

Models: mlp, cnn (the dense and convolutional reference networks), resnet18e (cifar_resnet at
width 1/8, the issue's case), resnet18q (width 1/4), vae_model, vae_encoder, tagger, gcn, actor,
critic; see ntk_speed.py for each.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODELS = ("mlp", "cnn", "resnet18e", "resnet18q", "vae_model", "vae_encoder", "tagger", "gcn", "actor", "critic")
CHECKS = ("all", "spread")


def _bench(model: str):
    import ntk_speed

    if model == "resnet18e":
        return ntk_speed._resnet(0.125)
    return ntk_speed.build(model)


def worker(model: str, check: str, subsets: int, m: int) -> dict:
    import jax

    from ntk_speed import _param_sets

    from ntk_tracking.ntk import NTK, Measurement, check_against_ntvp, draw_subsets

    bench = _bench(model)
    pool = max(bench.pool or 0, subsets * m)
    x, mask = bench.probe_points(pool, 0)
    first_params, params = _param_sets(bench, 2)
    measurement = Measurement(NTK(bench.apply_fn, "auto"), x, draw_subsets(pool, subsets, m, seed=0), mask)
    t0 = time.perf_counter()
    list(measurement.run(first_params))
    first = time.perf_counter() - t0
    steady = []
    for _ in range(2):
        t0 = time.perf_counter()
        list(measurement.run(params))
        steady.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    result = check_against_ntvp(measurement.ntk, params, measurement.inputs[0], measurement.masks[0],
                                raise_on_mismatch=False, kernel=measurement.last_kernels[0], from_subsets=True,
                                points=None if check == "all" else check_points_default())
    check_s = time.perf_counter() - t0
    jax.clear_caches()
    return {"model": model, "check": check, "first_s": first, "steady_s": statistics.median(steady),
            "probe_sets": bench.probe_sets, "check_s": check_s, "ok": result["ok"],
            "recheck": "float64_recheck" in result, "relative_diff": result["relative_diff"],
            "checked_points": len(result["checked_points"]), "implementation": result["implementation"]}


def check_points_default() -> int:
    from ntk_tracking.ntk.guard import CHECK_POINTS

    return CHECK_POINTS


def _run(model: str, check: str, subsets: int, m: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--_worker", model, check, str(subsets), str(m)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "check": check, "error": f"over {timeout:.0f} s"}
    if done.returncode:
        return {"model": model, "check": check, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--subsets", type=int, default=20, help="K subsets per probe set")
    parser.add_argument("--points", type=int, default=20, help="m points per subset")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        model, check, subsets, m = args._worker
        print(json.dumps(worker(model, check, int(subsets), int(m))))
        return 0
    rows = []
    print(f"K = {args.subsets} subsets of m = {args.points} points; checkpoint = probe sets × steady probe set")
    print(f"{'model':<12} {'check':<7} {'impl':<10} {'first s':>8} {'ckpt s':>8} {'check s':>8} "
          f"{'check/ckpt':>10} {'f64 recheck':>11} ok")
    for model in args.models:
        for check in args.checks:
            row = _run(model, check, args.subsets, args.points, args.timeout)
            rows.append(row)
            if "error" in row:
                print(f"{model:<12} {check:<7} error: {row['error']}", flush=True)
                continue
            ckpt = row["probe_sets"] * row["steady_s"]
            row["checkpoint_s"], row["check_per_checkpoint"] = ckpt, row["check_s"] / ckpt
            print(f"{model:<12} {check:<7} {row['implementation']:<10} {row['first_s']:8.2f} {ckpt:8.2f} "
                  f"{row['check_s']:8.2f} {row['check_per_checkpoint']:10.2f} {str(row['recheck']):>11} "
                  f"{row['ok']}", flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
