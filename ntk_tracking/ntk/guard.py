"""A fast path checked against the reference: the chosen implementation versus ntvp."""

from __future__ import annotations

import jax
import numpy as np

from ntk_tracking.ntk.kernel import NTK


class NTKMismatchError(ValueError):
    """The chosen NTK implementation disagrees with the ntvp reference beyond round-off."""


def check_against_ntvp(ntk: NTK, params, x, output_mask=None, raise_on_mismatch: bool = True,
                       kernel=None, from_subsets: bool = False) -> dict:
    """Compare `ntk` (or `kernel`, what it computed on these points; `from_subsets`: through
    `subset_kernels`) with an ntvp NTK on the same points; a JSON-ready summary.

    The tolerance is float round-off: each kernel entry is a sum over P parameters, which XLA
    reduces in blocks, so the two implementations differ by a few eps relative to the largest
    entry in practice (measured: 1e-7 relative in float32 on an 800k-parameter VAE). 2,000·eps
    (2.4e-4 in float32) leaves over two orders of margin and still catches a term wrong by
    0.03 % of the kernel; a bound growing with sqrt(P) would have excused 1 % errors.
    """
    if kernel is None:
        kernel = ntk(params, x, output_mask=output_mask)
    result = _compare(kernel, NTK(ntk.apply_fn, "ntvp", ntk.memory_budget)(params, x, output_mask=output_mask),
                      params)
    result = {"implementation": ntk.resolved_implementation(params, x, output_mask), "reference": "ntvp",
              "points": int(np.shape(kernel)[0]), **result}
    if not result["ok"] and result["dtype"] != "float64":
        # A kink (ReLU, max-pool) whose input lies within round-off of it is evaluated on either side
        # by two float32 computations that sum in different orders: both kernels are then honest
        # float32 values of a function that jumps there. Only an error that persists in float64,
        # where no such tie survives, is the fast path's.
        with jax.enable_x64(True):
            p64, x64, m64 = (_as_float64(t) for t in (params, x, output_mask))
            same_path = type(ntk)(ntk.apply_fn, ntk.implementation, ntk.memory_budget, ntk.block_size)
            if from_subsets:
                k64 = same_path.subset_kernels(p64, x64, np.arange(result["points"])[None], m64)[0]
            else:
                k64 = same_path(p64, x64, output_mask=m64)
            recheck = _compare(k64, NTK(ntk.apply_fn, "ntvp", ntk.memory_budget)(p64, x64, output_mask=m64), p64)
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
