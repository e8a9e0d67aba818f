"""The empirical NTK against a brute-force flattened Jacobian, across implementations and blocks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tracking import NTK, empirical_ntk, ntk_trace
from ntk_tracking.ntk import structured
from ntk_tracking.ntk.kernel import take

M = 5  # measurement points: odd, so block sizes 2 and 3 leave a padded last block
IMPLS = ("jacobian", "ntvp", "structured")


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest: tiny models compile faster


# MODELS: each builder returns (apply_fn, params, x, output_mask) in the requested float dtype.
# Parameters are initialized in float32 and cast, so float32 and float64 builds hold equal values.


class TanhMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(16)(x))
        x = jnp.tanh(nn.Dense(16)(x))
        return nn.Dense(1)(x)[:, 0]  # scalar output: shape (points,)


class ReluCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(jnp.tanh(x))


class GraphNet(nn.Module):
    """Two GCN layers on one padded graph, mean-pooled over its real nodes."""

    @nn.compact
    def __call__(self, graph, node_mask):
        graph = jraph.GraphConvolution(nn.Dense(8), add_self_edges=True)(graph)
        graph = graph._replace(nodes=jnp.tanh(graph.nodes))
        graph = jraph.GraphConvolution(nn.Dense(8), add_self_edges=True)(graph)
        w = node_mask[:, None]
        pooled = jnp.sum(graph.nodes * w, axis=0) / jnp.sum(w)
        return nn.Dense(2)(pooled)


class Tagger(nn.Module):
    """Embedding, one masked self-attention head, per-token dense head: (B, L) tokens -> (B, L, C)."""

    @nn.compact
    def __call__(self, tokens, mask):
        h = nn.Embed(11, 8)(tokens)
        q, k, v = jnp.split(nn.Dense(24)(h), 3, axis=-1)
        logits = jnp.einsum("...qd,...kd->...qk", q, k) / np.sqrt(8.0)
        # Padded keys get exactly zero weight, so padded tokens cannot reach real positions.
        logits = jnp.where(mask[..., None, :] > 0, logits, -1e30)
        h = h + jax.nn.softmax(logits, axis=-1) @ v
        h = jnp.tanh(nn.Dense(8)(h))
        return nn.Dense(4)(h)


def _cast(tree, dtype):
    """Float leaves to `dtype` on the host (eager casts would compile one XLA op per shape)."""

    def cast(a):
        a = np.asarray(a)
        return jnp.asarray(a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a)

    return jax.tree_util.tree_map(cast, tree)


def _init(model, *args, **kwargs):
    return jax.jit(functools.partial(model.init, **kwargs))(jax.random.PRNGKey(0), *args)


@functools.lru_cache(maxsize=None)  # builds are deterministic; reuse them across tests
def build_mlp(dtype, m=M):
    model = TanhMLP()
    x = np.random.default_rng(0).normal(size=(m, 3))
    params = _init(model, x[:1])["params"]
    return (lambda p, x: model.apply({"params": p}, x)), _cast(params, dtype), _cast(x, dtype), None


@functools.lru_cache(maxsize=None)  # builds are deterministic; reuse them across tests
def build_cnn(dtype, m=M):
    model = ReluCNN()
    x = np.random.default_rng(1).normal(size=(m, 8, 8, 1))
    params = _init(model, x[:1])["params"]
    return (lambda p, x: model.apply({"params": p}, x)), _cast(params, dtype), _cast(x, dtype), None


@functools.lru_cache(maxsize=None)  # builds are deterministic; reuse them across tests
def build_batchnorm(dtype, m=M):
    model = BatchNormNet()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(m, 4))
    variables = _init(model, x, train=False)
    # One train-mode step so the running statistics are not the trivial (0, 1).
    train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    _, updated = jax.jit(train)(variables, 3.0 + 2.0 * rng.normal(size=(16, 4)))
    bs = _cast(updated["batch_stats"], dtype)
    assert not np.allclose(bs["BatchNorm_0"]["mean"], 0.0)
    assert not np.allclose(bs["BatchNorm_0"]["var"], 1.0)
    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": bs}, x, train=False)  # noqa: E731
    return apply_fn, _cast(variables["params"], dtype), _cast(x, dtype), None


def graph_batch(m=M, n_nodes=6, n_edges=8, seed=3):
    """m graphs of 3–5 real nodes, each padded to n_nodes/n_edges, stacked point-first."""
    rng = np.random.default_rng(seed)
    nodes = rng.normal(size=(m, n_nodes, 3))
    senders = np.full((m, n_edges), n_nodes - 1)  # padded edges: last (padding) node to itself
    receivers = np.full((m, n_edges), n_nodes - 1)
    node_mask = np.zeros((m, n_nodes))
    for i in range(m):
        real = 3 + i % 3
        node_mask[i, :real] = 1.0
        e = 2 * real - 2
        senders[i, :e] = rng.integers(0, real, e)
        receivers[i, :e] = rng.integers(0, real, e)
    graph = jraph.GraphsTuple(
        nodes=nodes, edges=None, senders=senders, receivers=receivers, globals=None,
        n_node=np.full((m, 1), n_nodes), n_edge=np.full((m, 1), n_edges),
    )
    return {"graph": graph, "node_mask": node_mask}


@functools.lru_cache(maxsize=None)  # builds are deterministic; reuse them across tests
def build_graph(dtype, m=M):
    model = GraphNet()
    x = graph_batch(m)
    one = jax.tree_util.tree_map(lambda a: a[0], x)
    params = _init(model, one["graph"], one["node_mask"])["params"]

    def apply_fn(p, x):
        return jax.vmap(lambda g, mask: model.apply({"params": p}, g, mask))(
            x["graph"], x["node_mask"]
        )

    return apply_fn, _cast(params, dtype), _cast(x, dtype), None


def token_batch(m=M, length=6, seed=4):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 11, size=(m, length))
    mask = np.zeros((m, length))
    for i in range(m):
        mask[i, : 2 + i % (length - 1)] = 1.0
    return {"tokens": tokens.astype(np.int32), "mask": mask}


@functools.lru_cache(maxsize=None)  # builds are deterministic; reuse them across tests
def build_tagger(dtype, m=M):
    model = Tagger()
    x = token_batch(m)
    params = _init(model, x["tokens"][:1], x["mask"][:1])["params"]

    def apply_fn(p, x):
        return model.apply({"params": p}, x["tokens"], x["mask"])

    x = _cast(x, dtype)
    return apply_fn, _cast(params, dtype), x, x["mask"]


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "batchnorm": build_batchnorm,
            "graph": build_graph, "tagger": build_tagger}


# REFERENCE


def _masked(out, mask):
    if mask is None:
        return out
    mask = jnp.asarray(mask, out.dtype)
    return out * mask.reshape(mask.shape + (1,) * (out.ndim - mask.ndim))


def brute_force_jacobian(apply_fn, params, x, output_mask=None):
    """d(all outputs of the whole batch)/d(flat parameter vector): (m, *out, P)."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacrev(lambda v: _masked(apply_fn(unravel(v), x), output_mask)))(flat)
    return np.asarray(jac, np.float64)


