"""The empirical NTK against a FLOP floor, every paper network in one process (issue 29).

    python benchmarks/ntk_floor.py --json benchmarks/results/ntk_floor.json   # every paper network
    python benchmarks/ntk_floor.py --models mlp cnn --repeats 3 --parts       # quick; no parts
    python benchmarks/ntk_floor.py --models tagger gcn --parts tagger gcn     # where their time goes

Networks are built by `ntk_speed.build` (each task's default configuration, its own probe, synthetic
inputs of the real shapes); m = --points (default 20). Per network, all in this one process:

- O = outputs per point that count: the share of the output the probe's mask keeps, averaged over
  the m points (O_total = the output size the engine runs its backward passes over).
- F = XLA's FLOPs for one forward pass of one point: `jax.jit(apply_fn).lower(params, x[:1])
  .compile().cost_analysis()["flops"]` (a dict in JAX 0.10; a one-element list in older JAX,
  both handled). XLA counts a multiply-add as 2 FLOPs and a loop body once (`while` loops in the
  HLO are counted and reported; none of the paper networks has one).
- R = this process's f32 matmul rate: median of 7 jitted `jnp.dot` of two 2048² float32 matrices,
  2·2048³ FLOPs each, measured just before the network's engine timing.
- engine s = median of --repeats calls (more, up to 300, until the timed calls add up to 1 s: a
  millisecond network's median of 3 moves by ±30 % between runs) of `NTK(apply_fn)(params, x, output_mask)`, each with
  `block_until_ready`, after one compiling call with other parameters of the same shapes; each
  call alternates with one call of the backward passes below (`interleaved`), so the engine and
  its measured bound are timed in the same minutes.
- floor s = m·O·F / R (each of the m·O kept outputs needs a backward pass, at least a forward's FLOPs).
- refined floor s = (m·O·F + C) / R, with C the FLOPs of the Gram contraction as the engine forms
  it: XLA's cost analysis of the engine's own compiled contraction function
  (`NTK._contract_factors`, i.e. `structured.contract`, or `_contract` for the Jacobian method)
  lowered at the shapes of the factors of one block (`jax.eval_shape` of `NTK._factors` at the
  block size `NTK._plan` chose), times the k(k+1)/2 tiles the engine computes for k = ⌈m/block⌉
  blocks, plus G, the contraction over positions that forms the per-point gradient Σ_t a_t ⊗ δ_ot
  (a convolution's patches × cotangents) where the engine forms one instead of Gram matrices
  (`gradient_flops`: 2·m·O·t·d_in·d_out per such layer, from the shapes). C covers the
  per-point-Jacobian matrix products, the pairwise (positions × positions) Gram matrices of inputs
  and cotangents, and their products, and the gradients' formation. Per layer the engine takes the
  fewer multiply-adds of the two ways (pairwise Grams, or the gradient and its Gram), so C is that
  minimum. It is a bound on this engine's algorithm, not on every algorithm.
- engine FLOPs = XLA's count for the engine's whole call: the factor calls (k where every block's
  factors are held, else 1 + k(k−1)/2: the column blocks recomputed for every row) × the factor
  function's FLOPs + C; engine FLOPs / R is the time at the matmul rate.
- block, implementation, keep: `NTK._plan` at the engine's default memory budget (keep: every
  block's factors are held at once, so k blocks cost k factor calls).
- compiles: XLA backend compilations (jax.monitoring) during the first, second and third call.
- measured bound s = passes s + C/R, where passes s is XLA's own time for the backward passes alone
  (every output's cotangent carried back to the inputs, no weight gradients), the faster of two
  batchings (vmapped over the outputs at all m points at once, or the one-point Jacobian vmapped
  over the points; the faster by a median of --repeats calls, then timed alternately with the
  engine), scaled from O_total to the O kept (`propagation`). Where XLA runs a
  network's small convolutions or attention far below R, this bound holds instead of the FLOP floor:
  the engine needs every layer's cotangent of every kept output.

--parts (default: tagger and gcn, where in --models): one more call with every compiled part of the
engine wrapped and timed (block_until_ready after each): prepare (host: shapes, mask), plan, factor
calls, contractions, assembly, and the rest (host); each part's FLOPs / time; the planner's
estimated per-point bytes (its terms; the plan splits the points only where XLA's memory analysis
of the factor and contraction functions says the budget requires it) against XLA's memory analysis
of the factor function at the planned block;
padding (tokens / nodes / edges real vs padded, F of point 0 unpadded); host transfers (bytes of
x and mask converted per call, and whether a call makes any implicit transfer under
`jax.transfer_guard("disallow")`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ntk_speed import ALIASES, MODELS, _param_sets, build, expand  # noqa: E402

from ntk_tracking.ntk.kernel import KEEP  # noqa: E402

PAPER_MODELS = ("mlp", "cnn", "resnet18q", "resnet18", "vae_model", "vae_encoder", "tagger", "gcn", "actor",
                "critic")
MEMORY_CAP = 5.8 * 1024**3  # bytes of resident memory: stop rather than crowd the machine
COMPILES = {"backend": 0, "backend_s": 0.0, "trace": 0}
LOOPS: dict = {}  # implementation -> while loops in the factor and contraction HLO (counted once by XLA)
MIN_TIMED_S, MAX_REPEATS = 1.0, 300  # timed calls of a fast network: until they add up to a second
PEAK = {"rss": 0}  # resident bytes, the largest the watcher saw since the last reset


def _on_event(name, secs, **_):
    if name == "/jax/core/compile/backend_compile_duration":
        COMPILES["backend"] += 1
        COMPILES["backend_s"] += secs
    elif name == "/jax/core/compile/jaxpr_trace_duration":
        COMPILES["trace"] += 1


def _watch_memory():
    """Exit the process if its resident set passes MEMORY_CAP (JSON is written after each model)."""
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        PEAK["rss"] = max(PEAK["rss"], rss)
        if rss > MEMORY_CAP:
            print(f"STOPPED: resident memory {rss / 2**30:.1f} GiB over the cap", flush=True)
            os._exit(3)
        time.sleep(0.02)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cost(compiled) -> dict:
    """XLA's cost analysis as a dict (JAX ≥ 0.4.3x returns a dict, older ones a list of one)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def flops(compiled) -> float:
    return float(cost(compiled).get("flops", float("nan")))


