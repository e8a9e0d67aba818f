"""Structured derivatives for flax `nn.Dense` layers: their Jacobian is never formed.

For a Dense layer y = a W + b applied at positions t of one point, ∂f_o/∂W = Σ_t a_t ⊗ δ_ot
with δ the output cotangent, so its NTK contribution is
    Θ_W(i, j) = Σ_o Σ_{t,s} (a_it · a_js)(δ_iot · δ_jos),   Θ_b(i, j) = Σ_o (Σ_t δ_iot)·(Σ_s δ_jos),
which costs activations and cotangents instead of a per-point copy of W. The other parameters
(convolutions, embeddings, norms, Dense layers this cannot see) keep their per-point Jacobian.
Dense calls are found with `flax.linen.intercept_methods`; their parameters are matched to the
leaves of `params` by identity, so a call whose kernel is not a leaf of `params` falls back.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_dense_call(context) -> bool:
    return type(context.module) is nn.Dense and context.method_name == "__call__"


def discover(apply_fn, params, x1) -> tuple[tuple, tuple]:
    """Per Dense call, in call order: (kernel leaf index, bias leaf index or -1), or None if the
    call cannot be structured; and each call's output shape for one point."""
    calls, shapes = [], []

    def traced(p, x):
        ids = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(p))}
        # Calls inside a transformation of apply_fn's own (vmap, scan) see other tracers: their
        # inputs cannot leave that transformation, so those calls fall back to the Jacobian.
        top = getattr(jax.tree_util.tree_leaves(x)[0], "_trace", None)

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if _is_dense_call(context):
                mod = context.module
                k = ids.get(id(mod.get_variable("params", "kernel")))
                b = ids.get(id(mod.get_variable("params", "bias"))) if mod.use_bias else -1
                usable = (k is not None and b is not None and len(args) == 1 and not kwargs
                          and top is not None and getattr(args[0], "_trace", None) is top)
                calls.append((k, b) if usable else None)
                shapes.append(y.shape)
            return y

        with nn.intercept_methods(interceptor):
            return apply_fn(p, x)

    jax.eval_shape(traced, params, x1)
    return tuple(calls), tuple(shapes)


def point_factors(apply_fn, params, xi, mi, calls, shapes):
    """One point's factors: flat Jacobians of the other leaves, and (A, D) per Dense kernel."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dense = sorted({i for c in calls if c for i in c if i >= 0})
    rest = [i for i in range(len(leaves)) if i not in dense]

    def f(rest_leaves, eps):
        full = list(leaves)
        for i in dense:  # held fixed: their derivative comes through eps
            full[i] = jax.lax.stop_gradient(leaves[i])
        for i, leaf in zip(rest, rest_leaves):
            full[i] = leaf
        acts, count = [], [0]

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if _is_dense_call(context):
                c = count[0]
                count[0] += 1
                if calls[c] is not None:
                    acts.append(args[0])
                    return y + eps[c]
            return y

        xb = jax.tree_util.tree_map(lambda a: a[None], xi)
        with nn.intercept_methods(interceptor):
            out = apply_fn(jax.tree_util.tree_unflatten(treedef, full), xb)[0] * mi
        return out, acts

    eps = [jnp.zeros(s, leaves[0].dtype) if c is not None else jnp.zeros((), leaves[0].dtype)
           for c, s in zip(calls, shapes)]
    (j_rest, deltas), acts = jax.jacrev(f, argnums=(0, 1), has_aux=True)([leaves[i] for i in rest], eps)
    n_out = math.prod(mi.shape)
    rest_flat = [j.reshape(n_out, -1) for j in j_rest]
    groups: dict[int, list] = {}
    used = [c for c in calls if c is not None]
    for (k, b), a, d in zip(used, acts, [d for c, d in zip(calls, deltas) if c is not None]):
        a = a.reshape(-1, a.shape[-1])  # (positions, d_in)
        d = d.reshape(n_out, -1, d.shape[-1])  # (outputs, positions, d_out)
        groups.setdefault((k, b), []).append((a, d))
    # Calls sharing a kernel concatenate along positions: their cross terms are then included.
    factors = []
    for (k, b), g in sorted(groups.items()):
        d = jnp.concatenate([d for _, d in g], axis=1)
        # The bias gradient is Σ over positions of δ; a layer without bias gets an empty factor.
        d_bias = d.sum(1) if b >= 0 else jnp.zeros((n_out, 0), d.dtype)
        factors.append((jnp.concatenate([a for a, _ in g]), d, d_bias))
    return rest_flat, factors


def contract(fa, fb, full: bool):
    """Θ[a, b] from two blocks' factors (leading axis = points)."""
    rest_a, dense_a = fa
    rest_b, dense_b = fb
    na, o = rest_a[0].shape[:2] if rest_a else dense_a[0][1].shape[:2]
    nb = (rest_b[0] if rest_b else dense_b[0][1]).shape[0]
    shape = (na * o, nb * o) if full else (na, nb)
    k = jnp.zeros(shape, (rest_a[0] if rest_a else dense_a[0][0]).dtype)
    for ja, jb in zip(rest_a, rest_b):
        if full:
            k += jnp.matmul(ja.reshape(na * o, -1), jb.reshape(nb * o, -1).T, precision=_HIGHEST)
        else:
            k += jnp.matmul(ja.reshape(na, -1), jb.reshape(nb, -1).T, precision=_HIGHEST)
    for (aa, da, ba), (ab, db, bb) in zip(dense_a, dense_b):
        acts = jnp.einsum("itk,jsk->ijts", aa, ab, precision=_HIGHEST)
        if full:
            cot = jnp.einsum("iotl,jpsl->iojpts", da, db, precision=_HIGHEST)
            tile = jnp.einsum("ijts,iojpts->iojp", acts, cot, precision=_HIGHEST)
            tile += jnp.einsum("iol,jpl->iojp", ba, bb, precision=_HIGHEST)
            k += tile.reshape(na * o, nb * o)
        else:
            cot = jnp.einsum("iotl,josl->ijts", da, db, precision=_HIGHEST)
            k += jnp.sum(acts * cot, axis=(2, 3))
            k += jnp.einsum("iol,jol->ij", ba, bb, precision=_HIGHEST)
    return k