_REFERENCE = {}


def reference_jacobian(model):
    """The float64 brute-force Jacobian of a test model, computed once per session."""
    if model not in _REFERENCE:
        previous = jax.config.read("jax_enable_x64")
        jax.config.update("jax_enable_x64", True)
        try:
            apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
            _REFERENCE[model] = brute_force_jacobian(apply_fn, params, x, mask)
        finally:
            jax.config.update("jax_enable_x64", previous)
    return _REFERENCE[model]


def contract(jac, full=False):
    """Σ_k J_ik J_jk with the output axes summed (m×m) or kept point-major ((m·O)×(m·O))."""
    m, n_params = jac.shape[0], jac.shape[-1]
    if full:
        j = jac.reshape(-1, n_params)
        return j @ j.T
    j = jac.reshape(m, -1, n_params)
    return np.einsum("iok,jok->ij", j, j)


def rel_err(k, ref):
    k, ref = np.asarray(k, np.float64), np.asarray(ref, np.float64)
    assert k.shape == ref.shape
    return np.max(np.abs(k - ref)) / np.max(np.abs(ref))


# 1. AGAINST THE BRUTE-FORCE JACOBIAN


FULL_TOO = ("mlp", "cnn", "tagger")  # also check the (m·O)×(m·O) kernel on these


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", list(BUILDERS))
def test_matches_brute_force_jacobian(x64, model, impl):
    """m×m (and (m·O)×(m·O)) kernels equal the flat-Jacobian contraction to 1e-8 in float64."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
    jac = reference_jacobian(model)
    kernel = empirical_ntk(apply_fn, params, x, output_mask=mask, implementation=impl)
    assert kernel.dtype == jnp.float64 and kernel.shape == (M, M)
    assert rel_err(kernel, contract(jac)) <= 1e-8
    if model in FULL_TOO:
        full = empirical_ntk(apply_fn, params, x, output_mask=mask, implementation=impl, full=True)
        assert rel_err(full, contract(jac, full=True)) <= 1e-8


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_positions_do_not_change_kernel(x64, impl):
    """Changing tokens at masked positions leaves the kernel unchanged; the mask matters."""
    apply_fn, params, x, mask = build_tagger(jnp.float64)
    ntk = NTK(apply_fn, impl)
    kernel = np.asarray(ntk(params, x, output_mask=mask))
    tokens = np.asarray(x["tokens"]).copy()
    masked = np.asarray(mask) == 0
    assert masked.any()
    tokens[masked] = tokens[masked] % 10 + 1  # another token in 1..10
    assert not np.array_equal(tokens, x["tokens"])
    changed = dict(x, tokens=jnp.asarray(tokens))
    np.testing.assert_allclose(ntk(params, changed, output_mask=mask), kernel, rtol=1e-12, atol=0)
    # Without the output mask the padded positions would count: the mask matters.
    unmasked = np.asarray(ntk(params, x))
    assert rel_err(unmasked, kernel) > 1e-3


def test_padding_nodes_do_not_change_graph_kernel(x64):
    """Features of padding nodes (masked, self-edges only) do not reach the kernel."""
    apply_fn, params, x, _ = build_graph(jnp.float64)
    kernel = empirical_ntk(apply_fn, params, x)
    nodes = np.asarray(x["graph"].nodes).copy()
    pad = np.asarray(x["node_mask"]) == 0
    nodes[pad] += 5.0
    changed = {"graph": x["graph"]._replace(nodes=jnp.asarray(nodes)), "node_mask": x["node_mask"]}
    np.testing.assert_allclose(empirical_ntk(apply_fn, params, changed), kernel, rtol=1e-12)


STRUCTURED = {
    "mlp": {f"Dense_{i}/{w}" for i in range(3) for w in ("kernel", "bias")},
    "cnn": {f"{layer}_{i}/{w}" for layer in ("Conv", "Dense") for i in range(2)
            for w in ("kernel", "bias")},
    "tagger": {f"Dense_{i}/{w}" for i in range(3) for w in ("kernel", "bias")}
    | {"Embed_0/embedding"},
    "batchnorm": {f"Dense_{i}/{w}" for i in range(2) for w in ("kernel", "bias")},
    "graph": set(),  # every Dense call sits inside apply_fn's own vmap: exact fallback
}


@pytest.mark.parametrize("model", list(BUILDERS))
def test_structured_path_is_taken(model):
    """auto resolves to structured and claims exactly the Dense leaves it can prove exact."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float32)
    ntk = NTK(apply_fn)
    assert ntk.resolved_implementation(params, x, mask) == "structured"
    assert set(ntk.structured_leaves(params, x, mask)) == STRUCTURED[model]
    assert NTK(apply_fn, "jacobian").structured_leaves(params, x, mask) == []


