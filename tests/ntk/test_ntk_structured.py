"""The structured NTK path is exact or not taken: weight tying, shared modules, transforms.

Every pattern is checked against a float64 brute-force Jacobian for every implementation, and
the leaves the structured path claims are pinned, so a fallback that silently stops recognising
Dense layers fails too.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking import NTK
from ntk_tracking.ntk import NTKMismatchError, check_against_ntvp, structured

M = 3
IMPLS = ("jacobian", "ntvp", "structured", "auto")


@pytest.fixture(autouse=True, scope="module")
def fast_compile_x64():
    """Tiny models (XLA optimisation passes cost more than they save) in float64."""
    saved = {k: jax.config.read(k) for k in ("jax_disable_most_optimizations", "jax_enable_x64")}
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_enable_x64", True)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
        else np.asarray(a), tree)


def _x(d=3, seed=0, shape=None):
    return np.random.default_rng(seed).normal(size=(M,) + (shape or (d,)))


def _flax(module, x, transform=None, **kwargs):
    """(apply_fn, float64 params) of a flax module; `transform(params)` inside apply_fn."""
    params = _f64(jax.jit(functools.partial(module.init, **kwargs))(jax.random.PRNGKey(0), x[:1])["params"])

    def apply_fn(p, x):
        return module.apply({"params": transform(p) if transform else p}, x, **kwargs)

    return apply_fn, params


def brute_force(apply_fn, params, x):
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jit(jax.jacrev(lambda v: apply_fn(unravel(v), x)))(flat)).reshape(M, -1, flat.size)
    return np.einsum("iok,jok->ij", jac, jac)


# PATTERNS: each returns (apply_fn, params, x, the leaves the structured path may claim).


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(5)(x))
        x = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(2)(x)


ALL_MLP = {f"Dense_{i}/{w}" for i in range(3) for w in ("kernel", "bias")}


class Tied(nn.Module):
    """The tied-weight autoencoder: the encoder's kernel decodes too."""

    @nn.compact
    def __call__(self, x):
        enc = nn.Dense(7)
        h = jnp.tanh(enc(x))
        out = h @ enc.variables["params"]["kernel"].T
        return nn.Dense(2)(jnp.tanh(out))


