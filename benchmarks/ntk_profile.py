"""Where one NTK call's time goes, operation by operation (XLA's own profiler), against the passes.

    python benchmarks/ntk_profile.py                      # resnet18q: the engine's call, by role
    python benchmarks/ntk_profile.py --models cnn actor --top 20
    python benchmarks/ntk_profile.py --what passes        # the measured bound's backward passes

Each network is built as `ntk_speed.py` builds it, at m = --points (default 20). After two warm
calls, --repeats calls (default 5) run untimed-by-profiler (their wall median is printed), then
the same number under `jax.profiler.trace` (perfetto trace). XLA:CPU records one event per
executed operation (thunk): its HLO instruction name. The names are matched to the compiled
module's instructions (`.compile().as_text()`: shape and the JAX op the instruction came from,
`metadata op_name`), and the time per call is summed by role:

- backward conv / forward conv: convolutions inside the transposed (backward) or plain JVP;
- backward other / forward other: the rest of those passes (normalization, activations);
- per-point gradient (G): the positions contraction Σ_t a_t ⊗ δ_ot of `structured.point_factors`;
- patches: a convolution's input patches (slices and their concatenation);
- layout copies: `transpose` copies (e.g. cotangents into the gradient product's operand layout);
- Gram products: the contractions of the kernel;
- other.

The sum of the operations can differ from the wall time: XLA may run independent operations at
once on the two cores (each is then timed at its own length), and a call also waits between them.
--what passes profiles the backward passes of `ntk_floor.propagation` (its faster batching) instead.
Only a network the engine computes in one structured call is profiled (the tagger and the GCN run
in blocks, several executables: `ntk_floor.py --parts` times those); others are skipped, saying so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ntk_speed import _param_sets, build  # noqa: E402

from ntk_tracking.ntk.kernel import KEEP  # noqa: E402


def instructions(hlo_text: str) -> dict:
    """The entry computation's instructions: name -> (shape, JAX op_name)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    found = {}
    for line in entry.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            meta = re.search(r'op_name="([^"]*)"', line)
            found[m.group(1)] = (m.group(2), re.sub(r"^jit\([^)]*\)/", "", meta.group(1)) if meta else "")
    return found


def role(name: str, op: str) -> str:
    if "tk,tol->okl" in op:
        return "per-point gradient (G)"
    backward = "transpose(" in op and "jvp(" in op
    if "conv_general_dilated" in op:
        return "backward conv" if backward else "forward conv" if "jvp(" in op else "other"
    if "concatenate" in op or name.startswith("pad_slice"):
        return "patches"
    if op.endswith("transpose") and not backward:
        return "layout copies"
    if backward:
        return "backward other"
    if "jvp(" in op:
        return "forward other"
    if "dot_general" in op:
        return "Gram products"
    return "other"


def op_seconds(trace_dir: str, calls: int) -> dict:
    """Seconds per call of each XLA operation recorded in the trace."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: dict = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("end:"):
            total[e["name"]] += e["dur"] / 1e6 / calls
    return total


def profile(name: str, what: str, points: int, repeats: int, top: int) -> None:
    import jax

    from ntk_tracking import NTK

    bench = build(name)
    x, mask_in = bench.probe_points(points, 0)
    _, params = _param_sets(bench, 2)
    ntk = NTK(bench.apply_fn)
    if what == "engine":
        _, out_shape, mask, act = ntk._prepare(params, x, mask_in)
        impl, block, chunk = ntk._plan(params, points, out_shape, act, x, mask)
        if impl != "structured" or block < points or chunk != KEEP:
            # Its calls are then several executables whose instruction names collide.
            print(f"\n{name}: skipped: the engine runs it as {impl}, blocks of {block} points, not "
                  "one structured call (where its time goes: ntk_floor.py --parts)")
            return

        calls, inert = ntk._structure(params, jax.tree_util.tree_map(jax.numpy.asarray, x))
        compiled = ntk._structured_tile.lower(params, x, mask, full=False, calls=calls, inert=inert).compile()

        def run():
            return ntk(params, x, mask_in)
    else:
        from ntk_floor import propagation

        out_shape = ntk._prepare(params, x, mask_in)[1]
        compiled, args = propagation(bench.apply_fn, params, x, out_shape, 3)[1]

        def run():
            return compiled(*args)
    known = instructions(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(run())
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        wall.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(run())
        seconds = op_seconds(trace_dir, repeats)
    ops = {k: v for k, v in seconds.items() if k in known}
    by_role: dict = collections.defaultdict(float)
    for k, v in ops.items():
        by_role[role(k, known[k][1])] += v
    print(f"\n{name} ({what}): wall median {statistics.median(wall):.4f} s over {repeats} calls; "
          f"its {len(ops)} operations add up to {sum(ops.values()):.4f} s per call")
    for r, v in sorted(by_role.items(), key=lambda kv: -kv[1]):
        print(f"  {v * 1e3:9.1f} ms  {r}")
    if top:
        print(f"  the {top} longest operations:")
        for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            shape, op = known[k]
            print(f"  {v * 1e3:9.2f} ms  {k:28} {shape:34} {op[:90]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18q"])
    parser.add_argument("--what", choices=("engine", "passes"), default="engine")
    parser.add_argument("--points", type=int, default=20, help="m")
    parser.add_argument("--repeats", type=int, default=5, help="calls timed, and calls profiled")
    parser.add_argument("--top", type=int, default=10, help="also list the longest operations")
    args = parser.parse_args(argv)
    for name in args.models:
        profile(name, args.what, args.points, args.repeats, args.top)


if __name__ == "__main__":
    main()
