"""Collective variables (paper eq. 9–10) against closed forms, invariances and bad kernels."""

import math

import numpy as np
import pytest

from ntk_tracking import (
    collective_variables,
    covariance_entropy,
    effective_entropy,
    entropy,
    max_eigenvalue,
    spectrum,
    trace,
    trace_per_point,
)
from ntk_tracking.ntk import cosine_kernel
from ntk_tracking.ntk.stats import batch_variables


def random_kernel(m, seed=0, rank=None):
    """A random PSD kernel G Gᵀ (full rank unless `rank` is given)."""
    g = np.random.default_rng(seed).normal(size=(m, rank or 2 * m))
    return g @ g.T


def rotated(eigenvalues, seed=0):
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return q @ np.diag(eigenvalues) @ q.T


def closed_form_entropy(eigenvalues):
    p = np.asarray(eigenvalues, float) / np.sum(eigenvalues)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


# ANALYTIC CASES


@pytest.mark.parametrize("m", [2, 5, 20])
def test_identity_has_maximal_entropy(m):
    """Θ = I: S = ln m, effective entropy 1, trace m, one point per unit of trace."""
    k = np.eye(m)
    assert entropy(k) == pytest.approx(math.log(m), rel=1e-12)
    assert effective_entropy(k) == pytest.approx(1.0, rel=1e-12)
    assert trace(k) == m and trace_per_point(k) == 1.0
    assert covariance_entropy(k) == pytest.approx(math.log(m), rel=1e-12)


def test_rank_one_has_zero_entropy():
    """Θ = v vᵀ: one eigenvalue ‖v‖², S = 0 (round-off eigenvalues contribute nothing)."""
    v = np.random.default_rng(1).normal(size=7)
    k = np.outer(v, v)
    assert abs(entropy(k)) < 1e-12
    assert abs(effective_entropy(k)) < 1e-12
    assert max_eigenvalue(k) == pytest.approx(v @ v, rel=1e-12)
    assert trace(k) == pytest.approx(v @ v, rel=1e-12)
    assert abs(covariance_entropy(k)) < 1e-12  # the cosine kernel of v vᵀ is ±1 everywhere


@pytest.mark.parametrize("eigenvalues", [[3.0, 1.0], [4.0, 2.0, 1.0, 1.0], [5.0, 1e-3, 0.0, 0.0, 2.0]])
def test_known_eigenvalues_closed_form(eigenvalues):
    """diag(λ) and Q diag(λ) Qᵀ: S = −Σ λ̂ ln λ̂, spectrum = sorted λ, trace = Σ λ."""
    for k in (np.diag(eigenvalues), rotated(eigenvalues)):
        assert entropy(k) == pytest.approx(closed_form_entropy(eigenvalues), rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(spectrum(k), sorted(eigenvalues, reverse=True), atol=1e-12)
        assert max_eigenvalue(k) == pytest.approx(max(eigenvalues), rel=1e-12)
        assert trace(k) == pytest.approx(sum(eigenvalues), rel=1e-12)
        assert effective_entropy(k) == pytest.approx(
            closed_form_entropy(eigenvalues) / math.log(len(eigenvalues)), rel=1e-10, abs=1e-12)


def test_two_by_two_closed_form():
    """[[a, b], [b, a]] has eigenvalues a ± b."""
    a, b = 2.0, 0.5
    k = np.array([[a, b], [b, a]])
    expected = closed_form_entropy([a + b, a - b])
    assert entropy(k) == pytest.approx(expected, rel=1e-12)
    # Its diagonal is constant, so its cosine kernel is k / a: the same entropy.
    assert covariance_entropy(k) == pytest.approx(expected, rel=1e-12)


# INVARIANCES


@pytest.mark.parametrize("c", [1e-6, 0.3, 7.0, 1e6])
def test_entropy_invariant_under_scaling(c):
    """S(cΘ) = S(Θ) for c > 0; the trace scales by c."""
    k = random_kernel(6)
    assert entropy(c * k) == pytest.approx(entropy(k), rel=1e-10)
    assert effective_entropy(c * k) == pytest.approx(effective_entropy(k), rel=1e-10)
    assert covariance_entropy(c * k) == pytest.approx(covariance_entropy(k), rel=1e-10)
    assert trace(c * k) == pytest.approx(c * trace(k), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariant_under_permuting_points(seed):
    """Every variable of P Θ Pᵀ equals that of Θ."""
    k = random_kernel(8, seed=seed)
    p = np.eye(8)[np.random.default_rng(seed).permutation(8)]
    permuted = collective_variables(p @ k @ p.T)
    for name, value in collective_variables(k).items():
        assert permuted[name] == pytest.approx(value, rel=1e-10), name


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 3, None])
def test_effective_entropy_in_unit_interval(seed, rank):
    m = 6
    value = effective_entropy(random_kernel(m, seed=seed, rank=rank))
    assert -1e-12 <= value <= 1.0 + 1e-12
    if rank is not None:
        assert value <= math.log(rank) / math.log(m) + 1e-9  # at most rank nonzero eigenvalues


