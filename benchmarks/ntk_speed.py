"""Seconds per empirical NTK on every paper architecture in the repository, vs neural-tangents.

    python benchmarks/ntk_speed.py                       # every default model: about an hour on 2 CPU cores
    python benchmarks/ntk_speed.py --models mlp cnn --points 20 --repeats 3
    python benchmarks/ntk_speed.py --models resnet18q vae tagger gcn actor critic --points 20 \\
        --implementations auto
    python benchmarks/ntk_speed.py --models resnet18 --points 20 --implementations auto --repeats 1 --timeout 200
    python benchmarks/ntk_speed.py --protocol --models mlp cnn resnet18q actor gcn --timeout 300

Models (float32 parameters; inputs synthetic, with the shapes and dtypes of the real probe sets):

    mlp, cnn      the reference networks of the neural-tangents comparison: ReLU MLP 784→512×3→10 and
                  Keras' MNIST convnet conv32–conv64–pool–dense128–10, on 28×28×1 inputs, 10 logits
    resnet18q     cifar_resnet's ResNet18 at width ¼ (16…128 channels), 32×32×3 uint8 images, 10 logits;
                  the task's probe network: normalization inside, BatchNorm in inference mode with its
                  statistics held fixed (the NTK differentiates `params` of the whole variables dict)
    resnet18      the same at width 1 (11.17 M parameters): slow (~8 s per structured kernel at m = 20,
                  minutes for the other implementations), so not in the default --models
    vae_model     mnist_vae's "model" network: decoder(μ(x)), 784 logits summed; 784-dim pixels in [0, 1]
    vae_encoder   mnist_vae's "encoder" network: μ(x), 20 latents   (--models vae = both)
    tagger        greek_pos' transformer (2 blocks, d = 128, multi-hot embedding as the probe builds it):
                  sentence pieces of probe_max_tokens = 16 tokens × 8 feature ids, padded, with their
                  mask as output mask (14 tags; vocabulary of docs/models.md's Perseus run, 1.05 M parameters)
    gcn           molpcba_gnn's GCN (5 rounds, 256 wide, 128 task logits): synthetic molecules of ~26
                  atoms (~56 directed bonds), each padded alone to the largest of a probe pool
    actor, critic pong_actor_critic's CNNs (summed action logits / value) on 30×40×3 observations; as
                  in the analyzer, both take the whole {"actor", "critic"} variables

Each defaults to its task's default configuration (`get_task(name).default_config()`), its model
is built by the task's own `build_model` and its network by the task's own `probe` (pong:
`ntk_apply_fns`, which its probe calls), so the benchmark measures what the analyzer measures.

Each (model, implementation, m) runs in a fresh subprocess: compile once (first call), then
time `jax.block_until_ready(ntk(params, x))` for --repeats calls, each with new parameters of
the same shapes, and report the median. Memory is the worker's peak resident set
(`ru_maxrss`) minus its resident set after imports, parameters and inputs were in place, so
it counts what computing the kernel added (XLA buffers, compiled code, Python temporaries).

--protocol: the analyzer's time per checkpoint at the paper's protocol (K = 200 subsets of m = 20
points per probe set, two probe sets; pong has one), one fresh subprocess per model, measured two
ways after one warm-up call each: (a) one kernel per subset, `ntk(params, x[idx])` (the old way),
and (b) `NTK.subset_kernels(params, x, subsets, group=K)` (the per-point factors of as many
subsets as the memory budget allows at once, all K in one compiled call; the analyzer does (a)
on one device, because (b) measured slower on CPU); both on one NTK object, with the probe pool and subsets the analyzer would draw
(`draw_subsets`). --subsets K are timed and scaled linearly to 200 (default 200; fewer for the
slow models, see --help); (a) also stops after half of --timeout and is scaled from the subsets
it finished.

The neural-tangents numbers were measured in a separate legacy environment (jax 0.4.23) on the
same machine at m = 20, `vmap_axes=0`, best implementation (structured derivatives).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import types
from typing import Any, Callable

# The editable install may resolve `ntk_tracking` as a namespace; import from this checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# neural-tangents at m = 20 with vmap_axes=0: seconds per kernel of its best implementation
# (structured derivatives). No reference exists for the other models.
NT_REFERENCE = {"mlp": 0.006, "cnn": 0.262, "resnet18q": 0.761, "resnet18": 5.49}
NT_PEAK = {"resnet18": "1.5 GB peak"}
GOALS = {"mlp": 0.29, "cnn": 1.5}  # seconds per kernel at m = 20

MODELS = ("mlp", "cnn", "resnet18q", "resnet18", "vae_model", "vae_encoder", "tagger", "gcn", "actor",
          "critic")
ALIASES = {"vae": ("vae_model", "vae_encoder")}
DEFAULT_MODELS = ("mlp", "cnn", "resnet18q", "vae", "tagger", "gcn", "actor", "critic")
PAPER_SUBSETS = 200  # K of the paper's protocol
DEFAULT_SUBSETS = 200
SLOW_SUBSETS = {"cnn": 50, "resnet18q": 20, "resnet18": 2, "vae_model": 50, "vae_encoder": 50, "tagger": 2,
                "gcn": 4}  # --protocol defaults where 200 subsets take minutes

# greek_pos: the vocabulary and tagset of the README's run on UD Ancient Greek Perseus (dev file
# split into train/test: 1,050,766 parameters); the full treebank's vocabulary is larger.
TAGGER_VOCAB, TAGGER_TAGS = 6059, 14
MOLPCBA_TASKS = 128


@dataclasses.dataclass
class Bench:
    """One network as the analyzer measures it."""

    apply_fn: Callable  # apply_fn(variables, x)
    init: Callable  # key -> variables (the whole CV checkpoint the analyzer passes)
    probe_points: Callable  # (n, seed) -> (x, output_mask or None), n points
    count: Callable  # variables -> number of this network's parameters
    probe_sets: int = 2  # probe sets per analyzed checkpoint
    pool: int | None = None  # points a probe set holds (None: at least K·m)


def _count(tree) -> int:
    import jax

    return int(sum(a.size for a in jax.tree_util.tree_leaves(tree)))


def _reference(model_name: str) -> Bench:
    """The two reference networks on 28×28×1 float32 inputs."""
    import numpy as np
    from reference_networks import NETWORKS

    model = NETWORKS[model_name]()
    example = np.zeros((1, 28, 28, 1), np.float32)

    def points(n, seed):
        return np.random.default_rng(seed).normal(size=(n, 28, 28, 1)).astype(np.float32), None

    return Bench(lambda v, x: model.apply(v, x), lambda key: model.init(key, example), points,
                 lambda v: _count(v["params"]))


def _resnet(width: float) -> Bench:
    import numpy as np

    from ntk_tracking.tasks import get_task

    task = get_task("cifar_resnet")
    config = task.config(width=width)
    norm = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}  # CIFAR-10's train split
    images = np.zeros((1, 32, 32, 3), np.uint8)
    data = types.SimpleNamespace(info={"normalization": norm}, num_outputs=10, x_train=images, x_test=images)
    model = task.build_model(config, data)
    apply_fn = task.probe(config, data, model).networks["model"]

    def init(key):
        return dict(model.init(key, images.astype(np.float32), train=False))  # params, batch_stats

    def points(n, seed):
        return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), None

    return Bench(apply_fn, init, points, lambda v: _count(v["params"]))


def _vae(network: str) -> Bench:
    import jax.numpy as jnp
    import numpy as np

    from ntk_tracking.tasks import get_task

    task = get_task("mnist_vae")
    config = task.default_config()
    pixels = np.zeros((1, 784), np.float32)
    data = types.SimpleNamespace(x_train=pixels, x_test=pixels)
    model = task.build_model(config, data)
    apply_fn = task.probe(config, data, model).networks[network]

    def init(key):
        return {"params": model.init(key, jnp.zeros((1, 784), jnp.float32), key)["params"]}

    def points(n, seed):  # pixels in [0, 1], mostly background like MNIST's
        rng = np.random.default_rng(seed)
        return (rng.uniform(size=(n, 784)) * (rng.uniform(size=(n, 784)) < 0.2)).astype(np.float32), None

    def count(v):
        part = {"model": v["params"], "encoder": v["params"]["encoder"]}[network]
        return _count(part)

    return Bench(apply_fn, init, points, count)


def _tagger() -> Bench:
    import jax
    import numpy as np

    from ntk_tracking.data.ud_pos import FEATURES
    from ntk_tracking.tasks import get_task

    task = get_task("greek_pos")
    config = task.default_config()
    length, tokens, n_features = config.max_length, config.probe_max_tokens, len(FEATURES)

    def split(n, seed):
        """n encoded sentence pieces of 2…probe_max_tokens tokens, padded to max_length."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(2, tokens + 1, n)
        mask = np.arange(length)[None, :] < lengths[:, None]
        features = np.where(mask[..., None], rng.integers(1, TAGGER_VOCAB, (n, length, n_features)), 0)
        return types.SimpleNamespace(features=features.astype(np.int32), mask=mask)

    def data(n, seed):
        return types.SimpleNamespace(vocab=types.SimpleNamespace(size=TAGGER_VOCAB), num_tags=TAGGER_TAGS,
                                     splits={"train": split(n, seed)})

    model = task.build_model(config, data(1, 0))  # lookup embedding: the training module's params
    apply_fn = task.probe(config, data(2, 0), model).networks["model"]

    def init(key):
        example = jax.tree_util.tree_map(lambda a: a[:1], data(1, 0).splits["train"].__dict__)
        return {"params": model.init(key, example)["params"]}

    def points(n, seed):
        probe_set = task.probe(config, data(n, seed), model).sets["train"]
        return probe_set.inputs, probe_set.output_mask

    return Bench(apply_fn, init, points, lambda v: _count(v["params"]))