class ReadsVariables(nn.Module):
    """A child's kernel read back through self.variables after the call."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4)(x))
        w = self.variables["params"]["Dense_0"]["kernel"]
        return nn.Dense(2)(h) + jnp.sum(x @ w, axis=-1, keepdims=True)


class SharedTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3)
        h = jnp.tanh(d(x))
        h = jnp.tanh(d(h))
        return nn.Dense(2)(h)


class Regularised(nn.Module):
    """An extra output term (a weight penalty) that depends on one kernel."""

    sg: bool = False

    @nn.compact
    def __call__(self, x):
        d = nn.Dense(4)
        h = jnp.tanh(d(x))
        penalty = jnp.sum(d.variables["params"]["kernel"] ** 2)
        if self.sg:
            penalty = jax.lax.stop_gradient(penalty)
        return nn.Dense(2)(h) + 0.1 * penalty


class BiasTied(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3)
        h = jnp.tanh(d(x))
        return nn.Dense(3)(h) * d.variables["params"]["bias"]


class OwnKernelInput(nn.Module):
    """A Dense applied to something computed from its own kernel."""

    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3)
        h = jnp.tanh(d(x))
        h = d(h * d.variables["params"]["kernel"][0])
        return nn.Dense(2)(h)


class Cell(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(3)(c)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        h, _ = scan()(x, None)
        return nn.Dense(2)(h)


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        ens = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=1, axis_size=2)(3)
        h = jnp.tanh(ens(x)).reshape(x.shape[0], -1)
        return nn.Dense(2)(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(4)(x))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.remat(Block)()(x)
        return nn.Dense(2)(h)


def _double(x, y, dims, precision=None, preferred_element_type=None):
    return 2.0 * jax.lax.dot_general(x, y, dims, precision=precision,
                                     preferred_element_type=preferred_element_type)


class Overrides(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "dot_general":
            first = nn.Dense(4, dot_general=_double)
        elif self.kind == "dtype32":
            first = nn.Dense(4, dtype=jnp.float32)
        elif self.kind == "dtype64":
            first = nn.Dense(4, dtype=jnp.float64)
        elif self.kind == "subclass":
            first = Subclass(4)
        elif self.kind == "no_bias":
            first = nn.Dense(4, use_bias=False)
        elif self.kind == "dense_general":
            first = nn.DenseGeneral((2, 2), axis=-1)
        h = first(x).reshape(x.shape[0], -1)
        return nn.Dense(2)(jnp.tanh(h))


class Subclass(nn.Dense):
    pass


class KwargCall(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(inputs=x)
        return nn.Dense(2)(jnp.tanh(h))


class Sequence(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, L, d) -> (B, L, 2): positions share the kernel
        return nn.Dense(2)(jnp.tanh(nn.Dense(4)(x)))


def pattern_mlp():
    x = _x()
    return (*_flax(MLP(), x), x, ALL_MLP)


def pattern_tied():
    x = _x()
    return (*_flax(Tied(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_reads_variables():
    x = _x()
    return (*_flax(ReadsVariables(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_shared_twice():
    x = _x()
    return (*_flax(SharedTwice(), x), x, {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"})


def pattern_regulariser():
    x = _x()
    return (*_flax(Regularised(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_stop_gradient_use():
    """A use that carries no derivative does not stop the structured path."""
    x = _x()
    return (*_flax(Regularised(sg=True), x), x, {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"})


def pattern_bias_tied():
    x = _x()
    return (*_flax(BiasTied(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_own_kernel_input():
    x = _x()
    return (*_flax(OwnKernelInput(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_scan():
    x = _x()
    return (*_flax(Scanned(), x), x, {"Dense_0/kernel", "Dense_0/bias"})


def pattern_vmap():
    x = _x()
    return (*_flax(Vmapped(), x), x, {"Dense_0/kernel", "Dense_0/bias"})


def pattern_remat():
    x = _x()
    return (*_flax(Remat(), x), x, {"Dense_0/kernel", "Dense_0/bias"})


def pattern_user_vmap():
    x = _x()
    model = MLP()
    _, params = _flax(model, x)

    def apply_fn(p, x):
        return jax.vmap(lambda xi: model.apply({"params": p}, xi[None])[0])(x)

    return apply_fn, params, x, set()


def pattern_user_checkpoint():
    x = _x()
    model = MLP()
    _, params = _flax(model, x)

    def apply_fn(p, x):
        return jax.checkpoint(lambda p, x: model.apply({"params": p}, x))(p, x)

    return apply_fn, params, x, set()


def pattern_user_jit():
    x = _x()
    model = MLP()
    _, params = _flax(model, x)
    inner = jax.jit(model.apply)
    return (lambda p, x: inner({"params": p}, x)), params, x, set()


def pattern_params_doubled():
    x = _x()
    return (*_flax(MLP(), x, transform=lambda p: jax.tree_util.tree_map(lambda a: 2.0 * a, p)), x, set())


def _weight_norm(p):
    w = p["Dense_0"]["kernel"]
    return {**p, "Dense_0": {**p["Dense_0"], "kernel": w / jnp.linalg.norm(w, axis=0)}}


def pattern_weight_normalised():
    x = _x()
    # The normalised kernel is not a leaf; the bias of that call falls back with it.
    return (*_flax(MLP(), x, transform=_weight_norm), x, ALL_MLP - {"Dense_0/kernel", "Dense_0/bias"})


def pattern_identity_transform():
    """Leaves passed through unchanged keep their identity: still structured."""
    x = _x()
    return (*_flax(MLP(), x, transform=lambda p: jax.tree_util.tree_map(lambda a: a, p)), x, ALL_MLP)


def pattern_apply_twice():
    """One params tree applied to two inputs: every module is called twice, all structured."""
    x = _x()
    model = MLP()
    _, params = _flax(model, x)

    def apply_fn(p, x):
        return model.apply({"params": p}, x) - model.apply({"params": p}, 0.5 * x ** 2)

    return apply_fn, params, x, ALL_MLP


def pattern_closed_over():
    """A second network's Dense kernel closed over (not a leaf of params) enters the output."""
    x = _x()
    model = MLP()
    _, params = _flax(model, x)
    other = _f64(MLP().init(jax.random.PRNGKey(1), x[:1])["params"])

    def apply_fn(p, x):
        return model.apply({"params": p}, x) * model.apply({"params": other}, x)

    return apply_fn, params, x, ALL_MLP