def test_covariance_entropy_equal_diagonal_equals_entropy():
    """A kernel with a constant diagonal is a multiple of its cosine kernel: same entropy."""
    g = np.random.default_rng(3).normal(size=(6, 10))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    k = 2.5 * g @ g.T
    np.testing.assert_allclose(np.diag(k), 2.5)
    assert covariance_entropy(k) == pytest.approx(entropy(k), rel=1e-12)


def test_covariance_entropy_is_entropy_of_cosine_kernel():
    k = random_kernel(6, seed=4) + np.diag(np.arange(1.0, 7.0))
    c = cosine_kernel(k)
    np.testing.assert_allclose(np.diag(c), 1.0, rtol=1e-12)
    assert covariance_entropy(k) == pytest.approx(entropy(c), rel=1e-12)
    assert covariance_entropy(k) != pytest.approx(entropy(k), rel=1e-3)


def test_tiny_negative_eigenvalues_are_clipped():
    """Round-off negative eigenvalues count as 0: S equals the entropy of the clipped spectrum."""
    k = rotated([1.0, 0.5, -1e-13, -1e-14], seed=5)
    assert entropy(k) == pytest.approx(closed_form_entropy([1.0, 0.5]), rel=1e-10)
    assert np.isfinite(entropy(k)) and np.isfinite(effective_entropy(k))
    assert spectrum(k)[-1] < 0  # the spectrum itself reports them unclipped


def test_trace_per_point_and_max_eigenvalue():
    k = random_kernel(5, seed=6)
    assert trace(k) == pytest.approx(np.trace(k), rel=1e-12)
    assert trace_per_point(k) == pytest.approx(np.trace(k) / 5, rel=1e-12)
    assert max_eigenvalue(k) == pytest.approx(np.linalg.eigvalsh(k).max(), rel=1e-12)


def test_collective_variables_names_and_values():
    """The design's metric names, each equal to its own function; float32 input is accepted."""
    k = random_kernel(5, seed=7).astype(np.float32)
    variables = collective_variables(k)
    assert set(variables) == {"entropy", "entropy_effective", "trace", "trace_per_point",
                              "covariance_entropy", "max_eigenvalue"}
    assert variables["entropy"] == entropy(k)
    assert variables["entropy_effective"] == effective_entropy(k)
    assert variables["trace"] == trace(k)
    assert variables["covariance_entropy"] == covariance_entropy(k)
    assert all(isinstance(v, float) for v in variables.values())


# NON-FINITE AND DEGENERATE KERNELS: NaN AND A WARNING, NEVER AN EXCEPTION

SCALAR_FNS = [entropy, effective_entropy, trace, trace_per_point, covariance_entropy, max_eigenvalue]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", SCALAR_FNS, ids=lambda f: f.__name__)
def test_non_finite_kernel_gives_nan_and_warning(fn, bad):
    k = random_kernel(4, seed=8)
    k[1, 2] = k[2, 1] = bad
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        value = fn(k)
    assert math.isnan(value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kernel_collective_variables_and_spectrum(bad):
    k = random_kernel(4, seed=9)
    k[0, 0] = bad
    with pytest.warns(RuntimeWarning):
        variables = collective_variables(k)
    assert all(math.isnan(v) for v in variables.values())
    with pytest.warns(RuntimeWarning):
        assert np.isnan(spectrum(k)).all()


def test_zero_kernel_entropy_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="no positive eigenvalue"):
        assert math.isnan(entropy(np.zeros((3, 3))))


