"""ntk_tracking: watch the empirical NTK's collective variables evolve through training."""

from ntk_tracking.ntk import (
    NTK,
    Measurement,
    collective_variables,
    covariance_entropy,
    draw_subsets,
    effective_entropy,
    empirical_ntk,
    entropy,
    max_eigenvalue,
    ntk_trace,
    spectrum,
    trace,
    trace_per_point,
)

__version__ = "0.1.0"
__all__ = [
    "NTK", "Measurement", "collective_variables", "covariance_entropy", "draw_subsets",
    "effective_entropy", "empirical_ntk", "entropy", "max_eigenvalue", "ntk_trace", "spectrum",
    "trace", "trace_per_point",
]
