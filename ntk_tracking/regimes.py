"""Learning regimes from an NTK entropy trajectory (paper §3.1, made quantitative here).

The paper names two regimes: *information compression* (entropy falls and stays low: small
networks) and *structure formation* (entropy rises after its early minimum: the onset of deep
learning). It gives no number; this module does, on a trajectory [(epoch, S)]:

    D = S_0 − S_min      the early drop (nats), S_0 the first point, S_min the minimum
    U = S_end − S_min    the rise after the minimum (nats)
    R = U / D            the recovery: fraction of the early drop recovered by the end

Each difference counts only if it beats its tolerance τ = max(z·SE, rel_tol·max|S|), with SE
the standard error of the difference of the two means (std over the K subsets / sqrt(K − 1),
combined in quadrature as if independent; the subsets are reused at every checkpoint, so the
errors are positively correlated and this overestimates the noise: conservative). Classes:

    structure_formation  U > τ_U and (R ≥ threshold or D ≤ τ_D: no compression phase at all,
                         as in the paper's §4 novelty models)
    compression          D > τ_D and not structure formation
    flat                 neither a drop nor a rise beyond noise (a frozen, lazy kernel)
    diverged             a non-finite entropy (the run blew up)
    undetermined         fewer than 3 points: a drop-then-rise needs start, minimum and end
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np

COMPRESSION = "compression"
STRUCTURE_FORMATION = "structure_formation"
FLAT = "flat"
DIVERGED = "diverged"
UNDETERMINED = "undetermined"
REGIMES = (COMPRESSION, STRUCTURE_FORMATION, FLAT, DIVERGED, UNDETERMINED)
# One short mark per class for maps and tables.
MARKS = {COMPRESSION: "C", STRUCTURE_FORMATION: "SF", FLAT: "F", DIVERGED: "×", UNDETERMINED: "?"}

# Defaults. R ≥ 0.1: the paper's small networks "remain low" after compression, the larger
# ones climb back most of the way or past S_0; a tenth of the drop separates a real climb from
# slow drift, and the noise test below guards the small-drop end. z = 2: a ~2σ rise.
RECOVERY_THRESHOLD = 0.1
Z_SCORE = 2.0
REL_TOL = 0.01  # 1% of the entropy scale: the floor when no std was logged (or K = 1)


@dataclasses.dataclass(frozen=True)
class Regime:
    """A classified trajectory and the numbers behind the class (nats; NaN where undefined)."""

    label: str
    recovery: float  # R = U / D; NaN without a significant early drop or with < 2 finite points
    drop: float  # D = S_0 − S_min
    rise: float  # U = S_end − S_min
    drop_tolerance: float
    rise_tolerance: float
    min_epoch: float  # epoch of S_min (NaN if none)
    reason: str

    @property
    def mark(self) -> str:
        return MARKS[self.label]


def recovery(s0: float, s_min: float, s_end: float) -> float:
    """R = (S_end − S_min) / (S_0 − S_min); NaN when there is no drop (S_0 = S_min)."""
    drop = s0 - s_min
    return (s_end - s_min) / drop if drop > 0 else math.nan


def standard_errors(stds: Mapping[int, float], num_subsets: int) -> dict[int, float]:
    """Std over K subsets (np.std, ddof=0) → standard error of the mean, std / sqrt(K − 1)."""
    if num_subsets < 2:
        return {}  # one subset: no spread to learn the noise from
    return {int(e): float(s) / math.sqrt(num_subsets - 1) for e, s in stds.items()}


def _tolerance(se_a: float, se_b: float, scale: float, z: float, rel_tol: float) -> float:
    noise = z * math.hypot(se_a, se_b) if math.isfinite(se_a) and math.isfinite(se_b) else 0.0
    return max(noise, rel_tol * scale)


def classify_entropy(
    trajectory: Iterable[tuple[float, float]],
    stderr: Mapping[int, float] | None = None,
    threshold: float = RECOVERY_THRESHOLD,
    z: float = Z_SCORE,
    rel_tol: float = REL_TOL,
) -> Regime:
    """The regime of an entropy trajectory [(epoch, S)]; `stderr` maps epoch → SE of S."""
    if not threshold >= 0:
        raise ValueError(f"recovery threshold must be ≥ 0, got {threshold}")
    points = sorted((float(e), float(s)) for e, s in trajectory)
    nan = math.nan
    if any(not math.isfinite(s) for _, s in points):
        first_bad = next(e for e, s in points if not math.isfinite(s))
        return Regime(DIVERGED, nan, nan, nan, nan, nan, nan, f"non-finite entropy at epoch {first_bad:g}")
    if len(points) < 2:
        return Regime(UNDETERMINED, nan, nan, nan, nan, nan, nan, f"{len(points)} point(s); need ≥ 3")
    epochs = np.array([e for e, _ in points])
    values = np.array([s for _, s in points])
    i_min = int(np.argmin(values))  # the first minimum if tied
    s0, s_min, s_end = values[0], values[i_min], values[-1]
    drop, rise = s0 - s_min, s_end - s_min
    se = {} if stderr is None else {float(k): float(v) for k, v in stderr.items()}
    se0, se_min, se_end = (se.get(float(epochs[i]), 0.0) for i in (0, i_min, -1))
    scale = float(np.max(np.abs(values)))
    tol_drop = _tolerance(se0, se_min, scale, z, rel_tol)
    tol_rise = _tolerance(se_end, se_min, scale, z, rel_tol)
    r = recovery(s0, s_min, s_end) if drop > tol_drop else nan
    numbers = dict(recovery=float(r), drop=float(drop), rise=float(rise), drop_tolerance=tol_drop,
                   rise_tolerance=tol_rise, min_epoch=float(epochs[i_min]))
    if len(points) < 3:
        return Regime(UNDETERMINED, reason="2 points; need ≥ 3 (start, minimum, end)", **numbers)
    dropped, rose = drop > tol_drop, rise > tol_rise
    if rose and not dropped:
        return Regime(STRUCTURE_FORMATION, reason=f"rise {rise:.3g} > {tol_rise:.2g} nats with no "
                      "compression phase", **numbers)
    if rose and r >= threshold:
        return Regime(STRUCTURE_FORMATION, reason=f"recovered {r:.2f} ≥ {threshold} of the drop", **numbers)
    if dropped:
        why = f"recovered {r:.2f} < {threshold} of the drop" if rose else "no rise beyond noise"
        return Regime(COMPRESSION, reason=why, **numbers)
    return Regime(FLAT, reason=f"drop {drop:.2g} and rise {rise:.2g} within noise "
                  f"({tol_drop:.2g}, {tol_rise:.2g} nats)", **numbers)