def pattern_closed_over_kernel_into_params():
    """A params tree whose Dense_0 kernel is a closed-over constant, the rest leaves."""
    x = _x()
    model = MLP()
    _, params = _flax(model, x)
    fixed = np.asarray(params["Dense_0"]["kernel"]) * 0.5
    params = {k: v for k, v in params.items()}
    params["Dense_0"] = {"bias": params["Dense_0"]["bias"]}

    def apply_fn(p, x):
        q = {**p, "Dense_0": {"kernel": fixed, "bias": p["Dense_0"]["bias"]}}
        return model.apply({"params": q}, x)

    return apply_fn, params, x, ALL_MLP - {"Dense_0/kernel", "Dense_0/bias"}


def pattern_dot_general_override():
    x = _x()
    return (*_flax(Overrides("dot_general"), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_dtype_float32():
    x = _x()
    # The float32 layer casts; the next one gets float32 inputs for float64 weights: mixed
    # dtypes are refused (conservatively) too.
    return (*_flax(Overrides("dtype32"), x), x, set())


def pattern_dtype_same():
    x = _x()
    return (*_flax(Overrides("dtype64"), x), x, {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"})


def pattern_dense_subclass():
    x = _x()
    return (*_flax(Overrides("subclass"), x), x, {"Dense_0/kernel", "Dense_0/bias"})


def pattern_no_bias():
    x = _x()
    return (*_flax(Overrides("no_bias"), x), x, {"Dense_0/kernel", "Dense_1/kernel", "Dense_1/bias"})


def pattern_dense_general():
    x = _x()
    return (*_flax(Overrides("dense_general"), x), x,
            {"DenseGeneral_0/kernel", "DenseGeneral_0/bias", "Dense_0/kernel", "Dense_0/bias"})


class General(nn.Module):
    settings: dict
    tie: bool = False

    @nn.compact
    def __call__(self, x):
        layer = nn.DenseGeneral(**self.settings)
        h = jnp.tanh(layer(x))
        out = nn.Dense(2)(h.reshape(h.shape[0], -1))
        if self.tie:
            out = out + jnp.sum(layer.variables["params"]["bias"] ** 2)
        return out


GENERAL = {"DenseGeneral_0/kernel", "DenseGeneral_0/bias"}
GENERAL_CASES = {
    # name: (settings, input shape per point, structured?)
    "two_axes": (dict(features=(2, 3), axis=(-2, -1)), (4, 3), True),
    "middle_axis": (dict(features=3, axis=1), (4, 2, 3), True),
    "reordered_axes": (dict(features=(3, 2), axis=(2, 1)), (4, 2, 3), True),
    "no_bias": (dict(features=(2, 2), axis=-1, use_bias=False), (4, 3), True),
}


def _general_pattern(case, tie=False):
    settings, shape, ok = GENERAL_CASES[case]
    x = _x(shape=shape)
    claimed = GENERAL if ok and not tie else set()
    if not settings.get("use_bias", True):
        claimed = claimed - {"DenseGeneral_0/bias"}
    return (*_flax(General(settings, tie), x), x, claimed | HEAD)


for _case in GENERAL_CASES:
    globals()[f"pattern_general_{_case}"] = functools.partial(_general_pattern, _case)
pattern_general_bias_tied = functools.partial(_general_pattern, "two_axes", tie=True)


def pattern_kwarg_call():
    x = _x()
    return (*_flax(KwargCall(), x), x, {"Dense_1/kernel", "Dense_1/bias"})


def pattern_sequence():
    x = _x(shape=(4, 3))
    return (*_flax(Sequence(), x), x, {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias"})


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(3)(x)))


def _tree_tied(share_bias):
    """One leaf placed into two modules' slots of the params tree inside apply_fn."""
    x = _x()
    model = TwoLayers()
    params = {"w": _f64(np.random.default_rng(5).normal(size=(3, 3)) / 2),
              "b0": np.zeros(3) + 0.1, "b1": np.zeros(3) - 0.2,
              "out": _f64(nn.Dense(2).init(jax.random.PRNGKey(2), np.ones((1, 3)))["params"])}

    def apply_fn(p, x):
        inner = model.apply({"params": {
            "Dense_0": {"kernel": p["w"], "bias": p["b0"]},
            "Dense_1": {"kernel": p["w"], "bias": p["b0"] if share_bias else p["b1"]}}}, x)
        return nn.Dense(2).apply({"params": p["out"]}, inner)

    # Shared kernel and bias: one structured group of two calls. A kernel with two different
    # biases would need two groups sharing it: refused.
    claimed = {"w", "b0"} if share_bias else set()
    return apply_fn, params, x, claimed | {"out/kernel", "out/bias"}


def pattern_tree_tied_kernel_and_bias():
    apply_fn, params, x, expected = _tree_tied(True)
    return apply_fn, params, x, expected


def pattern_tree_tied_kernel_only():
    apply_fn, params, x, expected = _tree_tied(False)
    return apply_fn, params, x, expected


class Convs(nn.Module):
    """A convolution with given settings, then a Dense head."""

    conv: dict
    tie: bool = False

    @nn.compact
    def __call__(self, x):
        c = nn.Conv(**self.conv)
        h = jnp.tanh(c(x))
        out = nn.Dense(2)(h.reshape(h.shape[0], -1))
        if self.tie:  # the conv kernel also scales the output
            out = out * jnp.sum(c.variables["params"]["kernel"])
        return out


HEAD = {"Dense_0/kernel", "Dense_0/bias"}
CONV = {"Conv_0/kernel", "Conv_0/bias"}
IMAGE = (5, 5, 2)
CONV_CASES = {
    # name: (conv settings, input shape per point, structured?)
    "same": (dict(features=3, kernel_size=(3, 3)), IMAGE, True),
    "valid_stride2": (dict(features=3, kernel_size=(3, 3), strides=2, padding="VALID"), IMAGE, True),
    "explicit_padding": (dict(features=3, kernel_size=(2, 3), padding=((1, 0), (2, 1))), IMAGE, True),
    "kernel_dilation": (dict(features=3, kernel_size=(2, 2), kernel_dilation=2), IMAGE, True),
    "input_dilation": (dict(features=3, kernel_size=(3, 3), input_dilation=2, strides=2,
                                  padding=((1, 1), (0, 2))), IMAGE, True),
    "strided_same": (dict(features=3, kernel_size=(3, 3), strides=(2, 1)), IMAGE, True),
    "conv1d": (dict(features=3, kernel_size=(3,), strides=2), (7, 2), True),
    "conv3d": (dict(features=2, kernel_size=(2, 2, 2)), (3, 3, 3, 2), True),
    "no_bias": (dict(features=3, kernel_size=(3, 3), use_bias=False), IMAGE, True),
    "small_pairwise": (dict(features=8, kernel_size=(3, 3), padding="VALID"), (4, 4, 2), True),
    "grouped": (dict(features=4, kernel_size=(3, 3), feature_group_count=2), IMAGE, False),
    "circular": (dict(features=3, kernel_size=(3, 3), padding="CIRCULAR"), IMAGE, False),
    "causal": (dict(features=3, kernel_size=(3,), padding="CAUSAL"), (7, 2), False),
    "masked": (dict(features=3, kernel_size=(2, 2), mask=np.tril(np.ones((2, 2, 2, 3)))), IMAGE, False),
}


def _conv_pattern(case, tie=False):
    settings, shape, ok = CONV_CASES[case]
    x = _x(shape=shape)
    conv = CONV if ok and not tie else set()
    if not settings.get("use_bias", True):
        conv = {"Conv_0/kernel"} & conv
    return (*_flax(Convs(settings, tie), x), x, conv | HEAD)


for _case in CONV_CASES:
    globals()[f"pattern_conv_{_case}"] = functools.partial(_conv_pattern, _case)
pattern_conv_tied = functools.partial(_conv_pattern, "same", tie=True)


class Embedder(nn.Module):
    """Tokens (B, L) -> (B, L, 2) through an embedding; `kind` ties or reuses it."""

    kind: str = "plain"

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(6, 3)
        h = embed(tokens)
        if self.kind == "twice":  # the same table on shifted tokens: one structured group
            h = h * embed((tokens + 1) % 6)
        if self.kind == "attend":  # tied output layer: logits against the table
            return embed.attend(jnp.tanh(nn.Dense(3)(h)))
        return nn.Dense(2)(jnp.tanh(h))


def _tokens(negative=False):
    tokens = np.random.default_rng(7).integers(0, 6, size=(M, 4))
    if negative:  # jnp.take counts negative ids from the end
        tokens[:, 0] -= 6
    return tokens.astype(np.int32)


def _embed_pattern(kind="plain", negative=False):
    x = _tokens(negative)
    module = Embedder(kind)
    params = _f64(jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])["params"])
    claimed = {"Dense_0/kernel", "Dense_0/bias"} | ({"Embed_0/embedding"} if kind != "attend" else set())
    return (lambda p, x: module.apply({"params": p}, x)), params, x, claimed


pattern_embed = _embed_pattern
pattern_embed_negative_ids = functools.partial(_embed_pattern, negative=True)
pattern_embed_twice = functools.partial(_embed_pattern, "twice")
pattern_embed_tied_attend = functools.partial(_embed_pattern, "attend")


PATTERNS = {name[len("pattern_"):]: fn for name, fn in sorted(globals().items())
            if name.startswith("pattern_")}


@functools.lru_cache(maxsize=None)
def build(name):
    apply_fn, params, x, expected = PATTERNS[name]()
    return apply_fn, params, x, expected, brute_force(apply_fn, params, x)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_exact_or_not_structured(name):
    """Every implementation equals the float64 brute force; the claimed leaves are pinned."""
    apply_fn, params, x, expected, ref = build(name)
    dtype32 = name == "dtype_float32"  # that layer computes in float32 by design
    for impl in IMPLS:
        kernel = np.asarray(NTK(apply_fn, impl)(params, x), np.float64)
        err = np.max(np.abs(kernel - ref)) / np.max(np.abs(ref))
        assert err <= (1e-6 if dtype32 else 1e-8), f"{impl}: relative error {err:.3g}"
    ntk = NTK(apply_fn)
    assert ntk.resolved_implementation(params, x) == "structured"
    assert set(ntk.structured_leaves(params, x)) == expected


# THE GUARD: the chosen implementation against ntvp


class Perturbed(NTK):
    """A deliberately wrong implementation: the kernel off by 1 %."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * 1.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_guard_passes_exact_implementation(dtype):
    apply_fn, params, x, _, _ = build("tied")
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), params)
    result = check_against_ntvp(NTK(apply_fn), params, np.asarray(x, dtype))
    assert result["ok"] and result["implementation"] == "structured" and result["reference"] == "ntvp"
    assert result["relative_diff"] <= result["tolerance"] < 1e-2
    assert json.loads(json.dumps(result)) == result


def test_guard_stops_a_wrong_implementation():
    apply_fn, params, x, _, _ = build("mlp")
    with pytest.raises(NTKMismatchError, match="'structured' NTK differs from the ntvp reference"):
        check_against_ntvp(Perturbed(apply_fn), params, x)
    result = check_against_ntvp(Perturbed(apply_fn), params, x, raise_on_mismatch=False)
    assert not result["ok"] and result["relative_diff"] > result["tolerance"]


class OffInFloat32(NTK):
    """Off by 1 % in float32 only, as two float32 evaluations of a ReLU network differ when a
    pre-activation within round-off of 0 falls on either side of the kink."""

    def __call__(self, params, x, *args, **kwargs):
        kernel = super().__call__(params, x, *args, **kwargs)
        return kernel * 1.01 if kernel.dtype == np.float32 else kernel


def test_guard_rechecks_a_float32_mismatch_in_float64():
    """A float32-only difference passes on its float64 recheck (recorded); a persistent one stops."""
    apply_fn, params, x, _, _ = build("mlp")
    params, x = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), (params, x))
    x64 = jax.config.read("jax_enable_x64")
    result = check_against_ntvp(OffInFloat32(apply_fn), params, x)
    assert result["ok"] and result["relative_diff"] > result["tolerance"]
    recheck = result["float64_recheck"]
    assert recheck["ok"] and recheck["dtype"] == "float64" and recheck["relative_diff"] <= recheck["tolerance"] < 1e-9
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(NTKMismatchError, match="in float64"):
        check_against_ntvp(Perturbed(apply_fn), params, x)
    assert jax.config.read("jax_enable_x64") == x64  # the recheck leaves the setting as it was


def test_guard_recheck_of_the_subset_path_in_the_analyzer():
    """The analyzer's form (a kernel from subset_kernels) is rechecked through subset_kernels."""
    apply_fn, params, x, _, _ = build("mlp")
    params, x = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), (params, x))
    ntk = NTK(apply_fn)
    kernel = np.asarray(ntk.subset_kernels(params, x, np.arange(len(x))[None]))[0]
    # A float32 kernel that is off (as at a kink) while the subset path is exact in float64: passes.
    result = check_against_ntvp(ntk, params, x, kernel=kernel * 1.01, from_subsets=True)
    assert result["ok"] and result["relative_diff"] > result["tolerance"]
    assert result["float64_recheck"]["relative_diff"] < 1e-9