def synthetic_molecules(n: int, seed: int):
    """n molecule-like graphs: ogbg-molpcba's sizes (mean 26 atoms, 28 bonds, each bond both
    ways), its 9 atom and 3 bond integer feature codes, 128 labels."""
    import numpy as np

    from ntk_tracking.data.ogbg import Graphs

    rng = np.random.default_rng(seed)
    n_node = np.clip(np.rint(rng.normal(26, 6, n)), 6, 60).astype(np.int64)
    senders, receivers, n_edge = [], [], []
    for size in n_node:
        parent = np.array([rng.integers(0, i) for i in range(1, size)])  # a random tree
        ring = rng.choice(size, (size // 9, 2))  # ring closures
        s = np.concatenate([np.arange(1, size), ring[:, 0]])
        r = np.concatenate([parent, ring[:, 1]])
        senders.append(np.concatenate([s, r]))
        receivers.append(np.concatenate([r, s]))
        n_edge.append(2 * len(s))
    total_nodes, total_edges = int(n_node.sum()), int(sum(n_edge))
    return Graphs(nodes=rng.integers(0, 10, (total_nodes, 9)).astype(np.int8),
                  edges=rng.integers(0, 4, (total_edges, 3)).astype(np.int8),
                  senders=np.concatenate(senders).astype(np.int32),
                  receivers=np.concatenate(receivers).astype(np.int32),
                  node_offsets=np.concatenate([[0], np.cumsum(n_node)]).astype(np.int64),
                  edge_offsets=np.concatenate([[0], np.cumsum(n_edge)]).astype(np.int64),
                  labels=np.zeros((n, MOLPCBA_TASKS), np.float16))


def _gcn() -> Bench:
    import jax
    import jraph
    import numpy as np

    from ntk_tracking.tasks import get_task

    task = get_task("molpcba_gnn")
    config = task.default_config()
    model = task.build_model(config, types.SimpleNamespace(num_tasks=MOLPCBA_TASKS))

    def probe(n, seed):
        graphs = synthetic_molecules(n, seed)
        data = types.SimpleNamespace(molecules=types.SimpleNamespace(train=graphs, test=graphs),
                                     num_tasks=MOLPCBA_TASKS)
        return task.probe(config, data, model)

    apply_fn = probe(2, 0).networks["model"]

    def init(key):
        p = probe(2, 0).sets["train"].inputs
        graph = jraph.GraphsTuple(nodes=p["nodes"][0], edges=p["edges"][0], senders=p["senders"][0],
                                  receivers=p["receivers"][0], n_node=p["n_node"][0], n_edge=p["n_edge"][0],
                                  globals=None)
        return {"params": model.init(key, graph)["params"]}

    def points(n, seed):
        # The probe pads every molecule to the largest one of its pool (probe_pool molecules).
        pool = probe(max(n, config.probe_pool), seed).sets["train"].inputs
        return jax.tree_util.tree_map(lambda a: a[:n], pool), None

    return Bench(apply_fn, init, points, lambda v: _count(v["params"]), pool=config.probe_pool)


def _pong(network: str) -> Bench:
    import numpy as np

    from ntk_tracking.models.actor_critic import init_params, ntk_apply_fns
    from ntk_tracking.tasks import get_task

    task = get_task("pong_actor_critic")
    config = task.default_config()
    data = task.load_data(config)  # the environment
    obs_shape = tuple(data.env.obs_shape)
    networks = task.build_model(config, data)  # the (actor, critic) pair
    apply_fn = ntk_apply_fns(networks)[network]

    def init(key):  # the CV checkpoint: task.cv_variables
        params = init_params(key, networks, obs_shape)
        return {"actor": {"params": params["actor"]}, "critic": {"params": params["critic"]}}

    def points(n, seed):  # rendered frames: a few lit pixels per channel (paddles, ball)
        rng = np.random.default_rng(seed)
        return (rng.uniform(size=(n,) + obs_shape) < 0.02).astype(np.float32), None

    return Bench(apply_fn, init, points, lambda v: _count(v[network]), probe_sets=len(task.default_probe_sets()),
                 pool=config.probe_states)


def build(model_name: str) -> Bench:
    if model_name in ("mlp", "cnn"):
        return _reference(model_name)
    if model_name in ("resnet18q", "resnet18"):
        return _resnet(0.25 if model_name == "resnet18q" else 1.0)
    if model_name in ("vae_model", "vae_encoder"):
        return _vae(model_name.removeprefix("vae_"))
    if model_name == "tagger":
        return _tagger()
    if model_name == "gcn":
        return _gcn()
    if model_name in ("actor", "critic"):
        return _pong(model_name)
    raise ValueError(f"unknown model {model_name!r}")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _param_sets(bench: Bench, count: int) -> list:
    import jax

    init = jax.jit(bench.init)
    sets = [init(jax.random.PRNGKey(i)) for i in range(count)]
    jax.block_until_ready(sets)
    return sets


def worker(model_name: str, impl: str, m: int, repeats: int, memory_budget: int | None,
           limit_s: float) -> dict:
    """One configuration, in this (fresh) process; returns the measurements.

    Stops repeating once `limit_s` (counted from the first call) would be exceeded, after at
    least one timed repeat; the number of repeats done is reported.
    """
    import jax

    from ntk_tracking import NTK

    bench = build(model_name)
    x, mask = bench.probe_points(m, 0)
    param_sets = _param_sets(bench, min(repeats, 3) + 1)
    baseline_kib = _peak_kib()

    ntk = NTK(bench.apply_fn, impl, memory_budget=memory_budget)
    _, out_shape, _, act = ntk._prepare(param_sets[0], x, mask)
    plan = ntk._plan(param_sets[0], m, out_shape, act, x)  # (implementation, block, chunk)
    t0 = time.perf_counter()
    jax.block_until_ready(ntk(param_sets[0], x, mask))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for r in range(repeats):
        if times and time.perf_counter() - t0 + statistics.median(times) > limit_s:
            break
        params = param_sets[1 + r % (len(param_sets) - 1)]
        c0, start = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(ntk(params, x, mask))
        times.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - c0)
    return {
        "n_params": bench.count(param_sets[0]), "first_s": first, "times": times, "n": len(times),
        "median_s": statistics.median(times), "cpu_s": statistics.median(cpu),
        "runs": plan[0], "block": plan[1], "chunk": plan[2],
        "peak_mib": (_peak_kib() - baseline_kib) / 1024, "baseline_mib": baseline_kib / 1024,
        "input": _describe(x, mask),
    }


def _describe(x, mask) -> str:
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    text = ", ".join(f"{a.dtype}{list(a.shape[1:])}" for a in leaves)
    return text + ("" if mask is None else f"; output mask {list(mask.shape[1:])}")


def protocol_worker(model_name: str, impl: str, m: int, n_subsets: int, memory_budget: int | None,
                    limit_s: float) -> dict:
    """The analyzer's time per probe set at K subsets of m points, (a) kernel by kernel and (b)
    with subset_kernels(group=K), each after one warm-up call; (a) stops early past limit_s / 2."""
    import jax
    import numpy as np

    from ntk_tracking import NTK
    from ntk_tracking.ntk import draw_subsets
    from ntk_tracking.ntk.kernel import take

    bench = build(model_name)
    pool = bench.pool or n_subsets * m
    x, mask = bench.probe_points(pool, 0)
    subsets = draw_subsets(pool, n_subsets, m, seed=0)
    warm, params = _param_sets(bench, 2)
    ntk = NTK(bench.apply_fn, impl, memory_budget=memory_budget)

    baseline_kib = _peak_kib()
    # (a) one kernel per subset.
    t0 = time.perf_counter()
    jax.block_until_ready(ntk(warm, take(x, subsets[0]), take(mask, subsets[0])))
    first_a = time.perf_counter() - t0
    kernels_a = []
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for idx in subsets:
        kernels_a.append(np.asarray(ntk(params, take(x, idx), take(mask, idx))))
        if time.perf_counter() - t0 > limit_s / 2:
            break
    time_a, cpu_a = time.perf_counter() - t0, _cpu_seconds() - c0
    peak_a = _peak_kib()
    # (b) all subsets in one call.
    t0 = time.perf_counter()
    jax.block_until_ready(ntk.subset_kernels(warm, x, subsets, mask, group=len(subsets)))
    first_b = time.perf_counter() - t0
    c0, t0 = _cpu_seconds(), time.perf_counter()
    kernels_b = np.asarray(ntk.subset_kernels(params, x, subsets, mask, group=len(subsets)))
    time_b, cpu_b = time.perf_counter() - t0, _cpu_seconds() - c0
    n_a = len(kernels_a)
    diff = np.max(np.abs(np.stack(kernels_a) - kernels_b[:n_a])) / np.max(np.abs(kernels_b[:n_a]))
    _, out_shape, _, act = ntk._prepare(params, take(x, subsets[0]), take(mask, subsets[0]))
    plan_a = ntk._plan(params, m, out_shape, act, take(x, subsets[0]))
    plan_b = ntk._plan(params, n_subsets * m, out_shape, act, take(x, subsets[0]))
    return {
        "n_params": bench.count(params), "pool": pool, "probe_sets": bench.probe_sets, "runs": plan_a[0],
        "n_a": n_a, "first_a": first_a, "time_a": time_a, "cpu_a": cpu_a,
        "first_b": first_b, "time_b": time_b, "cpu_b": cpu_b, "block_b": plan_b[1],
        "max_rel_diff": float(diff),
        "peak_a_mib": (peak_a - baseline_kib) / 1024, "peak_mib": (_peak_kib() - baseline_kib) / 1024,
    }


def run_config(mode, model_name, impl, m, args, n_subsets=None) -> dict:
    cmd = [sys.executable, __file__, f"--_{mode}", model_name, impl, str(m), "--repeats",
           str(args.repeats), "--timeout", str(args.timeout)]
    if n_subsets is not None:
        cmd += ["--subsets", str(n_subsets)]
    if args.memory_budget:
        cmd += ["--memory-budget", str(args.memory_budget)]
    # Imports, parameter init and (protocol) the subset_kernels calls come on top of the limit.
    limit = args.timeout + 60 if mode == "worker" else 3 * args.timeout + 120
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {limit:.0f} s (--timeout {args.timeout:.0f}); not measured"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"skipped": "worker failed: " + lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def expand(models) -> list[str]:
    return [name for model in models for name in ALIASES.get(model, (model,))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--points", type=int, nargs="+", default=[20, 100],
                        help="m values (--protocol: the first, default 20)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        choices=list(MODELS) + list(ALIASES),
                        help="default: all but resnet18 (11.17 M parameters; its Jacobian and NTVP "
                             "runs take many minutes)")
    parser.add_argument("--implementations", nargs="+", default=None,
                        choices=["jacobian", "ntvp", "structured", "auto"],
                        help="default: jacobian ntvp structured; --protocol: auto (the analyzer's)")
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="bytes for NTK(memory_budget=...); default: the engine's default")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per configuration: repeats stop early to fit; a "
                             "configuration whose first call + one repeat overrun it is skipped "
                             "(--protocol: (a) stops after half of it and is scaled)")
    parser.add_argument("--protocol", action="store_true",
                        help="seconds per analyzed checkpoint, kernel by kernel vs subset_kernels(group=K)")
    parser.add_argument("--subsets", type=int, default=None,
                        help=f"--protocol: subsets K timed per probe set, scaled to {PAPER_SUBSETS} "
                             f"(default {DEFAULT_SUBSETS}; {SLOW_SUBSETS})")
    parser.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_protocol", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        model_name, impl, m = args._worker
        print(json.dumps(worker(model_name, impl, int(m), args.repeats, args.memory_budget,
                                args.timeout)))
        return
    if args._protocol:
        model_name, impl, m = args._protocol
        print(json.dumps(protocol_worker(model_name, impl, int(m), args.subsets, args.memory_budget,
                                         args.timeout)))
        return

    import jax

    models = expand(args.models)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; float32", end="")
    if args.protocol:
        protocol(models, args)
    else:
        print(f", {args.repeats} repeats")
        per_kernel(models, args)


