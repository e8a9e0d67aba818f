"""Structured derivatives for flax linear layers: their Jacobian is never formed.

For a layer y = a W + b applied at positions t of one point (nn.Dense; nn.DenseGeneral with
the contracted axes flattened; nn.Conv with a = the input patches, neural-tangents'
patches ⊗ I rule; nn.Embed with a = one_hot(ids)), ∂f_o/∂W = Σ_t a_t ⊗ δ_ot with δ the output cotangent, so its NTK
contribution is
    Θ_W(i, j) = Σ_o Σ_{t,s} (a_it · a_js)(δ_iot · δ_jos),   Θ_b(i, j) = Σ_o (Σ_t δ_iot)·(Σ_s δ_jos),
which costs activations and cotangents instead of a per-point copy of W (or, where that is
cheaper, the per-point gradient Σ_t a_t ⊗ δ_ot is formed from them directly). The other
parameters (norms, layers this cannot see) keep their per-point Jacobian.

A parameter leaf is *claimed* (structured) only when that is provably exact:
1. every candidate call is a plain `__call__` of one of those module types (exact type; no
   custom ``dot_general``/``conv_general_dilated``, no dtype casts, no feature groups or mask),
   made at the top level of ``apply_fn`` (not inside a vmap/scan/remat of its own), whose
   kernel and bias are, by identity, leaves of ``params``; and
2. the claimed leaves reach the output *only* through those calls. This is proved on the jaxpr:
   in a copy of ``apply_fn`` where the candidate calls run their own module on
   ``stop_gradient`` of their kernel and bias, the JVP with tangents on the candidate leaves is traced and dead code is
   eliminated; a leaf whose tangent input is still used has another path to the output (weight
   tying, a regulariser term, a read through ``module.variables``, a use inside a transform) and
   falls back to the per-point Jacobian, together with every call that uses it.
Calls are matched between traces by (module scope path, occurrence), and the factor function
checks at trace time that it saw exactly the claimed calls.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype as _flax_promote_dtype
from flax.linen.linear import _conv_dimension_numbers
from flax.linen.linear import canonicalize_padding as _canonicalize_padding
from jax._src.interpreters import partial_eval as pe

from ntk_tracking.models.conv import slice_patches, sliced_conv

_HIGHEST = jax.lax.Precision.HIGHEST


_RULE_TYPES = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Embed)


def _is_rule_call(context) -> bool:
    """A call of a module type with a structured rule (exact type: subclasses may differ)."""
    return type(context.module) in _RULE_TYPES and context.method_name == "__call__"


def _call_key(context, counter: dict) -> tuple:
    """(scope path, n): the n-th structured-type call of this module in one run of apply_fn."""
    scope = context.module.scope
    path = tuple(scope.path) if scope is not None else ()
    n = counter.get(path, 0)
    counter[path] = n + 1
    return path, n


def _one_dtype(mod, a, kernel, bias) -> bool:
    """Inputs, kernel and bias share one float dtype, and the module casts to no other."""
    if mod.promote_dtype is not _flax_promote_dtype:
        return False
    dtypes = {getattr(v, "dtype", None) for v in (a, kernel) + ((bias,) if mod.use_bias else ())}
    if len(dtypes) != 1 or None in dtypes:
        return False
    (dtype,) = dtypes
    if not jnp.issubdtype(dtype, jnp.floating):
        return False
    return mod.dtype is None or jnp.dtype(mod.dtype) == dtype


def _dense_rule(mod, a, kernel, bias):
    """nn.Dense computes exactly lax.dot_general(a, kernel) + bias: its rule ("dense", None)."""
    if not (mod.dot_general is None or mod.dot_general is jax.lax.dot_general):
        return None
    if mod.dot_general_cls is not None or not _one_dtype(mod, a, kernel, bias):
        return None
    if getattr(a, "ndim", 0) < 1 or kernel.ndim != 2:
        return None
    return "dense", None


def _conv_rule(mod, a, kernel, bias):
    """nn.Conv with one batch axis, zero padding, no groups, no mask, the default
    conv_general_dilated or `sliced_conv` (the same values): y = patches(a) · kernel + bias
    (neural-tangents' patches ⊗ I rule).
    Its rule: ("conv", (kernel size, strides, padding, input dilation, kernel dilation))."""
    if mod.conv_general_dilated not in (None, jax.lax.conv_general_dilated, sliced_conv):
        return None
    if mod.conv_general_dilated_cls is not None or mod.mask is not None:
        return None
    if mod.feature_group_count != 1 or not mod.shared_weights or not _one_dtype(mod, a, kernel, bias):
        return None
    size = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else tuple(mod.kernel_size)
    if getattr(a, "ndim", 0) != len(size) + 2 or kernel.shape[:-2] != size:
        return None

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * len(size) if isinstance(v, int) else tuple(v)

    padding = _canonicalize_padding(mod.padding, len(size))
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID", "SAME_LOWER"):
            return None  # CIRCULAR, REFLECT, CAUSAL pad the input first: not handled
    else:
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
    return "conv", (size, broadcast(mod.strides), padding, broadcast(mod.input_dilation),
                    broadcast(mod.kernel_dilation))


def _dense_general_rule(mod, a, kernel, bias):
    """nn.DenseGeneral without batch_dims: y = a (contracted axes moved last, flattened) ·
    kernel (flattened to (in, out)) + bias. Its rule: ("dense_general", (axes, n features))."""
    if not (mod.dot_general is None or mod.dot_general is jax.lax.dot_general):
        return None
    if mod.dot_general_cls is not None or not _one_dtype(mod, a, kernel, bias):
        return None
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    if as_tuple(mod.batch_dims):
        return None
    ndim = getattr(a, "ndim", 0)
    axes = tuple(int(ax) % ndim for ax in as_tuple(mod.axis)) if ndim else ()
    n_features = len(as_tuple(mod.features))
    if not axes or len(set(axes)) != len(axes) or kernel.ndim != len(axes) + n_features:
        return None
    return "dense_general", (axes, n_features)


def _embed_rule(mod, ids, table, _):
    """nn.Embed.__call__: y = one_hot(ids) · table (jnp.take: negative ids count from the end,
    ids out of range give NaN rows whose derivative is zero, as a zero one-hot row)."""
    if mod.promote_dtype is not _flax_promote_dtype or mod.num_embeddings < 2:
        return None
    if not jnp.issubdtype(getattr(ids, "dtype", jnp.float32), jnp.integer):
        return None
    if not jnp.issubdtype(table.dtype, jnp.floating) or table.ndim != 2:
        return None
    if mod.dtype is not None and jnp.dtype(mod.dtype) != table.dtype:
        return None
    return "embed", (int(table.shape[0]), str(table.dtype))


_RULES = {nn.Dense: _dense_rule, nn.Conv: _conv_rule, nn.DenseGeneral: _dense_general_rule,
          nn.Embed: _embed_rule}


def _rule(mod, a, kernel, bias):
    return _RULES[type(mod)](mod, a, kernel, bias)


def _out_features(kind, static, shape) -> int:
    """The size of the rule's output feature axis (the kernel's flattened output side)."""
    n = static[1] if kind == "dense_general" else 1
    return math.prod(shape[len(shape) - n:])


def _patches(a, kind, static):
    """The rule's input rows: (positions, features), with y = rows · kernel (flattened)."""
    if kind == "conv":
        size, strides, padding, lhs_dilation, rhs_dilation = static
        # Strided slices where there is no dilation: the same rows, in another feature order (which
        # a Gram of rows does not see), without XLA:CPU's slow grouped convolution.
        plain = all(d == 1 for d in lhs_dilation + rhs_dilation) and a.ndim == len(size) + 2
        rows = slice_patches(a, size, strides, padding) if plain else None
        if rows is not None:
            return rows.reshape(-1, rows.shape[-1])
        a = jax.lax.conv_general_dilated_patches(
            a, size, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=_conv_dimension_numbers(a.shape), precision=_HIGHEST)
    elif kind == "embed":
        n, dtype = static
        a = jnp.where(a < 0, a + n, a)  # out of range: a zero row (jax.nn.one_hot)
        return jax.nn.one_hot(a.reshape(-1), n, dtype=dtype)
    elif kind == "dense_general":
        axes = static[0]
        a = jnp.moveaxis(a, axes, tuple(range(a.ndim - len(axes), a.ndim)))
        return a.reshape(-1, math.prod(a.shape[a.ndim - len(axes):]))
    return a.reshape(-1, a.shape[-1])


