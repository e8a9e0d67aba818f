"""Our NTK engine next to neural-tangents, same parameters and inputs, in one run.

    python benchmarks/nt_side_by_side.py --nt-python LEGACY_ENV/bin/python
    python benchmarks/nt_side_by_side.py --nt-python LEGACY_ENV/bin/python --models resnet18 --repeats 3

neural-tangents 0.6.5 (its last release) no longer imports with current JAX, so it runs in a
legacy environment (python 3.11, jax==0.4.23, jaxlib==0.4.23, neural-tangents==0.6.5,
flax==0.7.5, "numpy<2", tensorflow-cpu==2.15.1) given by --nt-python. For each model this
script initializes the parameters once (here, current flax), writes them and the inputs to a
file, and times, one after the other on the same machine:

- ours: `NTK(apply_fn, "auto")`, median seconds per m×m kernel (every output axis summed);
- neural-tangents at its fastest setting for independent points: `empirical_ntk_fn(apply_fn,
  trace_axes=(-1,), vmap_axes=0, implementation=STRUCTURED_DERIVATIVES)`, jitted, in a fresh
  process of the legacy environment that loads the same parameters into the same flax modules.

neural-tangents averages over the traced output axis, so its kernel times the number of outputs
is ours; the relative difference of the two kernels is printed. Memory is each process's peak
resident set minus its resident set once parameters and inputs were in place. BatchNorm models
are measured in inference mode with their statistics closed over (for both engines).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "resnet18q", "resnet18")
INPUT_SHAPES = {"mlp": (28, 28, 1), "cnn": (28, 28, 1), "resnet18q": (32, 32, 3), "resnet18": (32, 32, 3)}


def _resnet_module():
    """models/resnet.py loaded on its own (it needs flax only), so the legacy env can use it."""
    spec = importlib.util.spec_from_file_location("resnet", ROOT / "ntk_tracking" / "models" / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules are dataclasses: their module must be registered
    spec.loader.exec_module(module)
    return module


def build(name: str):
    """The flax module of `name`: the same code in both environments."""
    from reference_networks import NETWORKS

    if name in NETWORKS:
        return NETWORKS[name]()
    return _resnet_module().ResNet18(width=0.25 if name == "resnet18q" else 1.0)


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flatten(value, path) if hasattr(value, "items") else {path: value})
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _status_mib(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """The resident set now, after resetting the peak (Linux: clear_refs 5), so that the peak read
    later counts only what came after, not the imports' transient peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib() -> float:
    return _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def _load(path):
    import numpy as np

    data = dict(np.load(path))
    x = data.pop("__x__")
    variables = _unflatten(data)
    return x, variables


def _apply(model, variables):
    stats = variables.get("batch_stats")

    def apply_fn(params, x):
        if stats is None:
            return model.apply({"params": params}, x)
        return model.apply({"params": params, "batch_stats": stats}, x, train=False)

    return apply_fn


