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

from ntk_tracking.ntk import structured

IMPLEMENTATIONS = ("jacobian", "ntvp", "structured")
KEEP = "keep"  # a plan's chunk for the factor methods: every block's factors are held at once
DEFAULT_MEMORY_BUDGET = 4 * 1024**3  # bytes: unblocked m = 20 on the reference networks
# A block's Jacobian is held twice (row and column block) plus autodiff temporaries.
_JACOBIAN_COPIES = 3


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


def take(x, indices):
    """Points `indices` of an array or pytree whose leaves lead with the point axis (None stays None)."""
    return None if x is None else jax.tree_util.tree_map(lambda a: np.asarray(a)[indices], x)


def _block(tree, start, block: int):
    """Points start:start+block of every leaf (traced ``start``), padded at the end with copies
    of the last point so every block has the same shape: one compilation for all blocks."""

    def take(a):
        n_pad = -a.shape[0] % block
        if n_pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], n_pad, axis=0)], axis=0)
        return jax.lax.dynamic_slice_in_dim(a, start, block, axis=0)

    return jax.tree_util.tree_map(take, tree)


def _intermediate_bytes(jaxpr) -> int:
    """Bytes of every value a jaxpr computes, nested jaxprs included: a rough upper bound on the
    activations one forward pass holds (autodiff keeps tangents/cotangents of the same size)."""
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", None)
            if shape is not None:
                total += math.prod(shape) * getattr(var.aval.dtype, "itemsize", 4)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    total += _intermediate_bytes(sub)
    return total