def _param_names(mod):
    """(kernel name, bias name or None) of a rule's module."""
    if type(mod) is nn.Embed:
        return "embedding", None
    return "kernel", ("bias" if mod.use_bias else None)


def _params_of(mod):
    kernel_name, bias_name = _param_names(mod)
    kernel = mod.get_variable("params", kernel_name)
    bias = mod.get_variable("params", bias_name) if bias_name else None
    return kernel, bias


def _candidates(apply_fn, params, x1) -> dict:
    """Calls that pass the local checks: key -> (kernel leaf, bias leaf or -1, out shape, kind,
    static settings)."""
    found: dict = {}

    def traced(p, x):
        ids = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(p))}
        # Calls inside a transformation of apply_fn's own (vmap, scan, remat) see other tracers:
        # their inputs cannot leave that transformation, so those calls fall back.
        top = getattr(jax.tree_util.tree_leaves(x)[0], "_trace", None)
        counter: dict = {}

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if _is_rule_call(context):
                key = _call_key(context, counter)
                mod = context.module
                kernel, bias = _params_of(mod)
                k = ids.get(id(kernel))
                b = ids.get(id(bias)) if _param_names(mod)[1] else -1
                if (k is not None and b is not None and len(args) == 1 and not kwargs
                        and top is not None and getattr(args[0], "_trace", None) is top):
                    rule = _rule(mod, args[0], kernel, bias)
                    if rule is not None:
                        found[key] = (k, b, tuple(y.shape)) + rule
            return y

        with nn.intercept_methods(interceptor):
            return apply_fn(p, x)

    jax.eval_shape(traced, params, x1)
    # A leaf claimed in two roles (kernel of one call, bias of another; one kernel with two
    # different biases; one kernel under two rules or settings) would be counted twice in the
    # factors: such leaves fall back.
    roles: dict = {}
    for k, b, _, kind, static in found.values():
        for i, role in ((k, ("k", k, b, kind, static)), (b, ("b", k, b, kind, static))):
            if i >= 0:
                roles.setdefault(i, set()).add(role)
    mixed = {i for i, r in roles.items() if len(r) > 1}
    return {key: c for key, c in found.items() if c[0] not in mixed and c[1] not in mixed}


