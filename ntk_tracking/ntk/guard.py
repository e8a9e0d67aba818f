"""A fast path checked against the reference: the chosen implementation versus ntvp."""

from __future__ import annotations

import jax
import numpy as np

from ntk_tracking.ntk.kernel import NTK, num_points, take

# Points of the measured kernel that the reference recomputes: ntvp costs one vjp + jvp pair per
# (point, output), so its cost grows as p²; 4 points spread over the subset (first, last, two
# between) keep it under about one checkpoint on every paper model (benchmarks/engine_check.py)
# while their 4×4 entries cover the diagonal, off-diagonal entries and, where the kernel is
# computed in blocks, entries of different tiles.
CHECK_POINTS = 4


class NTKMismatchError(ValueError):
    """The chosen NTK implementation disagrees with the ntvp reference beyond round-off."""


def check_points(m: int, count: int = CHECK_POINTS) -> np.ndarray:
    """Indices of `count` points spread evenly over m (first and last included)."""
    return np.unique(np.linspace(0, m - 1, min(count, m)).round().astype(int))


def check_against_ntvp(ntk: NTK, params, x, output_mask=None, raise_on_mismatch: bool = True,
                       kernel=None, from_subsets: bool = False, points: int | None = CHECK_POINTS) -> dict:
    """Compare `ntk` (or `kernel`, what it computed on these points; `from_subsets`: through
    `subset_kernels`) with an ntvp NTK; a JSON-ready summary.

    `kernel` is computed on all the points of `x`; the reference, on `points` of them spread over
    x (None: all), and the matching entries are compared: the reference's cost grows with the
    square of its points, the fast path's kernel is had for free.

    The tolerance is float round-off: each kernel entry is a sum over P parameters, which XLA
    reduces in blocks, so the two implementations differ by a few eps relative to the largest
    entry in practice (measured: 1e-7 relative in float32 on an 800k-parameter VAE). 2,000·eps
    (2.4e-4 in float32) leaves over two orders of margin and still catches a term wrong by
    0.03 % of the kernel; a bound growing with sqrt(P) would have excused 1 % errors.
    """
    m = num_points(x)
    idx = np.arange(m) if points is None else check_points(m, points)
    if kernel is None:
        kernel = ntk(params, x, output_mask=output_mask)
    reference = NTK(ntk.apply_fn, "ntvp", ntk.memory_budget)
    result = _compare(_entries(kernel, idx), reference(params, take(x, idx), output_mask=take(output_mask, idx)),
                      params)
    result = {"implementation": ntk.resolved_implementation(params, x, output_mask), "reference": "ntvp",
              "points": m, "checked_points": [int(i) for i in idx], **result}
    if not result["ok"] and result["dtype"] != "float64":
        # A kink (ReLU, max-pool) whose input lies within round-off of it is evaluated on either side
        # by two float32 computations that sum in different orders: both kernels are then honest
        # float32 values of a function that jumps there. Only an error that persists in float64,
        # where no such tie survives, is the fast path's. The fast path is recomputed as it ran
        # (all m points, through subset_kernels where it was), so a fault of its blocking shows.
        with jax.enable_x64(True):
            p64, x64, m64 = (_as_float64(t) for t in (params, x, output_mask))
            same_path = type(ntk)(ntk.apply_fn, ntk.implementation, ntk.memory_budget, ntk.block_size)
            if from_subsets:
                k64 = same_path.subset_kernels(p64, x64, np.arange(m)[None], m64)[0]
            else:
                k64 = same_path(p64, x64, output_mask=m64)
            recheck = _compare(_entries(k64, idx),
                               NTK(ntk.apply_fn, "ntvp", ntk.memory_budget)(p64, take(x64, idx),
                                                                            output_mask=take(m64, idx)), p64)
        result["float64_recheck"] = recheck
        result["ok"] = recheck["ok"]
    if raise_on_mismatch and not result["ok"]:
        bad = result.get("float64_recheck", result)
        raise NTKMismatchError(
            f"the {result['implementation']!r} NTK differs from the ntvp reference by {bad['max_abs_diff']:.6g} "
            f"(relative {bad['relative_diff']:.3g} in {bad['dtype']}, largest entry {bad['max_abs_reference']:.6g}; "
            f"round-off allows {bad['tolerance']:.3g}): the fast path is wrong for this model. Rerun the "
            "analysis with --implementation ntvp (or jacobian) and report the model."
        )
    return result


def _as_float64(tree):
    if tree is None:
        return None
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a), tree)


def _compare(kernel, expected, params) -> dict:
    """max |kernel − expected| relative to the largest reference entry, against 2,000·eps."""
    kernel, expected = np.asarray(kernel, np.float64), np.asarray(expected, np.float64)
    leaves = jax.tree_util.tree_leaves(params)
    floats = [np.asarray(leaf).dtype for leaf in leaves if np.issubdtype(np.asarray(leaf).dtype, np.floating)]
    dtype = np.result_type(*floats) if floats else np.dtype(np.float32)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(kernel - expected))) if expected.size else 0.0
    tolerance = 2000 * float(np.finfo(dtype).eps)
    relative = diff / scale if scale > 0 else diff
    return {"dtype": str(dtype), "max_abs_diff": diff, "max_abs_reference": scale, "relative_diff": relative,
            "tolerance": tolerance, "ok": bool(relative <= tolerance and np.isfinite(relative))}


def _entries(kernel, idx):
    """The idx × idx entries of a kernel."""
    kernel = np.asarray(kernel)
    return kernel[np.ix_(idx, idx)]