def _assemble(upper, n_keep: int):
    """The kernel from its upper block tiles (tile (b, a) = tile (a, b)ᵀ), padding cropped."""
    k = len(upper)
    rows = [
        jnp.concatenate([upper[a][b] if b >= a else upper[b][a].T for b in range(k)], axis=1)
        for a in range(k)
    ]
    return jnp.concatenate(rows, axis=0)[:n_keep, :n_keep]


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
        self._jac = jax.jit(self._block_jacobian, static_argnames=("block", "full"))
        self._contract = jax.jit(_contract)
        self._sq_norms = jax.jit(_squared_norms)
        self._ntvp = jax.jit(self._ntvp_tile, static_argnames=("block", "full", "chunk"))
        self._assemble = jax.jit(_assemble, static_argnames=("n_keep",))
        self._factors = jax.jit(self._structured_block, static_argnames=("block", "full", "calls", "inert"))
        self._contract_factors = jax.jit(structured.contract, static_argnames=("full",))
        self._jac_tile = jax.jit(self._jacobian_tile, static_argnames=("full",))
        self._structured_tile = jax.jit(self._structured_one_block,
                                        static_argnames=("full", "calls", "inert"))
        self._discovered: dict = {}
        self._traced: dict = {}  # output shape and activation bytes, per input shapes
        self._plans: dict = {}
        self._grouped_fns: dict = {}
        self._apply_jit = jax.jit(apply_fn)  # its traces are cached: shapes and activations

    # -- public -----------------------------------------------------------------------------

    def __call__(self, params, x, output_mask=None, full: bool = False) -> jax.Array:
        """The m×m kernel (outputs summed), or with ``full`` the (m·O)×(m·O) kernel."""
        key = _shapes_key((params, x))  # once per call: the plans and compiled code are kept by it
        m, out_shape, mask, act = self._prepare(params, x, output_mask, key)
        return self._kernel(params, x, mask, m, out_shape, act, full, key)

    def _kernel(self, params, x, mask, m, out_shape, act, full, key):
        """The kernel of ``x`` with its full-shape ``mask`` (already checked by ``_prepare``)."""
        impl, block, chunk = self._plan(params, m, out_shape, act, x, mask, full, key)
        k = -(-m // block)
        if k == 1 and chunk == KEEP and impl in ("jacobian", "structured"):
            # One block: its factors and their contraction in one compiled call (one dispatch,
            # and XLA lays the factors out for the contraction). x goes as given: the compiled
            # call's own transfer of host arrays costs less than an eager one first (on the
            # Pong kernels, 0.1-0.25 ms of their 2-3 ms).
            return self._one_tile(impl, params, x, mask, full, key)
        x = jax.tree_util.tree_map(jnp.asarray, x)  # on the device once for the blocks' calls
        # The kernel is symmetric: compute the tiles (a, b ≥ a) only.
        upper = [[None] * k for _ in range(k)]
        if impl in ("jacobian", "structured"):
            jac, contract = self._factor_fns(impl, params, x, mask, block, full, key)
            if chunk == KEEP:  # every block's factors fit at once: each is computed once
                factors = [jac(b * block) for b in range(k)]
                for a in range(k):
                    for b in range(a, k):
                        upper[a][b] = contract(factors[a], factors[b])
            else:  # two blocks at a time: the column blocks are recomputed for every row
                ja = jac(0)
                for a in range(k):
                    jb = None
                    # Backwards, so the last Jacobian computed (block a + 1) is the next row's.
                    for b in range(k - 1, a, -1):
                        jb = None  # free the previous block's Jacobian before the next one
                        jb = jac(b * block)
                        upper[a][b] = contract(ja, jb)
                    upper[a][a] = contract(ja, ja)
                    ja = jb
        else:
            for a in range(k):
                for b in range(a, k):
                    upper[a][b] = self._ntvp(params, x, mask, a * block, b * block, block=block,
                                             full=full, chunk=chunk)
        if k == 1:  # a single block holds exactly the m points
            return upper[0][0]
        # Rows are (padded point, output), point-major; padding sits at the end.
        n_keep = m * math.prod(out_shape) if full else m
        return self._assemble(tuple(map(tuple, upper)), n_keep=n_keep)

    def subset_kernels(self, params, x, subsets, output_mask=None, full: bool = False,
                       group: int | None = None) -> jax.Array:
        """The kernels of K subsets of the points of ``x``: shape (K, m, m), or with ``full``
        (K, m·O, m·O); ``subsets`` is a (K, m) index array (see ``draw_subsets``).

        Equal to ``[self(params, x[idx]) for idx in subsets]``, which is what it computes on one
        device by default. With several devices (``jax.local_devices()``: several GPUs) the
        subsets are split across them (``jax.shard_map``), each device taking its share one
        subset at a time in one compiled call (``lax.map``). ``group`` = g computes the per-point
        factors of up to g subsets at once (as many as the memory budget allows) and contracts
        them within each subset, all K in one compiled call: fewer dispatches, more memory. On
        CPU it measured slower than one subset at a time (docs/analysis.md), hence not the default. Where
        one subset alone exceeds the budget, or for ``ntvp``, the subsets are computed one by one.
        """
        subsets = np.asarray(subsets)
        if subsets.ndim != 2 or subsets.shape[0] < 1 or subsets.shape[1] < 1:
            raise ValueError(f"subsets must be a (K, m) index array, got shape {subsets.shape}")
        if group is not None and group < 1:
            raise ValueError(f"group must be ≥ 1 subset, got {group}")
        n_subsets, m = subsets.shape
        n = num_points(x)
        if subsets.min() < 0 or subsets.max() >= n:
            raise ValueError(f"subset indices must lie in [0, {n}), got {subsets.min()}…{subsets.max()}")

        devices = jax.local_devices()
        one_by_one = group is None and len(devices) == 1
        if not one_by_one:
            first = self._prepare(params, take(x, subsets[0]), take(output_mask, subsets[0]))
            impl, block, _ = self._plan(params, n_subsets * m, first[1], first[3], take(x, subsets[0]))
            one_by_one = impl == "ntvp" or block < m
        if one_by_one:
            return jnp.stack(self._one_by_one(params, x, subsets, output_mask, full))
        per_group = max(1, min(group or 1, block // m, -(-n_subsets // len(devices))))
        groups = -(-n_subsets // (per_group * len(devices))) * len(devices)
        order = np.resize(subsets, (groups * per_group, m))  # padded with repeats, cropped below
        points = take(x, order.reshape(-1))
        mask = self._prepare(params, points, take(output_mask, order.reshape(-1)))[2]
        calls, inert = (self._discover(params, points), self._inert(params, points)) if impl == "structured" else ((), ())
        fn = self._grouped(impl, per_group, m, full, calls, inert, len(devices))
        return fn(params, jax.tree_util.tree_map(jnp.asarray, points), mask)[:n_subsets]

    def _one_by_one(self, params, x, subsets, output_mask, full):
        """``[self(params, take(x, idx), take(output_mask, idx)) for idx in subsets]``, with the
        per-call host work (shapes key, output trace, mask check) done once: every subset has
        the same shapes. A run of consecutive indices (the analyzer's subsets) is a view, not a
        copy. The Pong networks' kernels take milliseconds, and this work was a tenth of them."""
        first = take(x, subsets[0])
        key = _shapes_key((params, first))
        m, out_shape, mask, act = self._prepare(params, first, take(output_mask, subsets[0]), key)
        if output_mask is not None:  # every point's mask at once; checked above on the first subset
            masks = np.asarray(output_mask)
            masks = _broadcast_mask(masks, (masks.shape[0],) + out_shape, mask.dtype)
        kernels = []
        for idx in subsets:
            if idx[-1] - idx[0] == m - 1 and np.all(np.diff(idx) == 1):
                idx = slice(int(idx[0]), int(idx[-1]) + 1)
            if output_mask is not None:
                mask = masks[idx]
            kernels.append(self._kernel(params, take(x, idx), mask, m, out_shape, act, full, key))
        return kernels

    def _grouped(self, impl, per_group, m, full, calls, inert, n_devices):
        key = impl, per_group, m, full, calls, inert, n_devices
        if key not in self._grouped_fns:
            local = functools.partial(self._subset_groups, impl=impl, per_group=per_group, m=m,
                                      full=full, calls=calls, inert=inert)
            if n_devices > 1:
                mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("subsets",))
                spec = jax.sharding.PartitionSpec("subsets")
                local = jax.shard_map(local, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec, spec),
                                      out_specs=spec, check_vma=False)
            self._grouped_fns[key] = jax.jit(local)
        return self._grouped_fns[key]

    def _factor_fns(self, impl, params, x, mask, block, full, key=None):
        """(one block's factors from its first point, contraction of two blocks' factors)."""
        if impl == "jacobian":
            return (functools.partial(self._jac, params, x, mask, block=block, full=full),
                    self._contract)
        calls, inert = self._structure(params, x, key)
        return (functools.partial(self._factors, params, x, mask, block=block, full=full,
                                  calls=calls, inert=inert),
                functools.partial(self._contract_factors, full=full))

    def _one_tile(self, impl, params, x, mask, full, key):
        """The kernel of one block holding every point: factors and contraction in one call."""
        if impl == "jacobian":
            return self._jac_tile(params, x, mask, full=full)
        calls, inert = self._structure(params, x, key)
        return self._structured_tile(params, x, mask, full=full, calls=calls, inert=inert)

    def _structure(self, params, x, key=None):
        """(structured calls, inert leaves) for inputs of these shapes, looked up once per call."""
        key = "structure", key or _shapes_key((params, x))
        if key not in self._discovered:
            self._discovered[key] = self._discover(params, x), self._inert(params, x)
        return self._discovered[key]

    def _subset_groups(self, params, points, mask, *, impl, per_group, m, full, calls, inert):
        """Kernels of consecutive m-point subsets, `per_group` subsets per step of a lax.map."""
        size = per_group * m

        def grouped(a):
            return a.reshape((-1, size) + a.shape[1:])

        def split(a):  # (per_group·m, …) -> (per_group, m, …)
            return a.reshape((per_group, m) + a.shape[1:])

        def group(args):
            xg, mg = args
            if impl == "structured":
                factors = jax.vmap(lambda xi, mi: structured.point_factors(
                    self.apply_fn, params, xi, mi, calls, m, inert))(xg, mg)
                factors = jax.tree_util.tree_map(split, factors)
                return jax.vmap(lambda f: structured.contract(f, f, full))(factors)
            jac = self._block_jacobian(params, xg, mg, 0, block=size, full=full)
            jac = [j.reshape((per_group, -1, j.shape[-1])) for j in jac]
            return jax.vmap(lambda ja: _contract(ja, ja))(jac)

        out = jax.lax.map(group, (jax.tree_util.tree_map(grouped, points), grouped(mask)))
        return out.reshape((-1,) + out.shape[2:])

    def resolved_implementation(self, params, x, output_mask=None) -> str:
        """The implementation a call with these inputs uses ("auto" resolved)."""
        m, out_shape, _, act = self._prepare(params, x, output_mask)
        return self._plan(params, m, out_shape, act, x)[0]

    def structured_leaves(self, params, x, output_mask=None) -> list[str]:
        """Paths ('params/Dense_0/kernel') of the parameter leaves whose derivative a call with
        these inputs takes from the structured Dense rule instead of a per-point Jacobian.

        Empty unless the call resolves to the structured implementation. A leaf is listed only
        if every use of it goes through plain nn.Dense calls (see structured.py); the others,
        e.g. a kernel tied to another layer, fall back to the exact per-point Jacobian.
        """
        if self.resolved_implementation(params, x, output_mask) != "structured":
            return []
        paths = [_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        return [paths[i] for i in structured.claimed_leaves(self._discover(params, x))]

    def diagonal(self, params, x, output_mask=None) -> jax.Array:
        """Θ_ii for every point: Σ_o ‖∂f_o(x_i)/∂θ‖², from per-point gradients, no kernel."""
        m, out_shape, mask, act = self._prepare(params, x, output_mask)
        block = self._jacobian_block(params, m, out_shape, act)
        x = jax.tree_util.tree_map(jnp.asarray, x)
        parts = [
            self._sq_norms(self._jac(params, x, mask, a, block=block))
            for a in range(0, m, block)
        ]
        return jnp.concatenate(parts)[:m] if len(parts) > 1 else parts[0]

    def trace(self, params, x, output_mask=None) -> jax.Array:
        """Tr Θ (eq. 10) without forming the kernel."""
        return jnp.sum(self.diagonal(params, x, output_mask))

    # -- planning ---------------------------------------------------------------------------

    def _prepare(self, params, x, output_mask, key=None):
        """(m, output shape per point, full-shape output mask, activation bytes per point)."""
        m = num_points(x)
        key = key or _shapes_key((params, x))
        if key not in self._traced:  # tracing costs about a millisecond: the Pong kernels' own time
            try:
                traced = self._apply_jit.trace(params, x)
            except (TypeError, ValueError) as err:
                raise ValueError(f"apply_fn(params, x) failed on these inputs: {err}") from err
            self._traced[key] = traced.out_info, _intermediate_bytes(traced.jaxpr.jaxpr) // m
        out, act = self._traced[key]
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError("apply_fn must return a single array (points first), not a pytree")
        if out.ndim == 0 or out.shape[0] != m:
            raise ValueError(
                f"apply_fn returned shape {out.shape}, but x holds {m} points: the output must "
                "lead with the point axis (one row per point of x)"
            )
        out_shape = out.shape[1:]
        # Built on the host: eager device ops would each compile once per shape.
        if output_mask is None:
            ones = ("ones", key)
            if ones not in self._traced:  # the same (immutable) device array for every call
                self._traced[ones] = jnp.asarray(np.ones((m,) + out_shape, out.dtype))
            return m, out_shape, self._traced[ones], act
        else:
            mask = np.asarray(output_mask)
            if mask.shape != out.shape[: mask.ndim] or mask.ndim == 0:
                raise ValueError(
                    f"output_mask has shape {mask.shape}; it must equal the output shape "
                    f"{out.shape} or a leading part of it (e.g. (points, positions))"
                )
            mask = _broadcast_mask(mask, out.shape, out.dtype)
        return m, out_shape, mask, act  # on the host: the compiled calls take it over

    def _per_point_bytes(self, params, out_shape) -> int:
        leaves = jax.tree_util.tree_leaves(params)
        itemsize = max(np.dtype(leaf.dtype).itemsize for leaf in leaves)
        return math.prod(out_shape) * _num_params(params) * itemsize

    def _jacobian_point_bytes(self, params, out_shape, act) -> int:
        """One point's Jacobian (held ~3 times) plus, per output, the activation cotangents of
        the backward pass that produces it."""
        n_out = math.prod(out_shape)
        return _JACOBIAN_COPIES * self._per_point_bytes(params, out_shape) + n_out * act

    def _jacobian_block(self, params, m, out_shape, act=0) -> int:
        if self.block_size is not None:
            return min(self.block_size, m)
        per_point = self._jacobian_point_bytes(params, out_shape, act)
        largest = int(max(1, min(m, self.memory_budget // max(per_point, 1))))
        return _balanced(m, largest)

    def _structured_point_bytes(self, params, x, out_shape, act, m: int) -> int:
        """One point's structured factors: Jacobians of the leaves no rule claims and some tangent
        reaches (held ~3 times), what each structured layer keeps, and per output the backward
        pass's activation cotangents."""
        calls = self._discover(params, x)
        skipped = set(structured.claimed_leaves(calls)) | set(self._inert(params, x))
        leaves = jax.tree_util.tree_leaves(params)
        rest = sum(int(np.size(leaf)) for i, leaf in enumerate(leaves) if i not in skipped)
        itemsize = max(np.dtype(leaf.dtype).itemsize for leaf in leaves)
        n_out = math.prod(out_shape)
        # A structured layer keeps its inputs and output cotangents or, where that is cheaper to
        # contract (structured._pairwise_cheaper, judged at the full m points), its per-point gradient.
        layers = 0
        for _, k, _, shape, kind, static in calls:
            d_out = max(structured._out_features(kind, static, shape), 1)
            positions = math.prod(shape) // d_out
            kernel = int(np.size(leaves[k]))
            d_in = kernel // d_out
            if structured._pairwise_cheaper(positions, d_in, d_out, n_out, m):
                layers += positions * (d_in + n_out * d_out)
            else:
                layers += n_out * kernel
        return (_JACOBIAN_COPIES * n_out * rest + layers) * itemsize + n_out * act

    def _plan(self, params, m, out_shape, act=0, x=None, mask=None, full=False, key=None):
        """(implementation, block, chunk): ``chunk`` is the ntvp chunk, or for the factor methods
        KEEP when every block's factors are held at once (else two blocks at a time). ``key``:
        the shapes key of (params, x), where the caller has it."""
        key = key or _shapes_key((params, x))
        impl, block, chunk = self._estimated_plan(params, m, out_shape, act, x, key)
        if impl == "ntvp":
            return impl, block, chunk
        if block < m and mask is not None and self.block_size is None:
            # The estimate is an upper bound (every intermediate of the forward pass counted once
            # per output): where it splits the points, ask XLA what the blocks really take.
            measured = impl, m, full, key
            if measured not in self._plans:
                self._plans[measured] = self._measured_plan(impl, params, x, mask, m, full)
            return (impl,) + self._plans[measured]
        # Two blocks' factors at a time is what the estimate bounds; one block holds everything.
        return impl, block, KEEP if block >= m else None

    def _step_memory(self, impl, params, x, mask, block, full):
        """XLA's memory analysis of one block's factor function and of the contraction of two
        such blocks, as compiled for this block (the compilations are cached for the calls)."""
        jac, contract = self._factor_fns(impl, params, x, mask, block, full)
        factors = jac.func.lower(*jac.args, 0, **jac.keywords)
        if impl == "jacobian":
            tile = contract.lower(factors.out_info, factors.out_info)
        else:
            tile = contract.func.lower(factors.out_info, factors.out_info, **contract.keywords)
        return factors.compile().memory_analysis(), tile.compile().memory_analysis()

    def _measured_plan(self, impl, params, x, mask, m, full) -> tuple[int, Any]:
        """(block, KEEP or None): the largest block, and whether every block's factors can be held
        at once, that XLA's memory analysis fits in the budget. Starts at all m points and
        shrinks; each try compiles the block's factor and contraction functions."""
        budget = self.memory_budget
        block, k = m, 1
        while True:
            fac, con = self._step_memory(impl, params, x, mask, block, full)
            out = fac.output_size_in_bytes
            # Live at once: the held factors, plus the temporaries of the step running (a factor
            # call, or a contraction with its output tile).
            step = max(fac.temp_size_in_bytes, con.temp_size_in_bytes + con.output_size_in_bytes)
            if k * out + step <= budget:
                return block, KEEP
            if block == 1:  # over the budget even so: the estimate has chosen (and warned)
                return 1, None
            per_point = max(out, 1) / block
            step_per_point = step / block
            if m * per_point + step_per_point <= budget:  # every factor fits: shrink the steps
                smaller = (budget - m * per_point) / step_per_point
            elif 2 * out + step <= budget:  # two blocks at a time fit at this block
                return block, None
            else:
                smaller = budget / (2 * per_point + step_per_point)
            # Memory per point is not constant across blocks (structured layers switch between
            # Gram and gradient factors with the block), so at most double the number of blocks.
            k = min(max(k + 1, -(-m // max(int(smaller), 1))), 2 * k, m)
            block = min(-(-m // k), block - 1)  # strictly smaller: the loop ends at block 1
            k = -(-m // block)

    def _estimated_plan(self, params, m, out_shape, act=0, x=None, key=None):
        key = "estimate", m, tuple(out_shape), act, key or _shapes_key((params, x))
        if key not in self._plans:  # it depends on shapes only, and costs a Pong kernel's time
            self._plans[key] = self._estimate(params, m, out_shape, act, x)
        return self._plans[key]

    def _estimate(self, params, m, out_shape, act=0, x=None):
        impl = self.implementation
        per_point = self._jacobian_point_bytes(params, out_shape, act)
        if impl in ("auto", "structured") and x is not None:
            # Planned from what the structured path holds, not from full per-point Jacobians:
            # a model whose Jacobian would not fit can still be structured (a tagger's outputs).
            per_point = self._structured_point_bytes(params, x, out_shape, act, m)
        if impl == "auto":  # structured = the Jacobian method wherever it finds no Dense layer
            impl = "structured" if per_point <= self.memory_budget else "ntvp"
        if impl == "structured":
            if self.block_size is not None:
                return impl, min(self.block_size, m), None
            largest = int(max(1, min(m, self.memory_budget // max(per_point, 1))))
            return impl, _balanced(m, largest), None
        if impl == "jacobian":
            if per_point > self.memory_budget and self.block_size is None:
                warnings.warn(
                    "one point's Jacobian exceeds the memory budget; computing one point at a "
                    "time anyway (implementation='ntvp' needs far less memory)",
                    stacklevel=3,
                )
            return impl, self._jacobian_block(params, m, out_shape, act), None
        # A tile holds itself (twice, while it is summed over outputs) and the activations of
        # both blocks (VJP residuals, JVP primals); each in-flight cotangent adds a
        # parameter-sized tangent (~3 times) and the activation cotangents (VJP) and
        # tangents (JVP) of every point of the block.
        n_out = math.prod(out_shape)
        tangent = _JACOBIAN_COPIES * self._per_point_bytes(params, ())
        itemsize = self._per_point_bytes(params, ()) // max(_num_params(params), 1)

        def fixed(b):
            return 2 * b * act + 2 * (b * n_out) ** 2 * itemsize

        if self.block_size is not None:
            block = min(self.block_size, m)
        else:
            block = m
            while block > 1 and fixed(block) + tangent + 2 * block * act > self.memory_budget:
                block -= 1
            block = _balanced(m, block)
        one = tangent + 2 * block * act
        free = self.memory_budget - fixed(block)
        chunk = int(max(1, min(block * n_out, free // max(one, 1))))
        return impl, block, chunk

    # -- kernels (traced) -------------------------------------------------------------------

    def _masked_apply(self, params, x, mask):
        return self.apply_fn(params, x) * mask

    def _block_jacobian(self, params, x, mask, start, block: int, full: bool = False):
        """Per-point Jacobians of points start:start+block, one flat matrix per parameter leaf:
        rows = points (× outputs)."""
        x, mask = _block(x, start, block), _block(mask, start, block)

        def one_point(p, xi, mi):
            xb = jax.tree_util.tree_map(lambda a: a[None], xi)
            return self._masked_apply(p, xb, mi[None])[0]

        jac = jax.vmap(jax.jacrev(one_point), in_axes=(None, 0, 0))(params, x, mask)
        n = mask.shape[0]
        rows = n * math.prod(mask.shape[1:]) if full else n
        return [leaf.reshape(rows, -1) for leaf in jax.tree_util.tree_leaves(jac)]

    def _inert(self, params, x) -> tuple:
        """Leaves no tangent of which reaches the output (structured.inert_leaves), once per shapes."""
        return self._once_per_shapes(structured.inert_leaves, params, x)

    def _discover(self, params, x):
        """The provably exact Dense calls of apply_fn (structured.discover), once per shapes."""
        return self._once_per_shapes(structured.discover, params, x)

    def _once_per_shapes(self, analysis, params, x):
        """analysis(apply_fn, params, one point), cached by what it depends on: tree structures,
        shapes (x without its point axis) and dtypes."""
        key = analysis.__name__, _shapes_key((params, x), points=False)
        if key not in self._discovered:
            self._discovered[key] = analysis(self.apply_fn, params, jax.tree_util.tree_map(lambda a: a[:1], x))
        return self._discovered[key]

    def _structured_block(self, params, x, mask, start, block: int, full: bool = False,
                          calls=(), inert=()):
        """Per-point structured factors (see structured.py) of points start:start+block."""
        x, mask = _block(x, start, block), _block(mask, start, block)
        return jax.vmap(
            lambda xi, mi: structured.point_factors(self.apply_fn, params, xi, mi, calls, block, inert)
        )(x, mask)

    def _jacobian_tile(self, params, x, mask, full: bool = False):
        jac = self._block_jacobian(params, x, mask, 0, block=num_points(x), full=full)
        return _contract(jac, jac)

    def _structured_one_block(self, params, x, mask, full: bool = False, calls=(), inert=()):
        factors = self._structured_block(params, x, mask, 0, num_points(x), full, calls, inert)
        return structured.contract(factors, factors, full)

    def _ntvp_tile(self, params, x, mask, start_a, start_b, block: int, full: bool = False,
                   chunk: int = 1):
        """Θ[a, b] from NTK–vector products: J_b (J_aᵀ e) for every output basis vector e."""
        xa, ma = _block(x, start_a, block), _block(mask, start_a, block)
        xb, mb = _block(x, start_b, block), _block(mask, start_b, block)
        out_a, vjp_a = jax.vjp(lambda p: self._masked_apply(p, xa, ma), params)
        n_out = out_a.size

        def column(e):
            # The basis vector is built in the loop: an (n_out × n_out) identity would not fit.
            ct = jax.nn.one_hot(e, n_out, dtype=out_a.dtype).reshape(out_a.shape)
            (tangent,) = vjp_a(ct)
            _, jvp = jax.jvp(lambda p: self._masked_apply(p, xb, mb), (params,), (tangent,))
            return jvp

        cols = jax.lax.map(column, jnp.arange(n_out), batch_size=chunk)  # (n_a·O, n_b, *out)
        na, nb = ma.shape[0], mb.shape[0]
        o = n_out // na
        tile = cols.reshape(na, o, nb, o)
        if full:
            return tile.reshape(na * o, nb * o)
        return jnp.einsum("iojo->ij", tile)


def _path_str(path) -> str:
    """A pytree key path as 'params/Dense_0/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes_key(trees, points: bool = True) -> tuple:
    """Tree structures, shapes and dtypes of ``trees`` = (params, x): what compiled code depends
    on. Without ``points`` the point axis of x's leaves is left out. (One flatten per tree: on the
    Pong kernels' millisecond calls this is host time.)"""
    key = []
    for i, tree in enumerate(trees):
        leaves, structure = jax.tree_util.tree_flatten(tree)
        key.append(structure)
        key.append(tuple((np.shape(a)[1:] if i and not points else np.shape(a),
                          a.dtype if hasattr(a, "dtype") else np.result_type(a)) for a in leaves))
    return tuple(key)


def _broadcast_mask(mask: np.ndarray, shape: tuple, dtype) -> np.ndarray:
    """A mask over a leading part of ``shape`` (e.g. (points, positions)) broadcast to all of it."""
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim)), shape).astype(dtype)


def _num_params(params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def _balanced(m: int, largest: int) -> int:
    """Equal blocks of at most `largest` points, so none is mostly padding (20 → 2 × 10)."""
    n_blocks = -(-m // largest)
    return -(-m // n_blocks)


def _contract(ja, jb):
    """Σ over parameter leaves of J_a J_bᵀ."""
    return functools.reduce(jnp.add, (structured.gram(a, b) for a, b in zip(ja, jb)))


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