def _leaves_with_other_paths(apply_fn, params, x1, claims: dict) -> set:
    """Candidate leaves whose tangent reaches the output other than through the claimed calls.

    The claimed calls are re-run as an unbound clone of their module, given stop_gradient of
    their kernel and bias: the module's own code, with those leaves cut out. What is left of
    the candidates' tangents after dead-code elimination is another path to the output.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    cand = sorted({i for k, b, *_ in claims.values() for i in (k, b) if i >= 0})
    if not cand:
        return set()
    mismatched: set = set()

    def g(cand_leaves):
        full = list(leaves)
        for i, leaf in zip(cand, cand_leaves):
            full[i] = leaf
        counter: dict = {}
        inside = [False]

        def interceptor(next_fun, args, kwargs, context):
            if inside[0] or not _is_rule_call(context):
                return next_fun(*args, **kwargs)
            key = _call_key(context, counter)
            if key not in claims:
                return next_fun(*args, **kwargs)
            k, b = claims[key][:2]
            mod = context.module
            kernel, bias = _params_of(mod)
            if kernel is not full[k] or (b >= 0 and bias is not full[b]):
                mismatched.update({k, b} - {-1})  # not the leaf seen before: refuse
                return next_fun(*args, **kwargs)
            kernel_name, bias_name = _param_names(mod)
            cut = {kernel_name: jax.lax.stop_gradient(full[k])}
            if b >= 0:
                cut[bias_name] = jax.lax.stop_gradient(full[b])
            inside[0] = True
            try:
                return mod.clone(parent=None).apply({"params": cut}, *args)
            finally:
                inside[0] = False

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree_util.tree_unflatten(treedef, full), x1)

    primals = [leaves[i] for i in cand]
    closed = jax.make_jaxpr(lambda c, t: jax.jvp(g, (c,), (t,))[1])(primals, primals)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    n = len(cand)
    return {i for i, u in zip(cand, used[n:2 * n]) if u} | mismatched


def inert_leaves(apply_fn, params, x1) -> tuple[int, ...]:
    """Indices of the parameter leaves whose tangent never reaches the output (dead-code
    elimination of the JVP): their Jacobian is exactly zero, so the kernel needs none. E.g. the
    decoder's weights when the NTK is of the encoder alone, or statistics under stop_gradient."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        return ()

    def f(ls):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, ls), x1)

    closed = jax.make_jaxpr(lambda p, t: jax.jvp(f, (p,), (t,))[1])(leaves, leaves)
    n_out = len(closed.jaxpr.outvars)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * n_out)
    n = len(leaves)
    return tuple(i for i, u in enumerate(used[n:2 * n]) if not u)


def discover(apply_fn, params, x1) -> tuple:
    """The provably structured calls of apply_fn, as a hashable tuple of (call key, kernel leaf
    index, bias leaf index or -1, output shape for one point, rule kind, rule settings)."""
    claims = _candidates(apply_fn, params, x1)
    while claims:  # dropping a call makes its leaves live again: repeat until none is refused
        refused = _leaves_with_other_paths(apply_fn, params, x1, claims)
        if not refused:
            break
        claims = {key: c for key, c in claims.items() if c[0] not in refused and c[1] not in refused}
    return tuple((key,) + c for key, c in claims.items())


