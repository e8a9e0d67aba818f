"""Regime classification on synthetic entropy trajectories: each class, each edge case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ntk_tracking import regimes
from ntk_tracking.regimes import classify_entropy, recovery, standard_errors


def traj(values, epochs=None):
    epochs = range(len(values)) if epochs is None else epochs
    return list(zip(epochs, values))


def test_recovery_hand_computed():
    # S_0 = 2.0, S_min = 1.0, S_end = 1.25: a quarter of the drop recovered.
    assert recovery(2.0, 1.0, 1.25) == pytest.approx(0.25)
    assert math.isnan(recovery(1.0, 1.0, 2.0))  # no drop, nothing to recover
    r = classify_entropy(traj([2.0, 1.0, 1.1, 1.25]))
    assert r.label == regimes.STRUCTURE_FORMATION
    assert (r.recovery, r.drop, r.rise, r.min_epoch) == pytest.approx((0.25, 1.0, 0.25, 1.0))
    assert r.drop_tolerance == pytest.approx(0.01 * 2.0)  # rel_tol × max|S| without std


def test_compression_stays_near_minimum():
    r = classify_entropy(traj([2.0, 1.2, 1.0, 1.02, 1.05]))  # R = 0.05 < 0.1
    assert r.label == regimes.COMPRESSION
    assert r.recovery == pytest.approx(0.05)
    assert "0.05" in r.reason and r.mark == "C"


def test_structure_formation_after_compression():
    r = classify_entropy(traj([2.0, 1.0, 1.4, 1.9, 2.3]))  # rises past S_0: R = 1.3
    assert r.label == regimes.STRUCTURE_FORMATION and r.recovery == pytest.approx(1.3)


def test_threshold_is_the_boundary():
    t = traj([2.0, 1.0, 1.25])  # R = 0.25 exactly (binary fractions)
    assert classify_entropy(t, threshold=0.25).label == regimes.STRUCTURE_FORMATION  # R ≥ threshold
    assert classify_entropy(t, threshold=0.26).label == regimes.COMPRESSION
    with pytest.raises(ValueError, match="threshold"):
        classify_entropy(t, threshold=-1)


def test_monotone_rise_is_structure_formation_without_compression():
    r = classify_entropy(traj([1.0, 1.3, 1.8, 2.5]))  # the paper's §4 novelty models
    assert r.label == regimes.STRUCTURE_FORMATION
    assert math.isnan(r.recovery) and r.drop == 0 and r.rise == pytest.approx(1.5)
    assert "no compression phase" in r.reason


def test_monotone_fall_is_compression():
    r = classify_entropy(traj([2.5, 2.0, 1.6, 1.3]))
    assert r.label == regimes.COMPRESSION
    assert r.recovery == 0 and r.min_epoch == 3 and r.reason == "no rise beyond noise"


def test_flat_and_noise_within_tolerance():
    assert classify_entropy(traj([2.0, 2.0, 2.0, 2.0])).label == regimes.FLAT
    wiggle = traj([2.0, 1.995, 2.004, 1.998])  # under 1% of 2 nats
    assert classify_entropy(wiggle).label == regimes.FLAT
    assert classify_entropy(wiggle, rel_tol=0.0).label == regimes.STRUCTURE_FORMATION


def test_logged_noise_decides_a_small_rise():
    t = traj([2.0, 1.0, 1.3])  # R = 0.3, rise 0.3 nats
    assert classify_entropy(t).label == regimes.STRUCTURE_FORMATION
    se = {0: 0.05, 1: 0.1, 2: 0.1}  # rise tolerance 2 · sqrt(0.1² + 0.1²) = 0.283 < 0.3
    r = classify_entropy(t, stderr=se)
    assert r.rise_tolerance == pytest.approx(2 * math.hypot(0.1, 0.1))
    assert r.label == regimes.STRUCTURE_FORMATION
    noisy = {0: 0.05, 1: 0.2, 2: 0.2}  # tolerance 0.566 > 0.3: the rise is noise
    assert classify_entropy(t, stderr=noisy).label == regimes.COMPRESSION
    very_noisy = {0: 0.5, 1: 0.5, 2: 0.5}  # even the drop is noise
    r = classify_entropy(t, stderr=very_noisy)
    assert r.label == regimes.FLAT and math.isnan(r.recovery)


def test_standard_errors_from_logged_std():
    assert standard_errors({0: 0.3, 2: 0.6}, num_subsets=10) == pytest.approx({0: 0.1, 2: 0.2})
    assert standard_errors({0: 0.3}, num_subsets=1) == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_entropy_is_diverged(bad):
    r = classify_entropy(traj([2.0, 1.0, bad, 1.5]))
    assert r.label == regimes.DIVERGED and r.mark == "×"
    assert "epoch 2" in r.reason and math.isnan(r.recovery)


@pytest.mark.parametrize("values", [[], [1.0], [2.0, 1.0]])
def test_too_few_points_are_undetermined(values):
    r = classify_entropy(traj(values))
    assert r.label == regimes.UNDETERMINED and "need ≥ 3" in r.reason
    if len(values) == 2:
        assert r.drop == pytest.approx(1.0)  # the numbers are still reported


def test_order_and_epoch_spacing():
    shuffled = [(10, 1.5), (0, 2.0), (1, 1.0), (3, 1.2)]  # sorted by epoch before use
    r = classify_entropy(shuffled)
    assert r.label == regimes.STRUCTURE_FORMATION and r.recovery == pytest.approx(0.5)
    assert classify_entropy(np.array(shuffled)).recovery == pytest.approx(0.5)


def test_every_regime_has_a_mark():
    assert set(regimes.MARKS) == set(regimes.REGIMES)
