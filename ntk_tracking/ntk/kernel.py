"""The empirical neural tangent kernel, exact, blocked under a memory budget, compiled once.

Θ_ij = Σ_o Σ_k ∂f_o(x_i)/∂θ_k · ∂f_o(x_j)/∂θ_k  (paper eq. 4–5): every output axis is summed.
neural-tangents' ``trace_axes`` averages over them instead, so its values are smaller by the
output size.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("jacobian", "ntvp")
DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes
# A block's Jacobian is held twice (row and column block) plus autodiff temporaries.
_JACOBIAN_COPIES = 3

_HIGHEST = jax.lax.Precision.HIGHEST  # keep TF32/bf16 out of the kernel on accelerators


def num_points(x) -> int:
    """The number of measurement points: the shared leading axis of every leaf of ``x``."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError("x holds no arrays; pass an array or a pytree of arrays, points first")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes:
        raise ValueError("every leaf of x needs a leading point axis; found a scalar leaf")
    if len(sizes) != 1:
        raise ValueError(
            f"the leaves of x disagree on the number of points (leading axes {sorted(sizes)}); "
            "every leaf must lead with the same point axis (pad graphs/sequences per point)"
        )
    (m,) = sizes
    if m == 0:
        raise ValueError("x holds no points (empty batch); the NTK needs at least one point")
    return m


def _slice(x, start: int, stop: int, pad_to: int):
    """Points start:stop of x, padded with copies of point `start` up to `pad_to` points."""

    def take(a):
        a = jnp.asarray(a)[start:stop]
        if a.shape[0] < pad_to:
            fill = jnp.repeat(a[:1], pad_to - a.shape[0], axis=0)
            a = jnp.concatenate([a, fill], axis=0)
        return a

    return jax.tree_util.tree_map(take, x)


