"""A convolution computed as strided slices and one matrix product, for `nn.Conv(conv_general_dilated=...)`.

XLA:CPU's convolutions, their gradients above all, are slow for the small frames and batches of
the RL agent's PPO loop: a PPO update of the default Pong CNN takes 6.2 s with
`lax.conv_general_dilated` and 1.7 s with this, 26.9 s and 3.6 s with twice the channels (2 cores;
`benchmarks/pong_update_speed.py`). It is no general speed-up: for the CIFAR ResNet18 at width ¼,
an NTK kernel took 2× longer with it than with XLA's convolution; measure before using it.

The values are the same: the input is padded, each kernel offset contributes one strided slice,
and the slices, concatenated along the channels, meet the kernel flattened in its
(spatial..., in, out) order.
"""

from __future__ import annotations

import itertools

from jax import lax
import jax.numpy as jnp


def _channels_last(lhs_ndim: int) -> lax.ConvDimensionNumbers:
    n = lhs_ndim - 2  # NHWC, HWIO, NHWC (what flax's nn.Conv passes)
    last = (0, n + 1) + tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(lhs_spec=last, rhs_spec=(n + 1, n) + tuple(range(n)), out_spec=last)


def slice_patches(lhs, size, strides, padding):
    """The convolution's input rows as strided slices, channels last: (batch, *out, K·C) with
    feature index offset·C + channel (the kernel's (spatial..., in) flattening), or None where
    the padding is negative or leaves no window (lax's convolution handles those)."""
    n = lhs.ndim - 2
    size, strides = tuple(size), tuple(strides)
    pads = (lax.padtype_to_pads(lhs.shape[1:-1], size, strides, padding) if isinstance(padding, str)
            else [tuple(p) for p in padding])
    if not all(lo >= 0 and hi >= 0 and lhs.shape[1 + d] + lo + hi >= size[d] for d, (lo, hi) in enumerate(pads)):
        return None
    x = jnp.pad(lhs, [(0, 0)] + list(pads) + [(0, 0)])
    out = [(x.shape[1 + d] - size[d]) // strides[d] + 1 for d in range(n)]
    parts = []
    for offset in itertools.product(*(range(k) for k in size)):
        index = tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offset, out, strides))
        parts.append(x[(slice(None),) + index])
    return jnp.concatenate(parts, axis=-1)


def sliced_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                preferred_element_type=None):
    """`lax.conv_general_dilated` with its signature and values. Channels-last layouts without
    dilation or groups are computed as slices and a dot product; every other case is passed to
    `lax.conv_general_dilated` itself."""
    n = lhs.ndim - 2
    plain = (
        n >= 1 and rhs.ndim == n + 2
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _channels_last(lhs.ndim)
        and all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
        and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
    )
    patches = slice_patches(lhs, rhs.shape[:n], window_strides, padding) if plain else None
    if patches is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    kernel = rhs.reshape((-1, rhs.shape[-1]))
    return lax.dot_general(patches, kernel, (((patches.ndim - 1,), (0,)), ((), ())), precision=precision)