def nt_worker(name: str, path: str, repeats: int, out: str) -> dict:
    """In the legacy environment: neural-tangents' structured kernel on the saved parameters."""
    import jax
    import neural_tangents as nt
    import numpy as np

    x, variables = _load(path)
    model = build(name)
    reference = jax.tree_util.tree_map(np.shape, model.init(jax.random.PRNGKey(0), x[:1]))
    loaded = jax.tree_util.tree_map(np.shape, variables)
    if _flatten(reference) != _flatten(loaded):
        raise SystemExit("the saved parameters do not match this flax's module structure")
    baseline = _reset_peak()
    kernel_fn = jax.jit(nt.empirical_ntk_fn(
        _apply(model, variables), trace_axes=(-1,), vmap_axes=0,
        implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    first, times = _time(lambda: kernel_fn(x, None, variables["params"]), repeats)
    n_out = model.apply(variables, x[:1], **({"train": False} if "batch_stats" in variables else {})).shape[-1]
    np.save(out, np.asarray(kernel_fn(x, None, variables["params"]), np.float64) * n_out)
    return {"first_s": first, "median_s": statistics.median(times), "n": len(times),
            "peak_mib": _peak_mib() - baseline, "jax": jax.__version__, "nt": nt.__version__}


def ours(name: str, path: str, repeats: int) -> tuple[dict, object]:
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from ntk_tracking import NTK

    x, variables = _load(path)
    model = build(name)
    ntk = NTK(_apply(model, variables), "auto")
    baseline = _reset_peak()
    first, times = _time(lambda: ntk(variables["params"], x), repeats)
    kernel = np.asarray(ntk(variables["params"], x), np.float64)
    return ({"first_s": first, "median_s": statistics.median(times), "n": len(times),
             "peak_mib": _peak_mib() - baseline, "impl": ntk.resolved_implementation(variables["params"], x),
             "jax": jax.__version__}, kernel)


def _ours_in_subprocess(name, path, repeats, out) -> dict:
    """Ours in a fresh process too, so neither engine's peak memory includes the other's."""
    proc = subprocess.run([sys.executable, __file__, "--_ours", name, path, out, "--repeats", str(repeats)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"our worker failed on {name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nt-python", required=False, help="python of the legacy environment with neural-tangents")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18q"], choices=MODELS,
                   help="resnet18 (full width, 11.17 M parameters) takes a few minutes")
    p.add_argument("--points", type=int, default=20, help="m, points per kernel")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per engine (median)")
    p.add_argument("--_nt", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_ours", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._nt:
        print(json.dumps(nt_worker(*args._nt[:2], args.repeats, args._nt[2])))
        return
    if args._ours:
        name, path, out = args._ours
        import numpy as np

        result, kernel = ours(name, path, args.repeats)
        np.save(out, kernel)
        print(json.dumps(result))
        return
    if not args.nt_python:
        p.error("--nt-python is required: the python of a legacy environment with neural-tangents 0.6.5")

    import jax
    import numpy as np

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; m = {args.points}, float32, "
          f"10 outputs summed, median of {args.repeats}")
    header = (f"{'model':9} {'params':>11} {'nt s':>8} {'nt MiB':>7} {'ours s':>8} {'ours MiB':>8} "
              f"{'impl':10} {'nt/ours':>8} {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build(name)
            x = np.random.default_rng(0).normal(size=(args.points,) + INPUT_SHAPES[name]).astype(np.float32)
            variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
            if "batch_stats" in variables:  # non-trivial statistics, as after training
                _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
                    variables, np.random.default_rng(1).normal(1.0, 2.0, (64,) + INPUT_SHAPES[name]).astype(np.float32))
                variables = {"params": variables["params"], **updated}
            flat = {k: np.asarray(v) for k, v in _flatten(jax.device_get(variables)).items()}
            path = os.path.join(tmp, f"{name}.npz")
            np.savez(path, __x__=x, **flat)
            n_params = sum(v.size for k, v in flat.items() if k.startswith("params/"))
            ours_out, nt_out = os.path.join(tmp, f"{name}.ours.npy"), os.path.join(tmp, f"{name}.nt.npy")
            mine = _ours_in_subprocess(name, path, args.repeats, ours_out)
            proc = subprocess.run([args.nt_python, __file__, "--_nt", name, path, nt_out,
                                   "--repeats", str(args.repeats)], capture_output=True, text=True,
                                  env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            if proc.returncode != 0:
                raise SystemExit(f"neural-tangents worker failed on {name}:\n{proc.stderr[-3000:]}")
            theirs = json.loads(proc.stdout.strip().splitlines()[-1])
            k_ours, k_nt = np.load(ours_out), np.load(nt_out)
            rel = float(np.max(np.abs(k_ours - k_nt)) / np.max(np.abs(k_nt)))
            print(f"{name:9} {n_params:>11,} {theirs['median_s']:>8.3f} {theirs['peak_mib']:>7.0f} "
                  f"{mine['median_s']:>8.3f} {mine['peak_mib']:>8.0f} {mine['impl']:10} "
                  f"{theirs['median_s'] / mine['median_s']:>7.2f}x {rel:>9.1e}", flush=True)
    print(f"\nneural-tangents {theirs['nt']} on jax {theirs['jax']} (structured derivatives, vmap_axes=0); "
          f"ours on jax {mine['jax']}. nt/ours > 1: ours is faster. MiB: peak resident set added by the kernel "
          "computation (compile included). rel diff: max |K_ours − O·K_nt| / max |O·K_nt|.")


if __name__ == "__main__":
    main()
