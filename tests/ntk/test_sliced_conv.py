"""`sliced_conv` computes what `lax.conv_general_dilated` computes, values and gradients, and the
NTK engine's structured convolution rule applies to an `nn.Conv` that uses it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ntk_tracking import NTK
from ntk_tracking.models.conv import sliced_conv


def _channels_last(n):
    return {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[n]


CASES = [  # spatial shape, kernel size, strides, padding
    ((9,), (3,), (1,), "SAME"),
    ((10,), (4,), (3,), "VALID"),
    ((7, 9), (3, 3), (1, 1), "SAME"),
    ((30, 40), (3, 3), (2, 2), "SAME"),  # the Pong CNN's first layer
    ((15, 20), (3, 3), (2, 2), "SAME"),  # and its second: odd sizes, uneven padding
    ((8, 8), (2, 3), (2, 1), "VALID"),
    ((6, 7), (3, 2), (1, 2), "SAME_LOWER"),
    ((6, 7), (3, 3), (2, 2), ((2, 0), (1, 3))),
    ((5, 6, 4), (2, 3, 2), (1, 2, 1), "SAME"),
    ((3, 3), (3, 3), (1, 1), "VALID"),  # one output position
]


@pytest.mark.parametrize("spatial, size, strides, padding", CASES)
def test_values_and_gradients_equal_lax_conv(spatial, size, strides, padding, x64):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(2,) + spatial + (3,)))
    rhs = jnp.asarray(rng.normal(size=size + (3, 5)))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _channels_last(len(spatial)))

    def conv(fn):
        return lambda a, k: fn(a, k, strides, padding, dimension_numbers=dn)

    expected, got = conv(lax.conv_general_dilated)(lhs, rhs), conv(sliced_conv)(lhs, rhs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    cotangent = jnp.asarray(rng.normal(size=expected.shape))
    for argnum in (0, 1):
        grad = [jax.grad(lambda a, k, f=f: jnp.sum(conv(f)(a, k) * cotangent), argnum)(lhs, rhs)
                for f in (lax.conv_general_dilated, sliced_conv)]
        np.testing.assert_allclose(grad[1], grad[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(lhs_dilation=(2, 1)), dict(rhs_dilation=(1, 2)), dict(feature_group_count=3), dict(layout="NCHW"),
])
def test_other_cases_are_lax_conv_itself(kwargs, x64):
    """Dilation, groups and other layouts are not sliced: they are passed on, values unchanged."""
    rng = np.random.default_rng(1)
    layout = kwargs.pop("layout", "NHWC")
    groups = kwargs.get("feature_group_count", 1)
    lhs = jnp.asarray(rng.normal(size=(2, 3, 7, 8) if layout == "NCHW" else (2, 7, 8, 3)))
    rhs = jnp.asarray(rng.normal(size=(6, 3 // groups, 3, 3) if layout == "NCHW" else (3, 3, 3 // groups, 6)))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                    ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC"))
    args = (lhs, rhs, (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(sliced_conv(*args, dimension_numbers=dn, **kwargs),
                                  lax.conv_general_dilated(*args, dimension_numbers=dn, **kwargs))


def test_nn_conv_with_it_is_nn_conv_and_structured_exactly(x64):
    """Same parameters, same outputs as the default nn.Conv; the engine claims its kernel for the
    structured convolution rule, and the kernel equals the float64 brute force."""

    class Net(nn.Module):
        conv: object = None

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), conv_general_dilated=self.conv)(x))
            return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]

    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 9, 11, 3)))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), Net().init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(Net(sliced_conv).apply(params, x), Net().apply(params, x), rtol=1e-12)
    fn = Net(sliced_conv).apply
    ntk = NTK(fn, "structured")
    assert "params/Conv_0/kernel" in ntk.structured_leaves(params, x)
    jac = jax.jit(jax.jacobian(lambda p: fn(p, x)))(params)
    flat = jnp.concatenate([j.reshape(5, -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
    np.testing.assert_allclose(ntk(params, x), flat @ flat.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spatial, size, strides, padding", CASES)
def test_slice_patches_are_lax_patches_reordered(spatial, size, strides, padding):
    """The engine's conv rows: the same numbers as `lax.conv_general_dilated_patches`, with the
    features ordered offset-major instead of channel-major (a Gram of rows is the same)."""
    from ntk_tracking.models.conv import slice_patches

    channels = 3
    lhs = jnp.asarray(np.random.default_rng(1).normal(size=(2,) + spatial + (channels,)), jnp.float32)
    dn = lax.conv_dimension_numbers(lhs.shape, (1,) * (len(spatial) + 2), _channels_last(len(spatial)))
    expected = lax.conv_general_dilated_patches(lhs, size, strides, padding, dimension_numbers=dn)
    got = slice_patches(lhs, size, strides, padding)
    n_offsets = int(np.prod(size))
    order = [c * n_offsets + k for k in range(n_offsets) for c in range(channels)]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected)[..., order])


def test_engine_rows_fall_back_to_lax_patches_with_dilation():
    """Dilated convolutions keep lax's patches (slices would need holes); no window -> None."""
    from ntk_tracking.models.conv import slice_patches
    from ntk_tracking.ntk.structured import _patches

    a = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 2)), jnp.float32)
    static = ((2, 2), (1, 1), "SAME", (1, 1), (2, 2))
    dn = lax.conv_dimension_numbers(a.shape, (1, 1, 1, 1), _channels_last(2))
    expected = lax.conv_general_dilated_patches(a, (2, 2), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
    np.testing.assert_array_equal(np.asarray(_patches(a, "conv", static)), np.asarray(expected).reshape(-1, 8))
    assert slice_patches(a, (7, 7), (1, 1), "VALID") is None