def per_kernel(models, args):
    impls = args.implementations or ["jacobian", "ntvp", "structured"]
    header = (f"{'model':11} {'impl':10} {'runs':10} {'m':>4} {'block':>5} {'first s':>8} {'n':>2} "
              f"{'median s':>9} {'min s':>8} {'cpu s':>7} {'peak MiB':>8}   "
              f"neural-tangents at m=20 (ours / nt)")
    print(header)
    print("-" * len(header))
    notes, seen = [], {}
    for model_name in models:
        for impl in impls:
            for m in args.points:
                r = run_config("worker", model_name, impl, m, args)
                if "skipped" in r:
                    print(f"{model_name:11} {impl:10} {'':10} {m:>4}   SKIPPED: {r['skipped']}", flush=True)
                    notes.append(f"{model_name}/{impl}/m={m} skipped: {r['skipped']}")
                    continue
                refs = ""
                if m == 20 and model_name in NT_REFERENCE:
                    nt = NT_REFERENCE[model_name]
                    refs = f"structured {nt:.3g} s (x{r['median_s'] / nt:.2f})"
                if m == 20 and model_name in GOALS:
                    goal = GOALS[model_name]
                    verdict = "met" if r["median_s"] < goal else "MISSED"
                    notes.append(f"goal {model_name}/{impl} m=20 < {goal} s: {verdict} "
                                 f"({r['median_s']:.3f} s)")
                print(f"{model_name:11} {impl:10} {r['runs']:10} {m:>4} {r['block']:>5} {r['first_s']:>8.2f} "
                      f"{r['n']:>2} {r['median_s']:>9.3f} {min(r['times']):>8.3f} "
                      f"{r['cpu_s']:>7.2f} {r['peak_mib']:>8.0f}   {refs}", flush=True)
                seen[model_name] = r
    print()
    print("runs = the implementation computed (auto resolved); block = points per block (m×m kernel")
    print("computed in upper-triangle tiles of this size); first s = first call (trace + XLA compile +")
    print("one kernel); n = timed repeats, new params each; median/min s = wall seconds per kernel;")
    print("cpu s = median user+sys CPU seconds per kernel (robust to other load on the machine; sys is")
    print("mostly page faults of fresh buffers); peak MiB = worker's ru_maxrss minus its ru_maxrss after")
    print("imports, params and inputs. neural-tangents: its best (structured derivatives, vmap_axes=0),")
    print("m = 20" + "".join(f"; {k} {v}" for k, v in NT_PEAK.items()) + ".")
    for name, r in seen.items():
        print(f"{name}: {r['n_params']:,} params; input per point {r['input']}")
    for note in notes:
        print(note)