def test_zero_gradient_point_covariance_entropy_is_nan_with_warning():
    k = np.diag([1.0, 0.0, 2.0])
    with pytest.warns(RuntimeWarning, match="zero"):
        assert math.isnan(covariance_entropy(k))


# BAD INPUT


@pytest.mark.parametrize("fn", [entropy, effective_entropy, covariance_entropy, collective_variables],
                         ids=lambda f: f.__name__)
def test_entropy_needs_two_points(fn):
    with pytest.raises(ValueError, match="at least 2 points"):
        fn(np.ones((1, 1)))


@pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 2, 2)], ids=str)
@pytest.mark.parametrize("fn", SCALAR_FNS + [spectrum, collective_variables], ids=lambda f: f.__name__)
def test_non_square_kernel_rejected(fn, shape):
    with pytest.raises(ValueError, match="square"):
        fn(np.ones(shape))


# EVERY VARIABLE AGAINST ANSWERS WORKED OUT BY HAND (not against the functions it calls)

LN2, LN3 = math.log(2.0), math.log(3.0)
HAND_WORKED = {
    # diag(1, 1, 2): λ̂ = (1/4, 1/4, 1/2), S = 2·(1/4)·ln 4 + (1/2)·ln 2 = 1.5 ln 2; the cosine
    # kernel of a positive diagonal kernel is I, so the covariance entropy is ln 3.
    "diag(1,1,2)": (np.diag([1.0, 1.0, 2.0]), {
        "entropy": 1.5 * LN2, "entropy_effective": 1.5 * LN2 / LN3, "trace": 4.0,
        "trace_per_point": 4.0 / 3.0, "covariance_entropy": LN3, "max_eigenvalue": 2.0}),
    # v vᵀ with v = (1, 2, 2): one eigenvalue ‖v‖² = 9, trace 9, cosines all ±1.
    "rank one (1,2,2)": (np.outer([1.0, 2.0, 2.0], [1.0, 2.0, 2.0]), {
        "entropy": 0.0, "entropy_effective": 0.0, "trace": 9.0, "trace_per_point": 3.0,
        "covariance_entropy": 0.0, "max_eigenvalue": 9.0}),
    # 3·I₄: four equal eigenvalues 3.
    "3*I4": (3.0 * np.eye(4), {
        "entropy": math.log(4.0), "entropy_effective": 1.0, "trace": 12.0, "trace_per_point": 3.0,
        "covariance_entropy": math.log(4.0), "max_eigenvalue": 3.0}),
    # [[2, 1], [1, 2]]: eigenvalues 3 and 1, λ̂ = (3/4, 1/4); constant diagonal 2, so the cosine
    # kernel is k/2 with the same entropy.
    "[[2,1],[1,2]]": (np.array([[2.0, 1.0], [1.0, 2.0]]), {
        "entropy": 2 * LN2 - 0.75 * LN3, "entropy_effective": (2 * LN2 - 0.75 * LN3) / LN2,
        "trace": 4.0, "trace_per_point": 2.0, "covariance_entropy": 2 * LN2 - 0.75 * LN3,
        "max_eigenvalue": 3.0}),
    # Two blocks: 4·(all-ones 2×2) and 1·(all-ones 2×2): eigenvalues 8, 2, 0, 0 → λ̂ = (4/5, 1/5);
    # the cosine kernel is the all-ones blocks: eigenvalues 2, 2, 0, 0 → ln 2.
    "two rank-one blocks": (np.block([[4 * np.ones((2, 2)), np.zeros((2, 2))],
                                      [np.zeros((2, 2)), np.ones((2, 2))]]), {
        "entropy": math.log(5.0) - 0.8 * math.log(4.0),
        "entropy_effective": (math.log(5.0) - 0.8 * math.log(4.0)) / math.log(4.0),
        "trace": 10.0, "trace_per_point": 2.5, "covariance_entropy": LN2, "max_eigenvalue": 8.0}),
}


