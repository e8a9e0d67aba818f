"""The measurement protocol (paper §4): fixed subsets by seed; mean and std over them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tracking import NTK, Measurement, collective_variables, draw_subsets, empirical_ntk


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


# DRAWING SUBSETS


@pytest.mark.parametrize("n, k, m", [(100, 5, 20), (40, 8, 5), (30, 200, 20), (3, 4, 2)])
def test_draw_subsets_reproducible_by_seed(n, k, m):
    a = draw_subsets(n, k, m, seed=0)
    assert a.shape == (k, m)
    assert np.issubdtype(a.dtype, np.integer)
    assert a.min() >= 0 and a.max() < n
    np.testing.assert_array_equal(a, draw_subsets(n, k, m, seed=0))
    assert not np.array_equal(a, draw_subsets(n, k, m, seed=1))


@pytest.mark.parametrize("n, k, m", [(100, 5, 20), (40, 8, 5), (12, 4, 3)])
def test_draw_subsets_disjoint_when_split_allows(n, k, m):
    """K·m ≤ n (including K·m = n): no point appears twice across all subsets."""
    a = draw_subsets(n, k, m, seed=3)
    assert len(np.unique(a)) == k * m


@pytest.mark.parametrize("n, k, m", [(30, 200, 20), (10, 6, 10), (5, 50, 2)])
def test_draw_subsets_distinct_within_subset_otherwise(n, k, m):
    """K·m > n: subsets overlap, but each holds m distinct points."""
    a = draw_subsets(n, k, m, seed=4)
    assert all(len(set(row)) == m for row in a)
    assert len(np.unique(a)) <= n
    assert len({tuple(sorted(row)) for row in a}) > 1 or n == m  # not one subset repeated


@pytest.mark.parametrize("n, k, m, match", [
    (10, 3, 1, "must be ≥ 2"),
    (10, 3, 0, "must be ≥ 2"),
    (10, 3, 11, "exceeds the 10 points"),
    (10, 0, 5, "num_subsets"),
])
def test_draw_subsets_rejects_bad_sizes(n, k, m, match):
    with pytest.raises(ValueError, match=match):
        draw_subsets(n, k, m, seed=0)


# MEASUREMENT


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def mlp():
    model = SmallMLP()
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x


def hand_loop(apply_fn, params, x, subsets, mask=None):
    """Mean and population std (ddof = 0) of every variable, one empirical_ntk per subset."""
    per_subset = []
    for idx in subsets:
        xs = jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], x)
        ms = None if mask is None else np.asarray(mask)[idx]
        kernel = np.asarray(empirical_ntk(apply_fn, params, xs, output_mask=ms), np.float64)
        per_subset.append(collective_variables(kernel))
    out = {}
    for name in per_subset[0]:
        values = np.array([v[name] for v in per_subset])
        out[name] = values.mean()
        if name in ("entropy", "trace"):
            out[f"{name}_std"] = values.std()
    return out


def test_measurement_matches_hand_loop(mlp):
    apply_fn, params, x = mlp
    subsets = draw_subsets(30, 4, 6, seed=0)
    measurement = Measurement(NTK(apply_fn), x, subsets)
    result = dict(measurement.run(params))
    expected = hand_loop(apply_fn, params, x, subsets)
    assert set(result) == set(expected) == {
        "entropy", "entropy_std", "entropy_effective", "trace", "trace_std", "trace_per_point",
        "covariance_entropy", "max_eigenvalue"}
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-6), name
    assert result["entropy_std"] > 0 and result["trace_std"] > 0
    assert measurement.last_spectra.shape == (4, 6)
    # Reused for a second checkpoint: new values, same subsets.
    new_params = jax.tree_util.tree_map(lambda a: 2.0 * a, params)
    second = dict(measurement.run(new_params))
    assert second["trace"] == pytest.approx(hand_loop(apply_fn, new_params, x, subsets)["trace"],
                                            rel=1e-6)


def test_measurement_with_pytree_x_and_output_mask():
    """Per-subset slices of a dict x and of the output mask, as the hand loop does."""
    n, length = 12, 5

    def apply_fn(p, x):
        h = jnp.tanh(p["emb"][x["tokens"]] * x["scale"][:, None, None])
        return h @ p["out"]  # (points, positions, classes)

    rng = np.random.default_rng(1)
    params = {"emb": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),
              "out": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    x = {"tokens": rng.integers(0, 7, (n, length)), "scale": rng.uniform(0.5, 2.0, n)}
    mask = (np.arange(length)[None, :] < rng.integers(1, length + 1, n)[:, None]).astype(np.float32)
    subsets = draw_subsets(n, 3, 4, seed=2)
    result = dict(Measurement(NTK(apply_fn), x, subsets, output_mask=mask).run(params))
    expected = hand_loop(apply_fn, params, x, subsets, mask)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-6), name
    unmasked = dict(Measurement(NTK(apply_fn), x, subsets).run(params))
    assert unmasked["trace"] > result["trace"]


def test_measurement_rejects_out_of_range_subsets(mlp):
    apply_fn, _, x = mlp
    with pytest.raises(ValueError, match="split holds 30 points"):
        Measurement(NTK(apply_fn), x, np.array([[0, 30]]))