def while_loops(compiled) -> int:
    return compiled.as_text().count(" while(")


def matmul_rate(n: int = 2048, repeats: int = 7) -> float:
    """f32 GFLOP/s of jnp.dot on n×n matrices, median of `repeats`."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _timed_call(ntk, params, x, mask):
    import jax

    before = dict(COMPILES)
    t0 = time.perf_counter()
    jax.block_until_ready(ntk(params, x, mask))
    return time.perf_counter() - t0, COMPILES["backend"] - before["backend"]


def _factor_shapes(ntk, params, x, mask, block):
    """(compiled factor function, abstract factors of one block) for the structured path."""
    import jax

    calls, inert = ntk._discover(params, x), ntk._inert(params, x)
    kw = dict(block=block, full=False, calls=calls, inert=inert)
    compiled = ntk._factors.lower(params, x, mask, 0, **kw).compile()
    shapes = jax.eval_shape(functools.partial(ntk._factors, **kw), params, x, mask, 0)
    return compiled, shapes


def _contraction(ntk, impl, params, x, mask, block):
    """(factor FLOPs per call, contraction FLOPs per tile, factor memory analysis) at this block."""
    import jax

    if impl == "structured":
        fac, shapes = _factor_shapes(ntk, params, x, mask, block)
        con = ntk._contract_factors.lower(shapes, shapes, full=False).compile()
    elif impl == "jacobian":
        fac = ntk._jac.lower(params, x, mask, 0, block=block, full=False).compile()
        shapes = jax.eval_shape(functools.partial(ntk._jac, block=block, full=False), params, x, mask, 0)
        con = ntk._contract.lower(shapes, shapes).compile()
    else:
        return None, None, None
    LOOPS[impl] = (while_loops(fac), while_loops(con))
    return flops(fac), flops(con), fac.memory_analysis()


def gradient_flops(ntk, params, x, block, o_kept, m) -> float:
    """FLOPs of the contraction over positions that forms a per-point gradient Σ_t a_t ⊗ δ_ot
    (patches × cotangents, the einsum of `structured.point_factors`), for every structured call
    the engine forms a gradient for rather than Gram matrices (`structured._pairwise_cheaper` at
    this block): 2 · m · O · t · d_in · d_out, with t the call's positions per point (calls sharing
    a kernel summed), O the kept outputs. Counted from the shapes, like XLA counts a dot."""
    from ntk_tracking.ntk import structured

    calls = ntk._structure(params, x)[0]
    leaves = jax_leaves(params)
    groups: dict = {}
    for _, k, b, shape, kind, static in calls:
        d_out = structured._out_features(kind, static, shape)
        n_feat = static[1] if kind == "dense_general" else 1
        t = math.prod(shape[:len(shape) - n_feat])  # the leading 1 is the point axis
        d_in = leaves[k].size // d_out
        g = groups.setdefault((k, b), [0, d_in, d_out])
        g[0] += t
    n_out = math.prod(ntk._prepare(params, x, None)[1])
    total = 0.0
    for t, d_in, d_out in groups.values():
        if not structured._pairwise_cheaper(t, d_in, d_out, n_out, block):
            total += 2.0 * m * o_kept * t * d_in * d_out
    return total


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _median_seconds(compiled, args, repeats) -> float:
    import jax

    jax.block_until_ready(compiled(*args))
    times = []
    while _more(times, repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _more(times, repeats) -> bool:
    """At least `repeats` timed calls, and more while they add up to under MIN_TIMED_S (at most
    MAX_REPEATS): a median of 3 millisecond calls moves by ±30 % between runs."""
    return len(times) < repeats or (sum(times) < MIN_TIMED_S and len(times) < MAX_REPEATS)


def propagation(apply_fn, params, x, out_shape, repeats):
    """XLA's seconds for the backward passes alone: every output's cotangent carried back to the
    inputs, with no weight gradients formed. The engine needs every layer's cotangent of every
    kept output, so it does at least this. Two batchings, the faster counts: (a) each output's
    cotangent e_o at all m points at once, vmapped over the outputs (`jax.vjp`); (b) per point,
    `jax.jacrev` of the one-point network, vmapped over the points (the engine's own batching;
    float inputs only). The time is scaled from the O_total outputs run to the O kept. The
    inputs' float leaves are differentiated (uint8 images as float32: the same network); where
    every input is an integer token (the tagger), the parameters named `embed…` instead (a),
    whose cotangent is a scatter-add. Returns (facts, (compiled, args) of the faster batching),
    or None where nothing can be differentiated; its seconds are timed with the engine's
    (`interleaved`)."""
    import jax
    import jax.numpy as jnp

    xj = jax.tree_util.tree_map(jnp.asarray, x)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not any("embed" in n for n in names):  # integer images (ResNet18's uint8): the same network on floats
        xj = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.uint8 else a, xj)
    leaves, tree = jax.tree_util.tree_flatten(xj)
    floats = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating)]
    if floats:
        def forward(v):
            full = list(leaves)
            for i, leaf in zip(floats, v):
                full[i] = leaf
            return apply_fn(params, jax.tree_util.tree_unflatten(tree, full))
        wrt = [leaves[i] for i in floats]
    else:
        flat, ptree = jax.tree_util.tree_flatten_with_path(params)
        chosen = [i for i, (path, _) in enumerate(flat) if "embed" in jax.tree_util.keystr(path)]
        if not chosen:
            return None

        def forward(v):
            full = [leaf for _, leaf in flat]
            for i, leaf in zip(chosen, v):
                full[i] = leaf
            return apply_fn(jax.tree_util.tree_unflatten(ptree, full), xj)
        wrt = [flat[i][1] for i in chosen]
    o_total = math.prod(out_shape)
    m = leaves[0].shape[0]

    @jax.jit
    def by_outputs(v):
        out, pullback = jax.vjp(forward, v)
        basis = jnp.eye(o_total, dtype=out.dtype).reshape((o_total, 1) + tuple(out_shape))
        return jax.vmap(pullback)(jnp.broadcast_to(basis, (o_total, m) + tuple(out_shape)))

    candidates = {"outputs": (by_outputs.lower(wrt).compile(), (wrt,))}
    if floats:
        def one_point(v, point):
            full = list(point)
            for i, leaf in zip(floats, v):
                full[i] = leaf
            return apply_fn(params, jax.tree_util.tree_unflatten(tree, [a[None] for a in full]))[0]

        by_points = jax.jit(jax.vmap(jax.jacrev(one_point)))
        candidates["points"] = (by_points.lower(wrt, leaves).compile(), (wrt, leaves))
    seconds = {k: _median_seconds(c, a, repeats) for k, (c, a) in candidates.items()}
    batching = min(seconds, key=seconds.get)
    return ({"propagation_wrt": "inputs" if floats else "embedding", "propagation_batching": batching,
             "propagation_total_s": seconds}, candidates[batching])


def interleaved(ntk, params, x, mask, passes, repeats) -> tuple[list, list]:
    """The engine's call and the backward passes' compiled call (if any), alternately, until each has
    `repeats` calls (more while they add up to under MIN_TIMED_S): both medians then come from
    the same minutes. A kernel's time drifts by 10-15 % over minutes here, and a millisecond
    network's median moves by ±30 % between runs; timed apart, the ratio carried that drift."""
    import jax

    engine, backward = [], []
    while _more([t for t, _ in engine], repeats):
        engine.append(_timed_call(ntk, params, x, mask))
        if passes is not None:
            compiled, args = passes
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            backward.append(time.perf_counter() - t0)
    return engine, backward


