"""A fast path checked against the reference: the chosen implementation versus ntvp."""

from __future__ import annotations

import jax
import numpy as np

from ntk_tracking.ntk.kernel import NTK


class NTKMismatchError(ValueError):
    """The chosen NTK implementation disagrees with the ntvp reference beyond round-off."""


def check_against_ntvp(ntk: NTK, params, x, output_mask=None, raise_on_mismatch: bool = True,
                       kernel=None) -> dict:
    """Compare `ntk` (or `kernel`, what it computed on these points) with an ntvp NTK on the same
    points; a JSON-ready summary.

    The tolerance is float round-off: each kernel entry is a sum over P parameters, which XLA
    reduces in blocks, so the two implementations differ by a few eps relative to the largest
    entry in practice (measured: 1e-7 relative in float32 on an 800k-parameter VAE). 2,000·eps
    (2.4e-4 in float32) leaves over two orders of margin and still catches a term wrong by
    0.03 % of the kernel; a bound growing with sqrt(P) would have excused 1 % errors.
    """
    reference = NTK(ntk.apply_fn, "ntvp", ntk.memory_budget)
    if kernel is None:
        kernel = ntk(params, x, output_mask=output_mask)
    kernel = np.asarray(kernel, np.float64)
    expected = np.asarray(reference(params, x, output_mask=output_mask), np.float64)
    leaves = jax.tree_util.tree_leaves(params)
    dtype = np.result_type(*[np.asarray(leaf).dtype for leaf in leaves if np.issubdtype(np.asarray(leaf).dtype, np.floating)] or [np.float32])
    n_params = sum(int(np.size(leaf)) for leaf in leaves)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(kernel - expected))) if expected.size else 0.0
    tolerance = 2000 * float(np.finfo(dtype).eps)
    relative = diff / scale if scale > 0 else diff
    result = {
        "implementation": ntk.resolved_implementation(params, x, output_mask),
        "reference": "ntvp",
        "points": int(kernel.shape[0]),
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "relative_diff": relative,
        "tolerance": tolerance,
        "ok": bool(relative <= tolerance and np.isfinite(relative)),
    }
    if raise_on_mismatch and not result["ok"]:
        raise NTKMismatchError(
            f"the {result['implementation']!r} NTK differs from the ntvp reference by {diff:.6g} "
            f"(relative {relative:.3g}, largest entry {scale:.6g}; round-off allows {tolerance:.3g}): "
            "the fast path is wrong for this model. Rerun the analysis with --implementation ntvp "
            "(or jacobian) and report the model."
        )
    return result
