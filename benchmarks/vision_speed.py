"""Seconds per training epoch and per analyzed checkpoint of cifar_resnet and mnist_vae, on this machine.

    nice python benchmarks/vision_speed.py                          # all cases; the full ResNet18 takes long
    python benchmarks/vision_speed.py --cases vae resnet18_k0.25 --repeats 3

Each case runs in a fresh subprocess (its peak memory is that process's ru_maxrss: XLA's buffers
are invisible to tracemalloc). Training: the task's own epoch function (jitted steps over
batches, augmentation on device) is compiled for `steps` batches of the default batch size, then
timed `repeats` times; seconds per epoch = median per step × steps per epoch (extrapolated unless
the whole epoch was timed), plus the per-epoch evaluation of the train and test splits,
extrapolated from timed evaluation chunks. Analysis: `ntk.NTK` + `Measurement` on the probe,
K subsets of m = 20 points per split and 2 splits per checkpoint; the kernels after the first
(compiling) one are timed and the per-checkpoint time is extrapolated to K = 20 when fewer
subsets were timed. CIFAR images are random uint8 (the timing does not depend on their values;
CIFAR-10 itself needs the hub); the VAE uses mnist5k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {  # name: (task, config overrides, train size, test size, timed train steps, timed NTK subsets)
    "resnet18_k1": ("cifar_resnet", dict(width=1.0), 50_000, 10_000, 1, 1),
    "resnet18_k0.25": ("cifar_resnet", dict(width=0.25), 50_000, 10_000, 2, 2),
    "vae": ("mnist_vae", dict(), None, None, None, 2),
}
K, M = 20, 20


def _data(task, config, case):
    _, _, n_train, n_test, _, _ = CASES[case]
    if task.name == "mnist_vae":
        return task.load_data(config)
    from ntk_tracking.data.cifar10 import uint8_dataset

    rng = np.random.default_rng(0)

    def split(n):  # only a few hundred distinct images; the timed code sees the full sizes
        images = rng.integers(0, 256, (min(n, 512), 32, 32, 3), np.uint8)
        return np.resize(images, (n, 32, 32, 3)), np.arange(n) % 10

    return uint8_dataset("random", split(n_train), split(n_test), num_classes=10, source="random",
                         train_size=None, test_size=None, seed=0)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(case: str, repeats: int, implementation: str = "auto") -> dict:
    from ntk_tracking.ntk import NTK
    from ntk_tracking.ntk.measure import Measurement, draw_subsets
    from ntk_tracking.tasks import get_task

    name, overrides, _, _, steps, subsets = CASES[case]
    task = get_task(name)
    config = task.config(**overrides)
    data = _data(task, config, case)
    model = task.build_model(config, data)
    state = task.init_state(config, data, model)
    n, batch = len(data.x_train), config.batch_size
    steps_per_epoch = n // batch
    steps = steps or steps_per_epoch
    if name == "cifar_resnet":
        from ntk_tracking.train import image_classifier as loop

        norm = data.info["normalization"]
        train_epoch, evaluate_fn = loop.compiled(config, tuple(norm["mean"]), tuple(norm["std"]))
        xs = data.x_train[: steps * batch].reshape((steps, batch) + data.x_train.shape[1:])
        ys = data.y_train[: steps * batch].reshape(steps, batch)
        args = (state, xs, ys, 1)
    else:
        from ntk_tracking.train import vae as loop

        train_epoch, evaluate_fn = loop.compiled(config.seed)
        args = (state, data.x_train[: steps * batch].reshape(steps, batch, -1), 1)
    t0 = time.perf_counter()
    jax.block_until_ready(train_epoch(*args))
    compile_train = time.perf_counter() - t0
    per_step = _timed(lambda: train_epoch(*args)[1], repeats) / steps
    # Evaluation: one chunk of the eval batch size, timed, times the chunks of both splits.
    chunk = loop.EVAL_BATCH
    x_eval = data.x_train[:chunk]
    evaluate = (lambda: evaluate_fn(state, x_eval, data.y_train[:chunk])) if name == "cifar_resnet" else \
        (lambda: evaluate_fn(state, x_eval))
    evaluate()
    eval_chunk = _timed(evaluate, repeats)
    chunks = -(-len(data.x_train) // chunk) + -(-len(data.x_test) // chunk)

    probe = task.probe(config, data, model)
    variables = task.cv_variables(state)
    analysis = {}
    for network, apply_fn in probe.networks.items():
        ntk = NTK(apply_fn, implementation)
        x = probe.sets["train"].inputs
        t0 = time.perf_counter()
        jax.block_until_ready(ntk(variables, x[:M]))
        compile_ntk = time.perf_counter() - t0
        measurement = Measurement(ntk, x, draw_subsets(len(x), subsets, M, seed=0))
        t0 = time.perf_counter()
        values = dict(measurement.run(variables))
        per_kernel = (time.perf_counter() - t0) / subsets
        analysis[network] = dict(compile_s=compile_ntk, per_kernel_s=per_kernel,
                                 implementation=ntk.resolved_implementation(variables, x[:M]),
                                 entropy=values["entropy"])
    per_checkpoint = sum(a["per_kernel_s"] for a in analysis.values()) * K * len(probe.sets)
    return dict(case=case, params=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(state.params))),
                steps_per_epoch=steps_per_epoch, timed_steps=steps, compile_train_s=compile_train,
                step_s=per_step, train_steps_per_epoch_s=per_step * steps_per_epoch,
                eval_per_epoch_s=eval_chunk * chunks, epoch_s=per_step * steps_per_epoch + eval_chunk * chunks,
                timed_subsets=subsets, analysis=analysis, checkpoint_s=per_checkpoint,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--implementation", default="auto", help="NTK implementation (the analyzer's default: auto)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.repeats, args.implementation)), flush=True)
        return
    print(f"{'case':16} {'params':>10} {'s/step':>8} {'s/epoch (train+eval)':>22} {'s/checkpoint':>13} "
          f"{'peak GB':>8}  notes")
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--worker", case, "--repeats", str(args.repeats),
                              "--implementation", args.implementation],
                             capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{case:16} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(line[7:])
        notes = [f"{r['timed_steps']} of {r['steps_per_epoch']} steps timed"
                 + (", extrapolated" if r["timed_steps"] < r["steps_per_epoch"] else ""),
                 f"{r['timed_subsets']} of {K} subsets timed" + (", extrapolated" if r["timed_subsets"] < K else "")]
        notes += [f"NTK {k}: {a['implementation']} {a['per_kernel_s']:.3g} s/kernel (compile {a['compile_s']:.0f} s)"
                  for k, a in r["analysis"].items()]
        print(f"{case:16} {r['params']:>10,} {r['step_s']:>8.3g} "
              f"{r['epoch_s']:>10.4g} ({r['train_steps_per_epoch_s']:.4g}+{r['eval_per_epoch_s']:.3g}) "
              f"{r['checkpoint_s']:>13.4g} {r['peak_rss_gb']:>8.2f}  " + "; ".join(notes), flush=True)


if __name__ == "__main__":
    main()