# 2. IMPLEMENTATIONS AND BLOCKS AGREE


def _budget_for_block(ntk, params, x, mask, block):
    """A memory budget that XLA's memory analysis says holds every block's factors at `block`
    points per block: the jacobian path's measured plan then splits the points."""
    m, _, mask, _ = ntk._prepare(params, x, mask)
    x = jax.tree_util.tree_map(jnp.asarray, x)
    fac, con = ntk._step_memory("jacobian", params, x, mask, block, False)
    step = max(fac.temp_size_in_bytes, con.temp_size_in_bytes + con.output_size_in_bytes)
    return -(-m // block) * fac.output_size_in_bytes + step


_UNBLOCKED = {}


def _unblocked(apply_fn, params, x, mask, full):
    """The tagger's kernel from the plain jacobian path (one block), computed once."""
    if full not in _UNBLOCKED:
        kernel = NTK(apply_fn, "jacobian")(params, x, output_mask=mask, full=full)
        _UNBLOCKED[full] = np.asarray(kernel)
    return _UNBLOCKED[full]


BLOCK_CONFIGS = [("ntvp", {})] + [(i, {"block_size": b}) for i in IMPLS for b in (1, 2, 3)] + [
    ("jacobian", {"memory_budget": "two points"}),  # the budget (XLA's measure) forces blocks
    ("ntvp", {"memory_budget": 1}),  # blocks of one point, one cotangent at a time
]


@pytest.mark.parametrize("impl, settings", BLOCK_CONFIGS, ids=lambda v: str(v))
def test_implementations_and_blocks_agree(x64, impl, settings):
    """Every implementation × block size (m = 5: padded last blocks) × budget agrees to 1e-10.

    On the tagger: pytree x, (points, positions, classes) outputs, an output mask; both the
    m×m kernel and the full (m·O)×(m·O) kernel, whose o = o' block sums are the m×m kernel.
    """
    apply_fn, params, x, mask = build_tagger(jnp.float64)
    out_shape = jax.eval_shape(apply_fn, params, x).shape[1:]
    if settings.get("memory_budget") == "two points":
        settings = {"memory_budget": _budget_for_block(NTK(apply_fn), params, x, mask, 2)}
    ntk = NTK(apply_fn, impl, **settings)
    if impl == "jacobian" and "memory_budget" in settings:
        _, _, mask_full, act = ntk._prepare(params, x, mask)
        xj = jax.tree_util.tree_map(jnp.asarray, x)
        assert 1 < ntk._plan(params, M, out_shape, act, xj, mask_full)[1] < M
    kernel = ntk(params, x, output_mask=mask)
    full = ntk(params, x, output_mask=mask, full=True)
    o = int(np.prod(out_shape))
    assert full.shape == (M * o, M * o)
    assert rel_err(kernel, _unblocked(apply_fn, params, x, mask, False)) <= 1e-10
    assert rel_err(full, _unblocked(apply_fn, params, x, mask, True)) <= 1e-10
    assert rel_err(kernel, contract(reference_jacobian("tagger"))) <= 1e-10
    block_sums = np.einsum("iojo->ij", np.asarray(full).reshape(M, o, M, o))
    assert rel_err(block_sums, kernel) <= 1e-12
    if impl == "jacobian":  # the diagonal reuses the blocked Jacobians
        diag = ntk.diagonal(params, x, output_mask=mask)
        np.testing.assert_allclose(diag, np.diag(np.asarray(kernel)), rtol=1e-10)


def test_budget_below_one_point_warns_and_auto_picks_ntvp(x64):
    """Below one point's Jacobian the jacobian path warns and stays exact; auto switches to ntvp."""
    apply_fn, params, x, _ = build_mlp(jnp.float64)
    ref = contract(reference_jacobian("mlp"))
    tiny = NTK(apply_fn, "jacobian", memory_budget=1)
    with pytest.warns(UserWarning, match="exceeds the memory budget"):
        kernel = tiny(params, x)
    assert rel_err(kernel, ref) <= 1e-10
    auto = NTK(apply_fn, "auto", memory_budget=1)
    assert auto._plan(params, M, ())[0] == "ntvp"
    assert rel_err(auto(params, x), ref) <= 1e-10
    assert NTK(apply_fn)._plan(params, M, ())[:2] == ("structured", M)  # default: one block


def _wide(p, x):
    """Few parameters, large activations: a 1×1 convolution to 64 channels, then a mean."""
    h = jnp.tanh(jnp.einsum("nhwc,cd->nhwd", x, p["w"]))
    return jnp.mean(h, axis=(1, 2)) @ p["v"]


def _wide_case():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 64)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)}
    return _wide, params, jnp.asarray(rng.normal(size=(40, 16, 16, 3)), jnp.float32), None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, budget_mib", [("wide", 4), ("tagger", 1)])