def measure(name: str, m: int, repeats: int) -> dict:
    """One network's row: O, F, R, engine seconds, floors, plan, compiles."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ntk_tracking import NTK

    load0 = os.getloadavg()[0]
    bench = build(name)
    x, mask_in = bench.probe_points(m, 0)
    warm, params = _param_sets(bench, 2)
    ntk = NTK(bench.apply_fn)
    _, out_shape, mask, act = ntk._prepare(params, x, mask_in)
    impl, block, chunk = ntk._plan(params, m, out_shape, act, jax.tree_util.tree_map(jnp.asarray, x), mask)
    keep = chunk == KEEP
    o_total = math.prod(out_shape)
    o_kept = float(np.asarray(mask).reshape(m, -1).sum(1).mean())

    one = jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], x)
    fwd = jax.jit(bench.apply_fn).lower(params, one).compile()
    f_one, loops = flops(fwd), while_loops(fwd)

    rate = matmul_rate()
    first, compiles1 = _timed_call(ntk, warm, x, mask_in)
    found = propagation(bench.apply_fn, params, x, out_shape, repeats)
    passes, compiled_passes = found if found else ({}, None)
    calls, backward = interleaved(ntk, params, x, mask_in, compiled_passes, repeats)
    times = [t for t, _ in calls]
    compiles = [compiles1] + [c for _, c in calls]
    engine = statistics.median(times)

    xj = jax.tree_util.tree_map(jnp.asarray, x)
    fac_flops, con_flops, mem = _contraction(ntk, impl, params, xj, mask, block)
    k = -(-m // block)
    # Every block's factors held (keep): k factor calls; else the column blocks are recomputed per row.
    tiles, factor_calls = k * (k + 1) // 2, k if keep else 1 + k * (k - 1) // 2
    floor = m * o_kept * f_one / (rate * 1e9)
    row = {
        "model": name, "n_params": bench.count(params), "m": m, "implementation": impl, "block": block,
        "blocks": k, "keep_factors": keep, "tiles": tiles, "factor_calls": factor_calls,
        "outputs_kept": o_kept, "outputs_total": o_total, "forward_flops": f_one, "forward_while_loops": loops,
        "matmul_gflops": rate, "engine_s": engine, "engine_times": times, "first_call_s": first,
        "compiles_per_call": compiles, "floor_s": floor, "ratio": engine / floor,
        "load_before": load0, "load_after": os.getloadavg()[0], "input": _describe(x, mask_in),
    }
    if con_flops is not None:
        positions = gradient_flops(ntk, params, xj, block, o_kept, m) if impl == "structured" else 0.0
        contraction = tiles * con_flops + positions
        engine_flops = factor_calls * fac_flops + tiles * con_flops
        refined = (m * o_kept * f_one + contraction) / (rate * 1e9)
        row.update({
            "factor_flops_per_call": fac_flops, "contraction_flops_per_tile": con_flops,
            "gradient_flops": positions,
            "contraction_flops": contraction, "refined_floor_s": refined, "refined_ratio": engine / refined,
            "engine_flops": engine_flops, "engine_flops_s": engine_flops / (rate * 1e9),
            "engine_vs_its_flops": engine / (engine_flops / (rate * 1e9)),
            "factor_contract_while_loops": LOOPS.get(impl),
            "factor_temp_mib": mem.temp_size_in_bytes / 2**20, "factor_output_mib": mem.output_size_in_bytes / 2**20,
        })
        if backward:
            passes["propagation_s"] = statistics.median(backward) * o_kept / o_total
            bound = passes["propagation_s"] + contraction / (rate * 1e9)
            row.update(passes, propagation_times=backward, measured_bound_s=bound,
                       measured_bound_ratio=engine / bound)
    return row, (bench, ntk, x, mask_in, mask, params, out_shape, act, rate, engine)


def protocol(name, ctx, n_subsets: int, limit_s: float, chunks: int = 4) -> dict:
    """The analyzer's measurement of one checkpoint at K subsets of m points on each probe set
    (`Measurement.run`, as the analyzer calls it), against K × probe sets × the engine's seconds
    per kernel at the probe pool's shapes (a pool pads to its own largest point: the GCN's
    molecules to 50 nodes where the 20-point sample has 45), timed on the first subset after one
    call that compiles, as an analysis does once for all its checkpoints (so is the stacking of
    the parts' kernels, compiled per number of subsets). Past `limit_s` of
    predicted time, K is cut to what fits and the time scaled.

    A kernel's time drifts by 10-15 % over minutes here, more than the 10 % this measures, so the
    subsets are measured in `chunks` parts (each its own `Measurement`, so the per-run work is
    counted once per part: conservative), with the reference kernel timed before the first part,
    between parts and after the last; each part is compared with the median of the reference
    calls on both sides of it."""
    import jax
    import numpy as np

    from ntk_tracking.ntk import Measurement, draw_subsets

    bench, ntk, x, mask_in, mask, params, out_shape, act, rate, _ = ctx
    m = jax.tree_util.tree_leaves(x)[0].shape[0]
    pool = bench.pool or n_subsets * m
    points, pool_mask = bench.probe_points(pool, 1)
    subsets = draw_subsets(pool, n_subsets, m, seed=0)
    first = jax.tree_util.tree_map(lambda a: np.asarray(a)[subsets[0]], points)
    first_mask = None if pool_mask is None else np.asarray(pool_mask)[subsets[0]]
    jax.block_until_ready(ntk(params, first, first_mask))  # compiles at the pool's shapes

    def kernel_times(repeats):
        times = []
        while _more(times, repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(ntk(params, first, first_mask))
            times.append(time.perf_counter() - t0)
        return times

    references = [kernel_times(3)]
    engine = statistics.median(references[0])
    k = n_subsets if bench.probe_sets * n_subsets * engine <= limit_s else \
        max(2, int(limit_s / (bench.probe_sets * engine)))
    parts = [p for p in np.array_split(subsets[:k], min(chunks, k)) if len(p)]
    measurements = [[Measurement(ntk, points, p, pool_mask) for _ in range(bench.probe_sets)] for p in parts]
    kernel = ntk(params, first, first_mask)
    for size in {len(p) for p in parts}:  # `subset_kernels` stacks K kernels: compiled once per K
        jax.block_until_ready(jax.numpy.stack([kernel] * size))
    rss0 = PEAK["rss"] = _rss()
    took, kernels = [], []
    for i, sets in enumerate(measurements):
        t0 = time.perf_counter()
        for measurement in sets:
            values = dict(measurement.run(params))
        took.append(time.perf_counter() - t0)
        assert np.isfinite(values["entropy"])
        references.append(kernel_times(1))
        reference = statistics.median(references[i] + references[i + 1])
        kernels.append(bench.probe_sets * len(parts[i]) * reference)
    scale = n_subsets / k
    everything = [t for r in references for t in r]
    return {"subsets": n_subsets, "subsets_timed": k, "parts": len(parts), "probe_sets": bench.probe_sets,
            "pool": pool, "seconds_timed": sum(took), "per_checkpoint_s": sum(took) * scale,
            "kernels_s": sum(kernels) * scale, "engine_s_at_pool_shapes": statistics.median(everything),
            "reference_medians_s": [statistics.median(r) for r in references],
            "ratio_by_part": [t / c for t, c in zip(took, kernels)],
            "pool_input": _describe(first, first_mask), "ratio_to_kernels": sum(took) / sum(kernels),
            "peak_growth_mib": (PEAK["rss"] - rss0) / 2**20, "memory_budget_mib": ntk.memory_budget / 2**20}


def _describe(x, mask) -> str:
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    text = ", ".join(f"{a.dtype}{list(a.shape[1:])}" for a in leaves)
    return text + ("" if mask is None else f"; output mask {list(mask.shape[1:])}")


# -- where the time goes ------------------------------------------------------------------------

def _wrap(ntk, attr, log, sync=True):
    """Replace ntk.<attr> (an instance attribute: the engine's code is unchanged) by a timed copy."""
    import jax

    inner = getattr(ntk, attr)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        if sync:
            jax.block_until_ready(out)
        log.setdefault(attr, []).append(time.perf_counter() - t0)
        return out

    setattr(ntk, attr, timed)


def part_times(ntk, params, x, mask_in) -> dict:
    """One call with each part timed; the NTK object's attributes are restored afterwards."""
    import jax

    log: dict = {}
    attrs = ["_factors", "_contract_factors", "_jac", "_contract", "_structured_tile", "_jac_tile", "_assemble",
             "_prepare", "_plan"]
    own = {a: ntk.__dict__[a] for a in attrs if a in ntk.__dict__}  # jitted attributes; the rest are methods
    for a in attrs:
        _wrap(ntk, a, log, sync=a not in ("_prepare", "_plan"))
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(ntk(params, x, mask_in))
        total = time.perf_counter() - t0
    finally:
        for a in attrs:
            if a in own:
                setattr(ntk, a, own[a])
            else:
                del ntk.__dict__[a]
    parts = {a.lstrip("_"): {"calls": len(v), "s": sum(v)} for a, v in log.items()}
    parts["rest (host)"] = {"calls": 1, "s": total - sum(p["s"] for p in parts.values())}
    return {"total_s": total, "parts": parts}


def planner_terms(ntk, params, x, out_shape, act, m) -> dict:
    """The planner's per-point bytes, term by term (as NTK._structured_point_bytes counts them)."""
    import jax
    import numpy as np

    from ntk_tracking.ntk import structured

    calls = ntk._discover(params, x)
    skipped = set(structured.claimed_leaves(calls)) | set(ntk._inert(params, x))
    leaves = jax.tree_util.tree_leaves(params)
    rest = sum(int(np.size(leaf)) for i, leaf in enumerate(leaves) if i not in skipped)
    n_out = math.prod(out_shape)
    total = ntk._structured_point_bytes(params, x, out_shape, act, m)
    return {"per_point_bytes": total, "jacobian_rest_bytes": 3 * n_out * rest * 4,
            "activation_cotangent_bytes": n_out * act, "act_bytes_per_point": act,
            "layer_factor_bytes": total - 3 * n_out * rest * 4 - n_out * act}


def padding(name, x, mask_in, bench, params) -> dict:
    """Real vs padded tokens / nodes / edges, and F of point 0 cut to its real size."""
    import jax
    import numpy as np

    out: dict = {}
    if name == "tagger":
        real = np.asarray(x["mask"]).sum(1)
        out = {"tokens_real_mean": float(real.mean()), "tokens_padded": int(x["mask"].shape[1])}
        n = int(real[0])
        one = {k: np.asarray(v)[:1, :n] for k, v in x.items()}
    elif name == "gcn":
        nodes, edges = np.asarray(x["n_node"])[:, 0], np.asarray(x["n_edge"])[:, 0]
        out = {"nodes_real_mean": float(nodes.mean()), "nodes_padded": int(x["nodes"].shape[1]),
               "edges_real_mean": float(edges.mean()), "edges_padded": int(x["edges"].shape[1])}
        n, e = int(nodes[0]), int(edges[0])
        pad_e = min(1, x["edges"].shape[1] - e)  # padding edges join the first padding node (jraph)
        one = {"nodes": x["nodes"][:1, :n + 1], "edges": x["edges"][:1, :e + pad_e],
               "senders": x["senders"][:1, :e + pad_e], "receivers": x["receivers"][:1, :e + pad_e],
               "n_node": np.array([[n, 1]], x["n_node"].dtype), "n_edge": np.array([[e, pad_e]], x["n_edge"].dtype)}
    else:
        return out
    padded = jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], x)
    out["forward_flops_point0_padded"] = flops(jax.jit(bench.apply_fn).lower(params, padded).compile())
    out["forward_flops_point0_unpadded"] = flops(jax.jit(bench.apply_fn).lower(params, one).compile())
    out["point0_real_size"] = n
    return out