def protocol(models, args):
    impls = args.implementations or ["auto"]
    m = args.points[0] if args.points != [20, 100] else 20
    print(f"; m = {m}, K = {PAPER_SUBSETS} subsets per probe set")
    header = (f"{'model':11} {'impl':10} {'runs':10} {'K timed':>7} {'(a) 1st s':>9} {'(a) s/kernel':>12} "
              f"{'(a) s/ckpt':>10} {'(b) 1st s':>9} {'(b) s/ckpt':>10} {'a / b':>6} {'cpu a/b':>7} "
              f"{'peak MiB a, b':>13} {'rel diff':>8}")
    print(header)
    print("-" * len(header))
    notes, seen = [], {}
    for model_name in models:
        k = args.subsets or SLOW_SUBSETS.get(model_name, DEFAULT_SUBSETS)
        for impl in impls:
            r = run_config("protocol", model_name, impl, m, args, n_subsets=k)
            if "skipped" in r:
                print(f"{model_name:11} {impl:10} {'':10} {k:>7}   SKIPPED: {r['skipped']}", flush=True)
                notes.append(f"{model_name}/{impl} skipped: {r['skipped']}")
                continue
            sets = r["probe_sets"]
            per_a = r["time_a"] / r["n_a"]
            ckpt_a = per_a * PAPER_SUBSETS * sets
            ckpt_b = r["time_b"] / k * PAPER_SUBSETS * sets
            cpu_ratio = (r["cpu_a"] / r["n_a"]) / (r["cpu_b"] / k)
            timed = f"{k}" if r["n_a"] == k else f"{r['n_a']}/{k}"
            print(f"{model_name:11} {impl:10} {r['runs']:10} {timed:>7} {r['first_a']:>9.2f} {per_a:>12.4f} "
                  f"{ckpt_a:>10.1f} {r['first_b']:>9.2f} {ckpt_b:>10.1f} {ckpt_a / ckpt_b:>6.2f} "
                  f"{cpu_ratio:>7.2f} {r['peak_a_mib']:>6.0f},{r['peak_mib']:>6.0f} {r['max_rel_diff']:>8.1e}",
                  flush=True)
            if k != PAPER_SUBSETS or r["n_a"] != k:
                notes.append(f"{model_name}/{impl}: (a) timed on {r['n_a']} subsets, (b) on {k}; both scaled "
                             f"linearly to K = {PAPER_SUBSETS}")
            if sets != 2:
                notes.append(f"{model_name}: its task has {sets} probe set(s) per checkpoint")
            seen[model_name] = r
    print()
    print("(a) = one ntk(params, x[idx]) per subset (the analyzer on one device), (b) = NTK.subset_kernels(")
    print("params, x, subsets, group=K) (all K subsets in one compiled call); each timed after one warm-up call (its")
    print("'1st s': trace + compile + one kernel / all K kernels) with new parameters. s/kernel = (a)'s")
    print("wall seconds per subset; s/ckpt = wall seconds per analyzed checkpoint of this network:")
    print(f"K = {PAPER_SUBSETS} subsets × its probe sets (2: train and test); a / b = speed-up of (b), wall;")
    print("cpu a/b = the same in user+sys CPU seconds; peak MiB = ru_maxrss growth after (a), after both;")
    print("rel diff = max |(a) − (b)| / max |(b)| over the kernels (a) computed.")
    for name, r in seen.items():
        print(f"{name}: {r['n_params']:,} params; probe pool {r['pool']} points")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