def test_guard_stops_a_structured_path_that_drops_a_term(monkeypatch):
    """A structured contraction that forgets the last Dense layer's term is caught."""
    apply_fn, params, x, _, _ = build("mlp")
    exact = structured.contract

    def dropped(fa, fb, full):
        return exact((fa[0], fa[1][:-1]), (fb[0], fb[1][:-1]), full)

    monkeypatch.setattr(structured, "contract", dropped)
    with pytest.raises(NTKMismatchError):
        check_against_ntvp(NTK(apply_fn), params, x)


def test_guard_checks_points_spread_over_the_subset():
    """The reference covers CHECK_POINTS points, first and last included; an error confined to the
    last point's entries (a wrong last tile, say) is caught, and every point can be checked."""
    from ntk_tracking.ntk.guard import CHECK_POINTS, check_points

    assert list(check_points(20)) == [0, 6, 13, 19] and CHECK_POINTS == 4
    assert list(check_points(3)) == [0, 1, 2] and list(check_points(20, 2)) == [0, 19]
    apply_fn, params, x, _, _ = build("mlp")
    x = np.random.default_rng(0).normal(size=(9,) + np.shape(x)[1:]).astype(np.asarray(x).dtype)
    ntk = NTK(apply_fn)
    kernel = np.asarray(ntk(params, x), np.float64)
    m = len(kernel)
    result = check_against_ntvp(ntk, params, x, kernel=kernel)
    assert result["ok"] and result["checked_points"] == [int(i) for i in check_points(m)]
    wrong = kernel.copy()
    wrong[-1, :] *= 1.01
    wrong[:, -1] *= 1.01
    with pytest.raises(NTKMismatchError):
        check_against_ntvp(ntk, params, x, kernel=wrong)
    assert check_against_ntvp(ntk, params, x, kernel=kernel, points=None)["checked_points"] == list(range(m))