def transfers(ntk, params, x, mask_in) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(x)
    _, out_shape, mask, _ = ntk._prepare(params, x, mask_in)
    # Every leaf of x and the full-shape mask _prepare builds on the host go to the device once
    # per call (the compiled call's own transfer where one block holds every point); the kernel
    # stays on the device.
    out = {"host_to_device_arrays_per_call": len(leaves) + 1,
           "x_bytes_per_call": int(sum(np.asarray(a).nbytes for a in leaves)),
           "mask_bytes_per_call": int(np.asarray(mask).nbytes)}
    try:
        with jax.transfer_guard("disallow"):
            jax.block_until_ready(ntk(params, x, mask_in))
        out["transfer_guard_disallow"] = "a call ran: no implicit transfer"
    except Exception as err:  # noqa: BLE001 - report what the guard refused
        out["transfer_guard_disallow"] = "first refused: " + str(err).splitlines()[0][:160]
    return out


def contract_by_layer(ntk, params, xj, mask, block) -> list:
    """The structured contraction of one diagonal tile, factor by factor: shapes, XLA FLOPs, median
    seconds of 3 (each term compiled alone with structured.contract)."""
    import jax

    from ntk_tracking.ntk import structured

    calls, inert = ntk._discover(params, xj), ntk._inert(params, xj)
    rest, dense = ntk._factors(params, xj, mask, 0, block=block, full=False, calls=calls, inert=inert)
    fn = jax.jit(structured.contract, static_argnames=("full",))
    terms = [("jacobian", ([j], []), [list(j.shape)]) for j in rest]
    terms += [("pairwise", ([], [f]), [list(a.shape) for a in f]) for f in dense]
    out = []
    for kind, f, shapes in terms:
        compiled = fn.lower(f, f, full=False).compile()
        fn(f, f, full=False).block_until_ready()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(f, f, full=False).block_until_ready()
            times.append(time.perf_counter() - t0)
        out.append({"kind": kind, "shapes": shapes, "flops": flops(compiled), "s": statistics.median(times)})
    return out