@pytest.mark.parametrize("name", sorted(HAND_WORKED))
def test_collective_variables_equal_hand_worked_values(name):
    k, expected = HAND_WORKED[name]
    for kernel in (k, k.astype(np.float32)):
        got = collective_variables(kernel)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)


@pytest.mark.parametrize("name", sorted(HAND_WORKED))
def test_each_function_equals_hand_worked_values(name):
    k, expected = HAND_WORKED[name]
    functions = {"entropy": entropy, "entropy_effective": effective_entropy, "trace": trace,
                 "trace_per_point": trace_per_point, "covariance_entropy": covariance_entropy,
                 "max_eigenvalue": max_eigenvalue}
    for key, fn in functions.items():
        assert fn(k) == pytest.approx(expected[key], rel=1e-12, abs=1e-12), (name, key)


@pytest.mark.parametrize("m", [2, 3, 7])
def test_identity_closed_forms_of_every_variable(m):
    """Θ = I_m: S = ln m, S/ln m = 1, trace m, one per point, largest eigenvalue 1."""
    got = collective_variables(np.eye(m))
    assert got == pytest.approx({"entropy": math.log(m), "entropy_effective": 1.0, "trace": float(m),
                                 "trace_per_point": 1.0, "covariance_entropy": math.log(m),
                                 "max_eigenvalue": 1.0}, rel=1e-12)


def test_max_eigenvalue_is_the_largest_not_the_first_or_last():
    """diag(2, 5, 1): the largest eigenvalue is 5 wherever it sits; the spectrum is sorted."""
    k = np.diag([2.0, 5.0, 1.0])
    assert max_eigenvalue(k) == 5.0
    np.testing.assert_array_equal(spectrum(k), [5.0, 2.0, 1.0])
    assert max_eigenvalue(-np.eye(3) + 4 * np.ones((3, 3)) / 3) == pytest.approx(3.0, rel=1e-12)


# THE BATCHED VARIABLES (the analyzer's path) EQUAL THE PER-KERNEL FUNCTIONS


def _stack_with_degenerate_kernels(m=6):
    """Full-rank, low-rank, rescaled, zero-gradient-point, zero and non-finite kernels."""
    kernels = [random_kernel(m, seed=s) for s in range(4)] + [random_kernel(m, seed=5, rank=2),
                                                               1e-9 * random_kernel(m, seed=6)]
    zero_point = random_kernel(m, seed=7)
    zero_point[2, :] = zero_point[:, 2] = 0.0
    nan, inf = random_kernel(m, seed=8), random_kernel(m, seed=9)
    nan[1, 3], inf[0, 0] = np.nan, np.inf
    return np.stack(kernels + [zero_point, np.zeros((m, m)), nan, inf])


def test_batch_variables_equal_the_per_kernel_functions():
    kernels = _stack_with_degenerate_kernels()
    with pytest.warns(RuntimeWarning):
        spectra, variables = batch_variables(kernels)
    for i, k in enumerate(kernels):
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if i >= 6 else _no_warning():
            expected, expected_spectrum = collective_variables(k), spectrum(k)
        np.testing.assert_allclose(spectra[i], expected_spectrum, rtol=1e-13, atol=0, equal_nan=True)
        for name, value in expected.items():
            got = variables[name][i]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-13, abs=0), (i, name)
    assert sorted(variables) == sorted(expected)
    # the degenerate ones: NaN exactly where the per-kernel functions give NaN
    assert math.isnan(variables["covariance_entropy"][6]) and not math.isnan(variables["entropy"][6])
    assert all(math.isnan(variables["entropy"][i]) for i in (7, 8, 9))


def _no_warning():
    import warnings
    from contextlib import contextmanager

    @contextmanager
    def raise_on_warning():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    return raise_on_warning()


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 4), (2, 1, 1)], ids=str)
def test_batch_variables_bad_shapes(shape):
    with pytest.raises(ValueError, match="stack|at least 2 points"):
        batch_variables(np.ones(shape))