def test_memory_budget_bounds_xla_temporaries(case, budget_mib, impl):
    """XLA's memory analysis of the planned computation fits the budget (m = 40).

    wide: 448 parameters but 16×16×64 activations per point, so activations dominate;
    tagger: 960 outputs per block, so an ntvp tile of 960 × 960 must count too.
    """
    if case == "wide":
        apply_fn, params, x, mask = _wide_case()
    else:
        apply_fn, params, x, mask = build_tagger(jnp.float32, m=40)
    budget = budget_mib * 2**20
    ntk = NTK(apply_fn, impl, memory_budget=budget)
    m, out_shape, mask, act = ntk._prepare(params, x, mask)
    x = jax.tree_util.tree_map(jnp.asarray, x)
    _, block, chunk = ntk._plan(params, m, out_shape, act, x, mask)
    if impl == "ntvp":
        memory = ntk._ntvp.lower(params, x, mask, 0, 0, block=block, chunk=chunk).compile().memory_analysis()
        used = memory.temp_size_in_bytes + memory.output_size_in_bytes
    else:  # one block's factors, and two blocks contracted, as compiled for the planned block
        from ntk_tracking.ntk.kernel import KEEP

        factors = (ntk._jac.lower(params, x, mask, 0, block=block) if impl == "jacobian" else
                   ntk._factors.lower(params, x, mask, 0, block=block, calls=ntk._discover(params, x),
                                      inert=ntk._inert(params, x)))
        contract = (ntk._contract.lower(factors.out_info, factors.out_info) if impl == "jacobian" else
                    ntk._contract_factors.lower(factors.out_info, factors.out_info, full=False))
        fac, con = factors.compile().memory_analysis(), contract.compile().memory_analysis()
        # Held at once: every block's factors (KEEP) or two blocks', and the running step's temporaries.
        held = -(-m // block) if chunk == KEEP else 2
        used = held * fac.output_size_in_bytes + max(
            fac.temp_size_in_bytes, con.temp_size_in_bytes + con.output_size_in_bytes)
    assert used <= budget, f"{impl}: block {block}, chunk {chunk}: {used / 2**20:.1f} MiB"


@pytest.mark.parametrize("impl", ["jacobian", "structured"])
def test_measured_plan_computes_each_block_once(impl):
    """Where the estimate splits the points, XLA's memory analysis picks the block; where every
    block's factors fit, k blocks cost k factor calls (none recomputed), the plan is made once
    per shapes, and the kernel is exact."""
    from ntk_tracking.ntk.kernel import KEEP

    apply_fn, params, x, _ = _wide_case()
    ref = contract(brute_force_jacobian(apply_fn, params, x))
    ntk = NTK(apply_fn, impl, memory_budget=8 * 2**20)
    m, out_shape, mask, act = ntk._prepare(params, x, None)
    xj = jax.tree_util.tree_map(jnp.asarray, x)
    assert ntk._estimated_plan(params, m, out_shape, act, xj)[1] < m  # the estimate splits
    _, block, chunk = ntk._plan(params, m, out_shape, act, xj, mask)
    assert chunk == KEEP and 1 < block < m
    name = "_jac" if impl == "jacobian" else "_factors"
    compiled, starts = getattr(ntk, name), []
    setattr(ntk, name, lambda *a, **kw: starts.append(a[3]) or compiled(*a, **kw))
    plans = dict(ntk._plans)
    assert rel_err(ntk(params, x), ref) <= 1e-5
    assert starts == [b * block for b in range(-(-m // block))]
    assert ntk._plans == plans  # the measured plan was reused, not measured again


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("model", ["cnn", "tagger"])
@pytest.mark.parametrize("impl", ["jacobian", "structured"])
def test_one_block_is_one_call(x64, impl, model, full):
    """Where one block holds every point, its factors and their contraction run as one compiled
    call: the same kernel as two blocks and as the brute-force Jacobian, and no separate factor
    or contraction call."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
    ntk = NTK(apply_fn, impl)
    separate = []
    for name in ("_jac", "_factors", "_contract", "_contract_factors"):
        compiled = getattr(ntk, name)
        setattr(ntk, name, lambda *a, _c=compiled, _n=name, **kw: separate.append(_n) or _c(*a, **kw))
    kernel = ntk(params, x, output_mask=mask, full=full)
    assert separate == []
    blocked = NTK(apply_fn, impl, block_size=2)(params, x, output_mask=mask, full=full)
    assert rel_err(kernel, blocked) <= 1e-10
    assert rel_err(kernel, contract(reference_jacobian(model), full=full)) <= 1e-8


@pytest.mark.parametrize("columns, chunks, n_parts", [(7, 64, 8), (7, 3, 3), (64, 64, 1)])
def test_gram_in_column_chunks(x64, monkeypatch, columns, chunks, n_parts):
    """structured.gram = a bᵀ, over column chunks of ≥ _GRAM_COLUMNS columns, at most
    _GRAM_CHUNKS of them, the last one ragged."""
    monkeypatch.setattr(structured, "_GRAM_COLUMNS", columns)
    monkeypatch.setattr(structured, "_GRAM_CHUNKS", chunks)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(4, 50))
    assert np.allclose(structured.gram(jnp.asarray(a), jnp.asarray(b)), a @ b.T, rtol=1e-13, atol=1e-13)
    hlo = jax.jit(lambda a, b: structured.gram(a, b)).lower(a, b).as_text()  # a new trace
    assert hlo.count("stablehlo.dot_general") == n_parts
    empty = structured.gram(jnp.zeros((3, 0)), jnp.zeros((4, 0)))  # an empty parameter leaf
    assert empty.shape == (3, 4) and not np.any(empty)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("model", ["cnn", "tagger", "batchnorm"])
@pytest.mark.parametrize("impl", ["jacobian", "structured"])
def test_chunked_gram_kernel_is_exact(x64, monkeypatch, impl, model, full):
    """With the Jacobians' Gram in chunks of a few columns (ragged at the end), one block and
    two blocks still give the brute-force kernel."""
    monkeypatch.setattr(structured, "_GRAM_COLUMNS", 7)
    widths = []
    gram = structured.gram
    monkeypatch.setattr(structured, "gram", lambda a, b: widths.append(a.shape[1]) or gram(a, b))
    jax.clear_caches()  # jitted contractions traced with the default chunks must not be reused
    try:
        apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
        ref = contract(reference_jacobian(model), full=full)
        for block_size in (None, 2):
            ntk = NTK(apply_fn, impl, block_size=block_size)
            assert rel_err(ntk(params, x, output_mask=mask, full=full), ref) <= 1e-8
        assert max(widths) > 7  # some Gram did run in several chunks
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # nor these by later tests


@pytest.mark.parametrize("impl", IMPLS)
def test_small_budget_kernel_is_exact(impl):
    """The blocks and chunks a 4 MiB budget forces on the wide model give the same kernel."""
    apply_fn, params, x, _ = _wide_case()
    ref = contract(brute_force_jacobian(apply_fn, params, x))
    assert rel_err(NTK(apply_fn, impl, memory_budget=4 * 2**20)(params, x), ref) <= 1e-5


# 2b. THE K SUBSETS OF A PROBE SET AT ONCE

SUBSETS = np.array([[0, 1, 2], [2, 3, 4], [4, 0, 1], [1, 3, 0]])  # K = 4 overlapping subsets of m = 3


# (model, block_size, group): every model with all subsets grouped in one call; the tagger in two
# groups of two (block 6) and a padded group (block 9); one subset at a time on the graph network
# (block 2 < m) and by default (group None).
SUBSET_CASES = ([(model, None, 4) for model in BUILDERS]
                + [("tagger", 6, 4), ("tagger", 9, 4), ("graph", 2, 4), ("tagger", None, None)])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model, block_size, group", SUBSET_CASES, ids=lambda v: str(v))
def test_subset_kernels_match_brute_force(x64, model, impl, block_size, group):
    """subset_kernels equals the brute-force kernel restricted to each subset, grouped or not."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
    jac = reference_jacobian(model)
    ntk = NTK(apply_fn, impl, block_size=block_size)
    kernels = ntk.subset_kernels(params, x, SUBSETS, output_mask=mask, group=group)
    assert kernels.shape == (4, 3, 3) and kernels.dtype == jnp.float64
    for kernel, idx in zip(kernels, SUBSETS):
        assert rel_err(kernel, contract(jac[idx])) <= 1e-8
    if model in FULL_TOO:
        full = ntk.subset_kernels(params, x, SUBSETS, output_mask=mask, full=True, group=group)
        for kernel, idx in zip(full, SUBSETS):
            assert rel_err(kernel, contract(jac[idx], full=True)) <= 1e-8
    grouped = group is not None and impl != "ntvp" and (block_size or 99) >= 3
    assert bool(ntk._grouped_fns) == grouped, "the one-call path was (not) taken"


@pytest.mark.parametrize("model", ["mlp", "tagger", "graph"])
def test_subset_kernels_one_by_one_equal_calls(model):
    """The default (one subset at a time) path, with consecutive subsets as the analyzer passes
    them (views) and scattered ones, with and without the mask: each kernel is the call's."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float32)
    ntk = NTK(apply_fn)
    subsets = np.array([[0, 1, 2], [2, 3, 4], [4, 0, 1]])
    for m_ in (mask, None):
        kernels = np.asarray(ntk.subset_kernels(params, x, subsets, output_mask=m_))
        for kernel, idx in zip(kernels, subsets):
            call = ntk(params, take(x, idx), None if m_ is None else take(m_, idx))
            np.testing.assert_array_equal(kernel, np.asarray(call))


class EncoderDecoder(nn.Module):
    def setup(self):
        self.enc = nn.Dense(3)
        self.scale = self.param("scale", nn.initializers.ones, (3,))
        self.dec = nn.Dense(4)

    def encode(self, x):
        return jnp.tanh(self.enc(x)) * self.scale

    def __call__(self, x):
        return self.dec(self.encode(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_leaves_no_tangent_reaches_are_skipped_exactly(x64, impl):
    """The encoder's NTK of a model that also holds a decoder: the decoder's leaves are proved
    inert (no tangent reaches the output) and skipped; the kernel equals the brute force."""
    model = EncoderDecoder()
    x = np.random.default_rng(5).normal(size=(M, 4))
    params = _cast(_init(model, x[:1])["params"], jnp.float64)
    apply_fn = lambda p, x: model.apply({"params": p}, x, method=model.encode)  # noqa: E731
    ntk = NTK(apply_fn, impl)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    inert = {"/".join(str(k.key) for k in paths[i]) for i in ntk._inert(params, x)}
    assert inert == {"dec/kernel", "dec/bias"}
    ref = contract(brute_force_jacobian(apply_fn, params, x))
    assert rel_err(ntk(params, x), ref) <= 1e-8
    assert rel_err(ntk.subset_kernels(params, x, SUBSETS, group=4)[1], ref[np.ix_(SUBSETS[1], SUBSETS[1])]) <= 1e-8
    # Nothing reaches the output at all: the zero kernel, not an error.
    zero = NTK(lambda p, x: x[:, :2] * 1.0, impl)(params, x)
    assert zero.shape == (M, M) and not np.any(np.asarray(zero))


def test_subset_kernels_bad_subsets():
    apply_fn, params, x, _ = build_mlp(jnp.float32)
    ntk = NTK(apply_fn)
    with pytest.raises(ValueError, match="must lie in"):
        ntk.subset_kernels(params, x, np.array([[0, M]]))
    with pytest.raises(ValueError, match=r"\(K, m\) index array"):
        ntk.subset_kernels(params, x, np.arange(3))
    with pytest.raises(ValueError, match="group must be"):
        ntk.subset_kernels(params, x, np.array([[0, 1]]), group=0)


TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, sys
jax.config.update("jax_enable_x64", True)
sys.path[:0] = ["tests/ntk", "tests"]
from test_ntk_kernel import BUILDERS, SUBSETS
from ntk_tracking import NTK
from ntk_tracking.ntk.measure import take
assert len(jax.local_devices()) == 2, jax.local_devices()
for model, impl in (("mlp", "structured"), ("tagger", "structured"), ("graph", "jacobian")):
    apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
    ntk = NTK(apply_fn, impl)
    kernels = np.asarray(ntk.subset_kernels(params, x, SUBSETS, output_mask=mask))
    assert [key[-1] for key in ntk._grouped_fns] == [2], ntk._grouped_fns  # split over both devices
    one = NTK(apply_fn, impl)
    single = np.stack([np.asarray(one(params, take(x, idx), output_mask=None if mask is None else take(mask, idx)))
                       for idx in SUBSETS])
    err = np.max(np.abs(kernels - single)) / np.max(np.abs(single))
    assert err <= 1e-12, (model, impl, err)
print("ok")
"""


@pytest.mark.slow  # a fresh interpreter with two forced host devices: the fast tier leaves it out
def test_subset_kernels_on_two_devices_equal_one_device():
    """With two (forced host) devices the subsets are split across them; the kernels equal the
    one-device, one-subset-at-a-time kernels."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# 3. COMPILED ONCE; DIAGONAL AND TRACE


def _counting(apply_fn):
    calls = []

    def counted(p, x):
        calls.append(1)
        return apply_fn(p, x)

    return counted, calls


def _new_params(params, seed):
    """Same shapes and dtypes, new values (numpy noise: no eager XLA ops)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(a.dtype)), params
    )


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_new_params_do_not_retrace(impl, block_size):
    """NTK(...) and empirical_ntk(...) trace apply_fn on the first call only, new params or not."""
    base, params, x, _ = build_mlp(jnp.float32)
    apply_fn, calls = _counting(base)
    ntk = NTK(apply_fn, impl, block_size=block_size)
    first = np.asarray(ntk(params, x))
    traced = len(calls)
    assert traced >= 1
    for seed in range(3):
        assert not np.allclose(ntk(_new_params(params, seed), x), first)
    assert len(calls) == traced, "NTK retraced apply_fn for new params of the same shapes"

    fn, fn_calls = _counting(base)
    empirical_ntk(fn, params, x, implementation=impl, block_size=block_size)
    traced = len(fn_calls)
    for seed in range(3):
        empirical_ntk(fn, _new_params(params, seed), x, implementation=impl, block_size=block_size)
    assert len(fn_calls) == traced, "empirical_ntk retraced apply_fn for new params"


@pytest.mark.parametrize("model", ["cnn", "tagger", "graph"])
def test_diagonal_and_trace(x64, model):
    """.diagonal/.trace equal diag(K), tr K and Σ_i Σ_o ‖∂f_o(x_i)/∂θ‖² by brute force."""
    apply_fn, params, x, mask = BUILDERS[model](jnp.float64)
    sq_norms = np.sum(reference_jacobian(model).reshape(M, -1) ** 2, axis=1)
    ntk = NTK(apply_fn, "jacobian")
    kernel = np.asarray(ntk(params, x, output_mask=mask))
    diag = np.asarray(ntk.diagonal(params, x, output_mask=mask))
    assert diag.shape == (M,)
    np.testing.assert_allclose(diag, np.diag(kernel), rtol=1e-10)
    np.testing.assert_allclose(diag, sq_norms, rtol=1e-10)
    np.testing.assert_allclose(ntk.trace(params, x, output_mask=mask), np.trace(kernel), rtol=1e-10)
    np.testing.assert_allclose(ntk.trace(params, x, output_mask=mask), sq_norms.sum(), rtol=1e-10)


@pytest.mark.parametrize("block_size", [None, 2])
def test_ntk_trace_function(x64, block_size):
    """ntk_trace(...) is Σ_i ‖∂f(x_i)/∂θ‖² by brute force; blocked diagonals agree too."""
    apply_fn, params, x, _ = build_mlp(jnp.float64)
    sq_norms = np.sum(reference_jacobian("mlp").reshape(M, -1) ** 2, axis=1)
    np.testing.assert_allclose(ntk_trace(apply_fn, params, x), sq_norms.sum(), rtol=1e-10)
    diag = NTK(apply_fn, block_size=block_size).diagonal(params, x)
    np.testing.assert_allclose(diag, sq_norms, rtol=1e-10)


# 4. DTYPES


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_by_default(impl):
    """Without x64 the kernel, full kernel, diagonal and trace are float32 (and close to exact)."""
    assert not jax.config.read("jax_enable_x64")
    apply_fn, params, x, _ = build_graph(jnp.float32)
    ntk = NTK(apply_fn, impl)
    kernel = ntk(params, x)
    assert kernel.dtype == jnp.float32 and kernel.shape == (M, M)
    assert ntk(params, x, full=True).dtype == jnp.float32
    assert ntk.diagonal(params, x).dtype == jnp.float32
    assert ntk.trace(params, x).dtype == jnp.float32
    assert rel_err(kernel, contract(reference_jacobian("graph"))) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_with_x64(x64, impl):
    """With x64 and float64 parameters every output is float64."""
    apply_fn, params, x, _ = build_mlp(jnp.float64)
    ntk = NTK(apply_fn, impl)
    assert ntk(params, x).dtype == jnp.float64
    assert ntk(params, x, full=True).dtype == jnp.float64
    assert ntk.diagonal(params, x).dtype == jnp.float64


# 7. BAD INPUT


def _linear(p, x):
    return x @ p["w"]


LINEAR = {"w": jnp.ones((3, 2))}


@pytest.mark.parametrize(
    "x, match",
    [
        ({"a": np.ones((4, 3)), "b": np.ones((5, 3))}, "disagree on the number of points"),
        (np.ones((0, 3)), "empty batch"),
        ({}, "holds no arrays"),
        ({"a": np.ones((4, 3)), "b": np.float32(1.0)}, "leading point axis"),
    ],
    ids=["mismatched-leading-axes", "empty-batch", "no-arrays", "scalar-leaf"],
)
def test_bad_inputs_raise(x, match):
    """Malformed x is rejected with a ValueError that names the problem."""
    fn = lambda p, x: _linear(p, x["a"] if isinstance(x, dict) else x)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        empirical_ntk(fn, LINEAR, x)


@pytest.mark.parametrize(
    "apply_fn",
    [lambda p, x: _linear(p, x).T, lambda p, x: jnp.sum(_linear(p, x)),
     lambda p, x: jnp.sum(_linear(p, x), axis=0)],
    ids=["transposed", "reduced-scalar", "summed-over-points"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_output_must_lead_with_point_axis(apply_fn, impl):
    with pytest.raises(ValueError, match="lead with the point axis"):
        NTK(apply_fn, impl)(LINEAR, np.ones((5, 3)))


def test_pytree_output_rejected():
    with pytest.raises(ValueError, match="single array"):
        empirical_ntk(lambda p, x: {"y": _linear(p, x)}, LINEAR, np.ones((5, 3)))


def test_unknown_implementation():
    with pytest.raises(ValueError, match="unknown NTK implementation 'structural'"):
        NTK(_linear, "structural")
    with pytest.raises(ValueError, match="unknown NTK implementation"):
        empirical_ntk(_linear, LINEAR, np.ones((5, 3)), implementation="jacrev")


@pytest.mark.parametrize("shape", [(4,), (5, 3), (5, 2, 1), ()], ids=str)
def test_wrong_output_mask_shape(shape):
    """The output is (5, 2): masks of shape (5,) or (5, 2) pass; anything else is rejected."""
    with pytest.raises(ValueError, match="output_mask has shape"):
        empirical_ntk(_linear, LINEAR, np.ones((5, 3)), output_mask=np.ones(shape))


def test_output_mask_leading_part_of_output_shape():
    """A (points,) mask equals the (points, outputs) mask broadcast; zeroed points drop out."""
    x = np.arange(15.0).reshape(5, 3)
    per_point = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    kernel = np.asarray(empirical_ntk(_linear, LINEAR, x, output_mask=per_point))
    full_mask = np.repeat(per_point[:, None], 2, axis=1)
    np.testing.assert_allclose(empirical_ntk(_linear, LINEAR, x, output_mask=full_mask), kernel)
    np.testing.assert_allclose(kernel, 2.0 * np.outer(per_point, per_point) * (x @ x.T), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [(dict(memory_budget=-1), "memory_budget"),
                                           (dict(block_size=0), "block_size")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTK(_linear, **kwargs)


def test_apply_fn_failure_is_value_error():
    """A shape error inside apply_fn surfaces as a ValueError saying apply_fn failed."""
    with pytest.raises(ValueError, match="apply_fn"):
        empirical_ntk(_linear, LINEAR, np.ones((5, 4)))