def parts(name, ctx, repeats) -> dict:
    """Where one network's time goes (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    bench, ntk, x, mask_in, mask, params, out_shape, act, rate, _ = ctx
    m = jax.tree_util.tree_leaves(x)[0].shape[0]
    xj = jax.tree_util.tree_map(jnp.asarray, x)
    impl, block, _ = ntk._plan(params, m, out_shape, act, xj, mask)
    res = {"default_budget": {"memory_budget": ntk.memory_budget, "block": block,
                              **part_times(ntk, params, x, mask_in)}}
    xj = jax.tree_util.tree_map(jnp.asarray, x)
    fac_flops, con_flops, mem = _contraction(ntk, impl, params, xj, mask, block)
    if mem is not None:
        res["default_budget"]["xla_factor_mib"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes
                                                   + mem.argument_size_in_bytes) / 2**20
    p = res["default_budget"]["parts"]
    if "structured_tile" in p:  # one block: factors and contraction ran as one call; the factors alone
        calls, inert = ntk._structure(params, xj)
        fn = functools.partial(ntk._factors, block=block, full=False, calls=calls, inert=inert)
        jax.block_until_ready(fn(params, xj, mask, 0))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, xj, mask, 0))
            times.append(time.perf_counter() - t0)
        res["default_budget"]["factors_alone_s"] = statistics.median(times)  # points first, as a separate call
    for key, fl in (("factors", fac_flops), ("contract_factors", con_flops)):
        if key in p and fl:
            p[key]["gflops_per_s"] = p[key]["calls"] * fl / p[key]["s"] / 1e9
    if impl == "structured":
        layers = contract_by_layer(ntk, params, xj, mask, block)
        res["contract_by_factor"] = {"sum_s": sum(t["s"] for t in layers),
                                     "sum_flops": sum(t["flops"] for t in layers),
                                     "slowest": sorted(layers, key=lambda t: -t["s"])[:8], "terms": len(layers)}
        res["planner"] = planner_terms(ntk, params, x, out_shape, act, m)
    res["padding"] = padding(name, x, mask_in, bench, params)
    res["transfers"] = transfers(ntk, params, x, mask_in)
    return res


def _parts_line(r) -> str:
    p = r["parts"]
    text = " + ".join(f"{k} {v['calls']}× {v['s']:.3f} s" + (f" ({v['gflops_per_s']:.1f} GFLOP/s)" if "gflops_per_s" in v
                                                              else "") for k, v in p.items())
    alone = f"; the factor function alone, as a separate call: {r['factors_alone_s']:.3f} s" if "factors_alone_s" in r else ""
    return f"total {r['total_s']:.3f} s = {text}{alone}"


def print_parts(name, res):
    """A few readable lines of what parts() found (the JSON holds all of it)."""
    d = res["default_budget"]
    print(f"  {name}: default budget {d['memory_budget'] / 2**30:.1f} GiB, block {d['block']}: {_parts_line(d)}")
    if "planner" in res:
        t = res["planner"]
        print(f"  {name}: planner per point {t['per_point_bytes'] / 2**20:.0f} MiB (outputs × activations "
              f"{t['activation_cotangent_bytes'] / 2**20:.0f}, Jacobians {t['jacobian_rest_bytes'] / 2**20:.0f}, "
              f"layer factors {t['layer_factor_bytes'] / 2**20:.0f}); XLA's factor function at block {d['block']}: "
              f"{d.get('xla_factor_mib', float('nan')):.0f} MiB")
        c = res["contract_by_factor"]
        top = "; ".join(f"{t['kind']} {t['shapes']} {t['s'] * 1e3:.1f} ms" for t in c["slowest"][:3])
        print(f"  {name}: contraction of one tile, {c['terms']} factors alone: {c['sum_s']:.3f} s; slowest: {top}")
    for key, e in res.items():
        if key.startswith("block_"):
            if "skipped" in e:
                print(f"  {name}: block {e['block']}: SKIPPED ({e['skipped']}: {e['xla_factor_mib']:.0f} MiB)")
            else:
                print(f"  {name}: block {e['block']} (budget {e['memory_budget'] / 2**30:.1f} GiB): median "
                      f"{e['median_s']:.3f} s, first {e['first_s']:.2f} s, peak +{e['peak_growth_mib']:.0f} MiB "
                      f"(XLA {e['xla_factor_mib']:.0f} MiB); {_parts_line(e)}")
    if res["padding"]:
        print(f"  {name}: padding {res['padding']}")
    print(f"  {name}: transfers {res['transfers']}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=list(MODELS) + list(ALIASES))
    parser.add_argument("--points", type=int, default=20, help="m")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per network (median)")
    parser.add_argument("--parts", nargs="*", default=["tagger", "gcn"],
                        help="networks whose time is taken apart (default: tagger gcn; none: --parts)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--protocol", type=int, default=0, metavar="K",
                        help="also time the analyzer's measurement of one checkpoint at K subsets on "
                             "every probe set (Measurement.run) against K × sets × seconds per kernel")
    parser.add_argument("--protocol-seconds", type=float, default=120,
                        help="per network: past this predicted time, fewer subsets are timed and scaled")
    args = parser.parse_args(argv)

    import jax
    import jax.monitoring

    threading.Thread(target=_watch_memory, daemon=True).start()
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    ca_type = type(jax.jit(lambda a: a).lower(1.0).compile().cost_analysis()).__name__
    meta = {"command": "python benchmarks/ntk_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "jax": jax.__version__, "platform": jax.devices()[0].platform, "cores": os.cpu_count(),
            "cost_analysis_returns": ca_type, "m": args.points, "repeats": args.repeats,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_start": os.getloadavg()}
    print(f"jax {jax.__version__} on {meta['platform']}, {meta['cores']} cores, load average "
          f"{meta['load_start'][0]:.2f}; m = {args.points}, median of {args.repeats}; cost_analysis() "
          f"returns a {ca_type}", flush=True)
    header = (f"{'model':11} {'impl':10} {'block':>5} {'O':>6} {'O tot':>5} {'fwd MFLOP':>9} {'R GF/s':>6} "
              f"{'engine s':>8} {'floor s':>8} {'ratio':>6} {'refined s':>9} {'ratio':>6} {'eng GFLOP':>9} "
              f"{'at R s':>7} {'compiles':>9}")
    print(header + "\n" + "-" * len(header), flush=True)
    rows, details = [], {}
    for name in expand(args.models):
        try:
            row, ctx = measure(name, args.points, args.repeats)
        except Exception as err:  # noqa: BLE001 - one network's failure must not lose the others
            row, ctx = {"model": name, "skipped": f"{type(err).__name__}: {err}"}, None
            print(f"{name:11} SKIPPED: {row['skipped']}", flush=True)
        else:
            r = row
            print(f"{name:11} {r['implementation']:10} {r['block']:>5} {r['outputs_kept']:>6.1f} "
                  f"{r['outputs_total']:>5} {r['forward_flops'] / 1e6:>9.2f} {r['matmul_gflops']:>6.1f} "
                  f"{r['engine_s']:>8.3f} {r['floor_s']:>8.4f} {r['ratio']:>6.1f} "
                  f"{r.get('refined_floor_s', float('nan')):>9.4f} {r.get('refined_ratio', float('nan')):>6.1f} "
                  f"{r.get('engine_flops', float('nan')) / 1e9:>9.2f} {r.get('engine_flops_s', float('nan')):>7.3f} "
                  f"{','.join(map(str, r['compiles_per_call'][:3])):>9}", flush=True)
            if "measured_bound_s" in r:
                print(f"{'':11} backward passes alone (to the {r['propagation_wrt']}, by "
                      f"{r['propagation_batching']}): {r['propagation_s']:.4f} s; "
                      f"measured bound = passes + C/R = {r['measured_bound_s']:.4f} s; engine / bound "
                      f"{r['measured_bound_ratio']:.2f}", flush=True)
        if ctx is not None and args.protocol:
            row["protocol"] = p = protocol(name, ctx, args.protocol, args.protocol_seconds)
            print(f"{'':11} K = {p['subsets']} × {p['probe_sets']} sets ({p['subsets_timed']} timed in "
                  f"{p['parts']} parts, ratio by part {min(p['ratio_by_part']):.3f}–{max(p['ratio_by_part']):.3f}; "
                  f"{p['engine_s_at_pool_shapes']:.3f} s per kernel at the pool's shapes): "
                  f"{p['per_checkpoint_s']:.2f} s per checkpoint, {p['kernels_s']:.2f} s of kernels, "
                  f"ratio {p['ratio_to_kernels']:.3f}; peak +{p['peak_growth_mib']:.0f} MiB "
                  f"(budget {p['memory_budget_mib']:.0f} MiB)", flush=True)
        rows.append(row)
        if ctx is not None and name in (args.parts or ()):
            details[name] = parts(name, ctx, args.repeats)
            print_parts(name, details[name])
        del ctx
        meta["load_end"] = os.getloadavg()
        meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        if args.json:
            pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "parts": details},
                                                          indent=1, default=str) + "\n")
    print(f"\nload average at the end {meta['load_end'][0]:.2f}; O = outputs per point kept by the mask, "
          "O tot = outputs backpropagated; fwd = F, one point; R = f32 2048² matmul rate; floor = m·O·F/R; "
          "refined = (m·O·F + C)/R, C = XLA's FLOPs of the engine's contractions + the positions contraction that forms per-point gradients; eng GFLOP = XLA's FLOPs "
          "of the engine's whole call (factor calls + contractions), at R s = that / R; compiles = XLA "
          "compilations in calls 1, 2, 3; measured bound = XLA's time for the m·O backward passes alone "
          "(to the inputs, no weight gradients) + C/R.")


if __name__ == "__main__":
    main()