def claimed_leaves(calls) -> list[int]:
    """Indices (in tree_leaves order) of the parameter leaves the structured calls cover."""
    return sorted({i for _, k, b, *_ in calls for i in (k, b) if i >= 0})


def _pairwise_cheaper(positions: int, d_in: int, d_out: int, n_out: int, block: int) -> bool:
    """Contract (positions × positions) Gram matrices of inputs and cotangents per pair of points,
    or form the per-point gradient Σ_t a_t ⊗ δ_ot (the Jacobian) and contract that: the cheaper in
    multiply-adds. A Dense layer on one position: pairwise; an early, wide-image convolution:
    the gradient."""
    pairwise = positions ** 2 * (d_in + n_out * d_out)
    gradient = n_out * d_in * d_out * (1 + positions / max(block, 1))
    return pairwise <= gradient


def point_factors(apply_fn, params, xi, mi, calls, block: int = 1, inert: tuple = ()):
    """One point's factors: flat Jacobians of the other leaves (and of structured layers whose
    gradient is cheaper than their Gram matrices), and (A, D, D_bias) per structured kernel.
    Leaves in `inert` (see inert_leaves) are held fixed and contribute nothing."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dense = claimed_leaves(calls)
    rest = [i for i in range(len(leaves)) if i not in dense and i not in inert]
    if not rest and not calls:  # nothing reaches the output: one (zero) Jacobian gives the zero kernel
        rest, inert = [0], tuple(i for i in inert if i != 0)
    index = {c[0]: j for j, c in enumerate(calls)}

    def f(rest_leaves, eps):
        full = list(leaves)
        for i in dense:  # held fixed: their derivative comes through eps (exclusive use proved)
            full[i] = jax.lax.stop_gradient(leaves[i])
        for i in inert:  # no tangent reaches the output (proved): nothing to differentiate
            full[i] = jax.lax.stop_gradient(leaves[i])
        for i, leaf in zip(rest, rest_leaves):
            full[i] = leaf
        acts, counter = [None] * len(calls), {}

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if _is_rule_call(context):
                j = index.get(_call_key(context, counter))
                if j is not None:
                    _, k, b, _, kind, static = calls[j]
                    kernel, bias = _params_of(context.module)
                    if acts[j] is not None or kernel is not full[k] or (b >= 0 and bias is not full[b]):
                        raise RuntimeError("structured NTK: a call does not match its discovery; "
                                           "use implementation='jacobian'")
                    acts[j] = _patches(jax.lax.stop_gradient(args[0]), kind, static)
                    return y + eps[j]
            return y

        xb = jax.tree_util.tree_map(lambda a: a[None], xi)
        with nn.intercept_methods(interceptor):
            out = apply_fn(jax.tree_util.tree_unflatten(treedef, full), xb)[0] * mi
        if any(a is None for a in acts):  # a claimed call was not made: its leaf would be lost
            raise RuntimeError("structured NTK: a claimed call was not seen when computing "
                               "the factors; use implementation='jacobian'")
        return out, acts

    eps = [jnp.zeros(c[3], leaves[c[1]].dtype) for c in calls]
    (j_rest, deltas), acts = jax.jacrev(f, argnums=(0, 1), has_aux=True)([leaves[i] for i in rest], eps)
    n_out = math.prod(mi.shape)
    rest_flat = [j.reshape(n_out, -1) for j in j_rest]
    groups: dict = {}
    for (_, k, b, shape, kind, static), a, d in zip(calls, acts, deltas):
        d = d.reshape(n_out, -1, _out_features(kind, static, shape))  # (outputs, positions, d_out)
        # Positions first: a block's δ is then one (points·positions, outputs·d_out) matrix, and
        # its Gram with another block's is a single plain matrix product (see contract).
        groups.setdefault((k, b), []).append((a, jnp.moveaxis(d, 1, 0)))  # a: (positions, d_in)
    # Calls sharing a kernel concatenate along positions: their cross terms are then included.
    factors = []
    for (k, b), g in sorted(groups.items()):
        a = jnp.concatenate([a for a, _ in g])
        d = jnp.concatenate([d for _, d in g])  # (positions, outputs, d_out)
        # The bias gradient is Σ over positions of δ; a layer without bias gets an empty factor.
        d_bias = d.sum(0) if b >= 0 else jnp.zeros((n_out, 0), d.dtype)
        if _pairwise_cheaper(a.shape[0], a.shape[1], d.shape[2], n_out, block):
            factors.append((a, d, d_bias))
        else:
            grad = jnp.einsum("tk,tol->okl", a, d, precision=_HIGHEST)
            rest_flat += [grad.reshape(n_out, -1)] + ([d_bias] if b >= 0 else [])
    return rest_flat, factors


def _sum_positions(p, na: int, t: int, nb: int, s: int):
    """(na·t, nb·s) -> (na, nb): the sum over each pair of points' positions, as two products with
    0/1 indicator matrices. Fused after the Gram products, XLA:CPU's reduce over the inner axes
    of (na, t, nb, s) took longer than the products themselves (the GCN's 5-point tile: 23 ms
    against 14 ms for its two Grams; the indicator products: 1 ms)."""
    if t == s == 1:
        return p
    rows = jnp.repeat(jnp.eye(na, dtype=p.dtype), t, axis=0)  # (na·t, na)
    cols = jnp.repeat(jnp.eye(nb, dtype=p.dtype), s, axis=0)  # (nb·s, nb)
    return jnp.matmul(jnp.matmul(rows.T, p, precision=_HIGHEST), cols, precision=_HIGHEST)


# a bᵀ of two wide (rows, N) matrices (per-point Jacobians, points first) is computed over column
# chunks of at least _GRAM_COLUMNS columns, at most _GRAM_CHUNKS of them (more only add compile
# time). Whole, XLA:CPU ran it several times slower; chunks of 20 rows × a few thousand columns
# stay in cache. Its other way, the Jacobians laid out points last and their (N, rows) product,
# pays for transposing them: ResNet18 ×¼'s kernel at m = 20 took 0.85–0.92 × the time of that
# way, the other paper networks 0.89–1.04 × (docs/benchmarks.md, "Gram products in column chunks").
_GRAM_COLUMNS = 8192
_GRAM_CHUNKS = 64


def gram(a, b):
    """a bᵀ for (rows, N) matrices a and b, in column chunks (see _GRAM_COLUMNS)."""
    n = a.shape[1]
    width = max(_GRAM_COLUMNS, -(-n // _GRAM_CHUNKS))
    parts = [jnp.matmul(a[:, j:j + width], b[:, j:j + width].T, precision=_HIGHEST)
             for j in range(0, max(n, 1), width)]  # N = 0 (an empty leaf): one product, of zeros
    return functools.reduce(jnp.add, parts)


def contract(fa, fb, full: bool):
    """Θ[a, b] from two blocks' factors (leading axis = points).

    A structured layer's factors per point are A (positions, d_in), δ (positions, outputs, d_out)
    and δ summed over positions (outputs, d_out). Summed over outputs, its term is
    Σ_{t,s} (A_a A_bᵀ)_ts (δ_a δ_bᵀ)_ts: two plain matrix products over the blocks' rows
    (point, position), an elementwise product, and a sum over each point's positions.
    """
    rest_a, dense_a = fa
    rest_b, dense_b = fb
    na, o = rest_a[0].shape[:2] if rest_a else dense_a[0][2].shape[:2]
    nb = (rest_b[0] if rest_b else dense_b[0][2]).shape[0]
    rows_a, rows_b = (na * o, nb * o) if full else (na, nb)
    k = jnp.zeros((rows_a, rows_b), (rest_a[0] if rest_a else dense_a[0][0]).dtype)
    for ja, jb in zip(rest_a, rest_b):
        k += gram(ja.reshape(rows_a, -1), jb.reshape(rows_b, -1))
    for (aa, da, ba), (ab, db, bb) in zip(dense_a, dense_b):
        if full:
            acts = jnp.einsum("itk,jsk->ijts", aa, ab, precision=_HIGHEST)
            cot = jnp.einsum("itol,jspl->iojpts", da, db, precision=_HIGHEST)
            tile = jnp.einsum("ijts,iojpts->iojp", acts, cot, precision=_HIGHEST)
            tile += jnp.einsum("iol,jpl->iojp", ba, bb, precision=_HIGHEST)
            k += tile.reshape(na * o, nb * o)
        else:
            t, s = aa.shape[1], ab.shape[1]
            acts = jnp.matmul(aa.reshape(na * t, -1), ab.reshape(nb * s, -1).T, precision=_HIGHEST)
            cot = jnp.matmul(da.reshape(na * t, -1), db.reshape(nb * s, -1).T, precision=_HIGHEST)
            k += _sum_positions(acts * cot, na, t, nb, s)
            k += jnp.matmul(ba.reshape(na, -1), bb.reshape(nb, -1).T, precision=_HIGHEST)
    return k
