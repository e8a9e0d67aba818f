"""Collective variables of a kernel (paper §2.2): entropy (eq. 9), trace (eq. 10) and friends.

Computed on the host in float64: a kernel is m×m with m ~ 20–100, so exactness is free.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def _kernel(kernel, min_points: int = 1) -> np.ndarray | None:
    """The kernel as a float64 square matrix, or None (with a warning) if it is not finite."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a kernel must be a square m×m matrix, got shape {k.shape}")
    if k.shape[0] < min_points:
        raise ValueError(
            f"this variable needs at least {min_points} points, the kernel has {k.shape[0]}; "
            "measure on more points"
        )
    if not np.all(np.isfinite(k)):
        warnings.warn(
            "the kernel holds NaN or Inf (a diverged run?); its collective variables are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return k


def spectrum(kernel) -> np.ndarray:
    """Eigenvalues of the (symmetrized) kernel, largest first; NaN if the kernel is not finite."""
    k = _kernel(kernel)
    if k is None:
        return np.full(np.shape(kernel)[0], np.nan)
    return np.linalg.eigvalsh(0.5 * (k + k.T))[::-1]


def _spectral_entropy(eigenvalues: np.ndarray) -> float:
    lam = np.clip(eigenvalues, 0.0, None)  # negative eigenvalues are round-off
    total = lam.sum()
    if not total > 0:
        warnings.warn("the kernel has no positive eigenvalue; its entropy is NaN", RuntimeWarning, 3)
        return math.nan
    p = lam[lam > 0] / total  # 0·ln 0 = 0
    return float(-np.sum(p * np.log(p)))


def entropy(kernel) -> float:
    """Eq. 9: S = −Σ λ̂ ln λ̂ over the kernel's eigenvalues normalized to sum 1, in nats."""
    k = _kernel(kernel, min_points=2)
    if k is None:
        return math.nan
    return _spectral_entropy(np.linalg.eigvalsh(0.5 * (k + k.T)))


def effective_entropy(kernel) -> float:
    """S / ln m, in [0, 1]: 1 for a kernel with m equal eigenvalues, 0 for rank one."""
    return entropy(kernel) / math.log(np.shape(kernel)[0])


def trace(kernel) -> float:
    """Eq. 10: Σ_i Θ_ii."""
    k = _kernel(kernel)
    return math.nan if k is None else float(np.trace(k))


def trace_per_point(kernel) -> float:
    """Σ_i Θ_ii / m."""
    return trace(kernel) / np.shape(kernel)[0]


def cosine_kernel(kernel) -> np.ndarray:
    """Θ_ij / sqrt(Θ_ii Θ_jj): the NTK as a matrix of gradient cosines."""
    k = np.asarray(kernel, dtype=np.float64)
    d = np.sqrt(np.clip(np.diag(k), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return k / np.outer(d, d)


def covariance_entropy(kernel) -> float:
    """Entropy (eq. 9) of the cosine-normalized kernel; NaN if a point has zero gradient."""
    k = _kernel(kernel, min_points=2)
    if k is None:
        return math.nan
    if np.any(np.diag(k) <= 0):
        warnings.warn(
            "a point has a zero NTK diagonal (zero gradient); covariance entropy is NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    c = cosine_kernel(k)
    return _spectral_entropy(np.linalg.eigvalsh(0.5 * (c + c.T)))


def max_eigenvalue(kernel) -> float:
    """The largest eigenvalue of the kernel."""
    return float(spectrum(kernel)[0])


def collective_variables(kernel) -> dict[str, float]:
    """Every scalar variable of one kernel, keyed by the metric names of the design."""
    names = ("entropy", "entropy_effective", "trace", "trace_per_point", "covariance_entropy",
             "max_eigenvalue")
    if _kernel(kernel, min_points=2) is None:
        return dict.fromkeys(names, math.nan)
    return {
        "entropy": entropy(kernel),
        "entropy_effective": effective_entropy(kernel),
        "trace": trace(kernel),
        "trace_per_point": trace_per_point(kernel),
        "covariance_entropy": covariance_entropy(kernel),
        "max_eigenvalue": max_eigenvalue(kernel),
    }


def batch_variables(kernels) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(spectra, variables) of K kernels at once: spectra (K, m), largest first, and each of
    ``collective_variables``' names -> its K values. The same numbers as the per-kernel functions
    (tests/ntk/test_ntk_stats.py), from two batched eigendecompositions instead of five per
    kernel: at K = 200 that per-kernel host work was a tenth of the Pong networks' kernel time."""
    k = np.asarray(kernels, dtype=np.float64)
    if k.ndim != 3 or k.shape[1] != k.shape[2]:
        raise ValueError(f"kernels must be a (K, m, m) stack, got shape {k.shape}")
    n, m = k.shape[:2]
    if m < 2:
        raise ValueError(f"these variables need at least 2 points, the kernels have {m}; measure on more points")
    finite = np.isfinite(k).all(axis=(1, 2))
    if not finite.all():
        warnings.warn(f"{int(np.sum(~finite))} of {n} kernels hold NaN or Inf (a diverged run?); "
                      "their collective variables are NaN", RuntimeWarning, stacklevel=2)
    k = np.where(finite[:, None, None], k, 0.0)
    lam = np.linalg.eigvalsh(0.5 * (k + np.swapaxes(k, 1, 2)))  # ascending
    diag = np.diagonal(k, axis1=1, axis2=2)
    zero_gradient = finite & np.any(diag <= 0, axis=1)
    if zero_gradient.any():
        warnings.warn("a point has a zero NTK diagonal (zero gradient); covariance entropy is NaN",
                      RuntimeWarning, stacklevel=2)
    d = np.sqrt(np.clip(diag, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = k / (d[:, :, None] * d[:, None, :])
    ok = finite & ~zero_gradient
    c = np.where(ok[:, None, None], c, 0.0)
    lam_c = np.linalg.eigvalsh(0.5 * (c + np.swapaxes(c, 1, 2)))
    entropy = np.array([_spectral_entropy(row) if f else math.nan for row, f in zip(lam, finite)])
    trace = np.where(finite, np.trace(k, axis1=1, axis2=2), np.nan)
    spectra = np.where(finite[:, None], lam[:, ::-1], np.nan)
    return spectra, {
        "entropy": entropy,
        "entropy_effective": entropy / math.log(m),
        "trace": trace,
        "trace_per_point": trace / m,
        "covariance_entropy": np.array([_spectral_entropy(row) if f else math.nan for row, f in zip(lam_c, ok)]),
        "max_eigenvalue": spectra[:, 0],
    }