class NTK:
    """Empirical NTK of one ``apply_fn``; compiled functions are kept for reuse.

    ``apply_fn(params, x)`` maps a batch (every leaf of ``x`` leads with the point axis) to
    outputs that lead with the point axis. Close over non-parameter state (BatchNorm
    statistics) in ``apply_fn``. Calls with new ``params`` of the same shapes reuse the
    compiled code, which is what the analyzer does for every checkpoint.
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], jax.Array],
        implementation: str = "auto",
        memory_budget: int | None = None,
        block_size: int | None = None,
    ):
        if implementation not in IMPLEMENTATIONS + ("auto",):
            raise ValueError(
                f"unknown NTK implementation {implementation!r}; "
                f"choose one of {IMPLEMENTATIONS + ('auto',)}"
            )
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.apply_fn = apply_fn
        self.implementation = implementation
        self.memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
        self.block_size = block_size
        self._jac = jax.jit(self._block_jacobian, static_argnames=("full",))
        self._contract = jax.jit(_contract)
        self._sq_norms = jax.jit(_squared_norms)
        self._ntvp = jax.jit(self._ntvp_tile, static_argnames=("full", "chunk"))

    # -- public -----------------------------------------------------------------------------

    def __call__(self, params, x, output_mask=None, full: bool = False) -> jax.Array:
        """The m×m kernel (outputs summed), or with ``full`` the (m·O)×(m·O) kernel."""
        m, out_shape, mask = self._prepare(params, x, output_mask)
        impl, block, chunk = self._plan(params, m, out_shape)
        starts = list(range(0, m, block))
        rows = []
        for a in starts:
            xa = _slice(x, a, a + block, block)
            ma = _slice(mask, a, a + block, block)
            ja = self._jac(params, xa, ma, full=full) if impl == "jacobian" else None
            row = []
            for b in starts:
                xb = _slice(x, b, b + block, block)
                mb = _slice(mask, b, b + block, block)
                if impl == "jacobian":
                    jb = ja if a == b else self._jac(params, xb, mb, full=full)
                    row.append(self._contract(ja, jb))
                else:
                    row.append(self._ntvp(params, xa, ma, xb, mb, full=full, chunk=chunk))
            rows.append(jnp.concatenate(row, axis=1))
        kernel = jnp.concatenate(rows, axis=0)
        if full:  # rows are (padded point, output), point-major; padding sits at the end
            n_keep = m * math.prod(out_shape)
            return kernel[:n_keep, :n_keep]
        return kernel[:m, :m]

    def diagonal(self, params, x, output_mask=None) -> jax.Array:
        """Θ_ii for every point: Σ_o ‖∂f_o(x_i)/∂θ‖², from per-point gradients, no kernel."""
        m, out_shape, mask = self._prepare(params, x, output_mask)
        block = self._jacobian_block(params, m, out_shape)
        parts = []
        for a in range(0, m, block):
            ja = self._jac(params, _slice(x, a, a + block, block), _slice(mask, a, a + block, block))
            parts.append(self._sq_norms(ja))
        return jnp.concatenate(parts)[:m]

    def trace(self, params, x, output_mask=None) -> jax.Array:
        """Tr Θ (eq. 10) without forming the kernel."""
        return jnp.sum(self.diagonal(params, x, output_mask))

    # -- planning ---------------------------------------------------------------------------

    def _prepare(self, params, x, output_mask):
        m = num_points(x)
        try:
            out = jax.eval_shape(self.apply_fn, params, x)
        except (TypeError, ValueError) as err:
            raise ValueError(f"apply_fn(params, x) failed on these inputs: {err}") from err
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError("apply_fn must return a single array (points first), not a pytree")
        if out.ndim == 0 or out.shape[0] != m:
            raise ValueError(
                f"apply_fn returned shape {out.shape}, but x holds {m} points: the output must "
                "lead with the point axis (one row per point of x)"
            )
        out_shape = out.shape[1:]
        if output_mask is None:
            mask = jnp.ones((m,) + out_shape, out.dtype)
        else:
            mask = jnp.asarray(output_mask)
            if mask.shape != out.shape[: mask.ndim] or mask.ndim == 0:
                raise ValueError(
                    f"output_mask has shape {mask.shape}; it must equal the output shape "
                    f"{out.shape} or a leading part of it (e.g. (points, positions))"
                )
            mask = jnp.broadcast_to(
                mask.reshape(mask.shape + (1,) * (out.ndim - mask.ndim)), out.shape
            ).astype(out.dtype)
        return m, out_shape, mask

    def _per_point_bytes(self, params, out_shape) -> int:
        leaves = jax.tree_util.tree_leaves(params)
        n_params = sum(int(np.size(leaf)) for leaf in leaves)
        itemsize = max(np.dtype(leaf.dtype).itemsize for leaf in leaves)
        return math.prod(out_shape) * n_params * itemsize

    def _jacobian_block(self, params, m, out_shape) -> int:
        if self.block_size is not None:
            return min(self.block_size, m)
        per_point = _JACOBIAN_COPIES * self._per_point_bytes(params, out_shape)
        return int(max(1, min(m, self.memory_budget // max(per_point, 1))))

    def _plan(self, params, m, out_shape):
        impl = self.implementation
        per_point = _JACOBIAN_COPIES * self._per_point_bytes(params, out_shape)
        if impl == "auto":
            impl = "jacobian" if per_point <= self.memory_budget else "ntvp"
        if impl == "jacobian":
            if per_point > self.memory_budget and self.block_size is None:
                warnings.warn(
                    "one point's Jacobian exceeds the memory budget; computing one point at a "
                    "time anyway (implementation='ntvp' needs far less memory)",
                    stacklevel=3,
                )
            return impl, self._jacobian_block(params, m, out_shape), None
        block = min(self.block_size or m, m)
        # Each in-flight cotangent holds about one parameter-sized tangent.
        one = max(self._per_point_bytes(params, ()), 1) * _JACOBIAN_COPIES
        chunk = int(max(1, min(block * math.prod(out_shape), self.memory_budget // one)))
        return impl, block, chunk

    # -- kernels (traced) -------------------------------------------------------------------

    def _masked_apply(self, params, x, mask):
        return self.apply_fn(params, x) * mask

    def _block_jacobian(self, params, x, mask, full: bool = False):
        """Per-point Jacobians, one flat matrix per parameter leaf: rows = points (× outputs)."""

        def one_point(p, xi, mi):
            xb = jax.tree_util.tree_map(lambda a: a[None], xi)
            return self._masked_apply(p, xb, mi[None])[0]

        jac = jax.vmap(jax.jacrev(one_point), in_axes=(None, 0, 0))(params, x, mask)
        n = mask.shape[0]
        rows = n * math.prod(mask.shape[1:]) if full else n
        return [leaf.reshape(rows, -1) for leaf in jax.tree_util.tree_leaves(jac)]

    def _ntvp_tile(self, params, xa, ma, xb, mb, full: bool = False, chunk: int = 1):
        """Θ[a, b] from NTK–vector products: J_b (J_aᵀ e) for every output basis vector e."""
        out_a, vjp_a = jax.vjp(lambda p: self._masked_apply(p, xa, ma), params)
        n_out = out_a.size
        basis = jnp.eye(n_out, dtype=out_a.dtype).reshape((n_out,) + out_a.shape)

        def column(ct):
            (tangent,) = vjp_a(ct)
            _, jvp = jax.jvp(lambda p: self._masked_apply(p, xb, mb), (params,), (tangent,))
            return jvp

        cols = jax.lax.map(column, basis, batch_size=chunk)  # (n_a·O, n_b, *out)
        na, nb = ma.shape[0], mb.shape[0]
        o = n_out // na
        tile = cols.reshape(na, o, nb, o)
        if full:
            return tile.reshape(na * o, nb * o)
        return jnp.einsum("iojo->ij", tile)


def _contract(ja, jb):
    """Σ over parameter leaves of J_a J_bᵀ."""
    return functools.reduce(
        jnp.add, (jnp.matmul(a, b.T, precision=_HIGHEST) for a, b in zip(ja, jb))
    )


def _squared_norms(ja):
    return functools.reduce(jnp.add, (jnp.sum(a * a, axis=1) for a in ja))


@functools.lru_cache(maxsize=64)
def _cached_ntk(apply_fn, implementation, memory_budget, block_size) -> NTK:
    return NTK(apply_fn, implementation, memory_budget, block_size)


def empirical_ntk(
    apply_fn: Callable[[Any, Any], jax.Array],
    params,
    x,
    *,
    output_mask=None,
    implementation: str = "auto",
    full: bool = False,
    memory_budget: int | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """The empirical NTK of ``apply_fn`` at ``params`` over the points of ``x``.

    Returns the m×m kernel with every output axis summed, or with ``full=True`` the
    (m·O)×(m·O) kernel (rows ordered point-major). ``output_mask`` (the output shape or a
    leading part of it) zeroes padded outputs so they contribute nothing. Pass the same
    ``apply_fn`` object on every call to reuse the compiled code.
    """
    ntk = _cached_ntk(apply_fn, implementation, memory_budget, block_size)
    return ntk(params, x, output_mask=output_mask, full=full)


def ntk_trace(apply_fn, params, x, *, output_mask=None, memory_budget=None) -> jax.Array:
    """Tr Θ = Σ_i ‖∂f(x_i)/∂θ‖² from per-point gradients, without forming the kernel."""
    return _cached_ntk(apply_fn, "auto", memory_budget, None).trace(params, x, output_mask)
