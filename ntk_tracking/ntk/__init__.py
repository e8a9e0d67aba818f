"""The NTK engine: the kernel, its collective variables and the measurement protocol."""

from ntk_tracking.ntk.kernel import IMPLEMENTATIONS, NTK, empirical_ntk, ntk_trace
from ntk_tracking.ntk.guard import NTKMismatchError, check_against_ntvp
from ntk_tracking.ntk.measure import Measurement, draw_subsets
from ntk_tracking.ntk.stats import (
    collective_variables,
    cosine_kernel,
    covariance_entropy,
    effective_entropy,
    entropy,
    max_eigenvalue,
    spectrum,
    trace,
    trace_per_point,
)

__all__ = [
    "IMPLEMENTATIONS", "NTK", "NTKMismatchError", "Measurement", "check_against_ntvp", "collective_variables", "cosine_kernel",
    "covariance_entropy", "draw_subsets", "effective_entropy", "empirical_ntk", "entropy",
    "max_eigenvalue", "ntk_trace", "spectrum", "trace", "trace_per_point",
]
