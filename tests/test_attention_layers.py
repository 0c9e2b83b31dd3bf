"""Attention layers: every form agrees with the materialized mixing weights; masks; errors.

Gradient equivalence of the kernels is tested in test_attention_kernels.py; here the forms are
compared on outputs (the layers only add linear projections), and parameter gradients are
checked to be finite with padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmix
from ssmix.kernels.attention import _common as attention_common
from ssmix.kernels.attention import softmax as attention_softmax
from ssmix.layers import Attention, KroneckerAttention, TensorAttention
from ssmix.testing import assert_close, check_equivalent

B, L, F, HEADS = 2, 12, 8, 2
MASK = jnp.asarray(np.arange(L)[None, :] < np.array([[7], [12]]))


def _x(seed=0, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), (B, L, F))


def _projections(layer, x, parts):
    """The per-head projections ``parts × (B, L, heads, head_dim)`` the layer computes."""
    y = layer.in_proj(x).reshape(x.shape[:2] + (parts, layer.num_heads, layer.head_dim))
    return [y[:, :, i] for i in range(parts)]


def _assert_padding_has_no_influence(fn, x):
    poked = x.at[0, 7:].set(25.0)
    assert_close(fn(x)[0, :7], fn(poked)[0, :7], atol=1e-5)


def test_attention_forms_agree():
    make = lambda block_size: Attention(
        F, num_heads=HEADS, causal=True, block_size=block_size, rngs=nnx.Rngs(0)
    )
    layer, blocked = make(None), make(5)

    def materialized(x):
        w = layer.materialize(x, MASK)
        v = _projections(layer, x, 3)[2]
        return layer.out_proj(jnp.einsum("bhlm,bmhd->blhd", w, v).reshape(x.shape[:2] + (-1,)))

    impls = {
        "materialized": materialized,
        "layer": lambda x: layer(x, MASK),
        "blocked": lambda x: blocked(x, MASK),
    }
    impls = {k: jax.jit(f) for k, f in impls.items()}
    check_equivalent(impls, _x(), grads=False)
    _assert_padding_has_no_influence(impls["blocked"], _x())


@pytest.fixture
def tiny_tiles(monkeypatch):
    """A 16-byte tile budget and 3-key blocks: the accelerator rules pick the blocked softmax
    (and the query-blocked / chunked tensor forms) at test sizes."""
    monkeypatch.setattr(attention_common, "ACCEL_TILE_BYTES", 16)
    monkeypatch.setattr(attention_softmax, "_MIN_ACCEL_BLOCK", 3)


def _train_fn(make, backend):
    """``(state, x, mask) -> layer(x, mask)`` of a fresh layer, jitted and traced under the
    ``backend`` rules (a fresh jit per backend: a cached trace would keep the other's forms)."""
    graphdef, state = nnx.split(make())

    def run(state, x, mask):
        with ssmix.auto_backend(backend):
            return nnx.merge(graphdef, state)(x, mask)

    return jax.jit(run), state


@pytest.mark.parametrize("n, causal, masked", [(1, False, False), (7, True, True)])
def test_attention_accelerator_rule_matches_dense(x64, tiny_tiles, n, causal, masked):
    """GPU rules (here blocks of 3 keys; 7 is a prime, no multiple of 3) == CPU rules (the
    materialized weights): outputs and gradients w.r.t. parameters and input."""
    make = lambda: Attention(F, num_heads=HEADS, causal=causal, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, n, F), jnp.float64)
    mask = jnp.asarray(np.arange(n)[None, :] < np.array([[max(n - 4, 1)], [n]])) if masked else None
    dense, state = _train_fn(make, "cpu")
    blocked, _ = _train_fn(make, "gpu")
    assert "scan" not in str(jax.make_jaxpr(dense)(state, x, mask))
    assert "scan" in str(jax.make_jaxpr(blocked)(state, x, mask))
    check_equivalent({"cpu rules": dense, "gpu rules": blocked}, state, x, mask)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_forms_lower(tiny_tiles, platform):
    """Forward + backward of the accelerator forms (blocked softmax, query-blocked
    simplicial, rematerialised approx) lower for CUDA and TPU from this CPU host."""
    makes = [
        lambda: Attention(F, num_heads=HEADS, causal=True, rngs=nnx.Rngs(0)),
        lambda: TensorAttention(F, num_heads=HEADS, method="simplicial", w1=3, rngs=nnx.Rngs(0)),
        lambda: TensorAttention(F, num_heads=HEADS, method="approx", rngs=nnx.Rngs(0)),
    ]
    backend = "tpu" if platform == "tpu" else "gpu"
    x = jax.ShapeDtypeStruct((B, 11, F), jnp.float32)
    for make in makes:
        with ssmix.auto_backend(backend):
            graphdef, state = nnx.split(make())
            loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) ** 2)  # noqa: B023
            traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, x)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "func.func public @main" in text and "while" in text


@pytest.mark.parametrize("variant, grid", [("kv", (3, 4)), ("qkv", (2, 2, 3))])
def test_kronecker_attention_matches_materialized(variant, grid):
    layer = KroneckerAttention(F, grid, variant=variant, num_heads=HEADS, rngs=nnx.Rngs(1))

    def materialized(x):
        m = layer.materialize(x, MASK)
        v = _projections(layer, x, 3)[2]
        return layer.out_proj(jnp.einsum("bhlm,bmhd->blhd", m, v).reshape(x.shape[:2] + (-1,)))

    impls = {"materialized": materialized, "layer": lambda x: layer(x, MASK)}
    impls = {k: jax.jit(f) for k, f in impls.items()}
    check_equivalent(impls, _x(), grads=False)
    _assert_padding_has_no_influence(impls["layer"], _x())


def _tensor_materialized(layer):
    def fn(x):
        w = layer.materialize(x, MASK)  # (B, H, L, L, L)
        _, _, _, v1, v2 = _projections(layer, x, 5)
        y = jnp.einsum("bhlij,bihc,bjhc->blhc", w, v1, v2)
        return layer.out_proj(y.reshape(x.shape[:2] + (-1,)))

    return fn


@pytest.mark.parametrize(
    "methods, options",
    [
        (("naive", "blocked"), {}),
        (("blocked", "simplicial"), {"causal": True, "w1": 4, "w2": 6}),
    ],
)
def test_tensor_attention_forms_agree(methods, options):
    layers = {
        m: TensorAttention(F, num_heads=HEADS, method=m, rngs=nnx.Rngs(2), **options)
        for m in methods
    }
    impls = {"materialized": _tensor_materialized(layers[methods[0]])}
    impls.update({m: (lambda x, lay=lay: lay(x, MASK)) for m, lay in layers.items()})
    impls = {k: jax.jit(f) for k, f in impls.items()}
    check_equivalent(impls, _x(), grads=False)
    _assert_padding_has_no_influence(impls[methods[-1]], _x())


@pytest.mark.parametrize("bounded", [False, True])
def test_tensor_attention_approx_close_for_small_entries(bounded):
    """Small inputs keep raw scores small, where the Taylor features are accurate; bounded
    scores (the default of "approx") are exact tensor attention on normalised q, k1, k2, the
    naive layer with ``bounded_scores=True``."""
    exact, approx = (
        TensorAttention(F, num_heads=HEADS, method=m, bounded_scores=bounded, rngs=nnx.Rngs(3))
        for m in ("naive", "approx")
    )
    x = _x(scale=0.3)
    run = jax.jit(lambda x: (exact(x, MASK), approx(x, MASK)))
    assert_close(*run(x), ratio=1e-4)


def test_parameter_gradients_are_finite_with_padding():
    layer = TensorAttention(F, num_heads=HEADS, method="blocked", rngs=nnx.Rngs(4))
    mask = MASK.at[0].set(False)  # one sequence fully padded

    @nnx.jit
    def grads(layer, x):
        return nnx.grad(lambda lay: jnp.sum(lay(x, mask) ** 2))(layer)

    for leaf in jax.tree_util.tree_leaves(grads(layer, _x())):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_layer_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, num_heads=3, rngs=rngs)
    with pytest.raises(ValueError, match="block_size"):
        Attention(F, block_size=0, rngs=rngs)
    layer = Attention(F, num_heads=HEADS, rngs=rngs)
    with pytest.raises(ValueError, match=r"\(B, L, features=8\)"):
        layer(jnp.zeros((L, F)))
    with pytest.raises(
        ValueError, match=r"x must have shape \(B, L, features=8\); got \(2, 12, 9\)"
    ):
        layer(jnp.zeros((B, L, F + 1)))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\)"):
        layer(_x(), jnp.ones((B, L + 1), bool))
    with pytest.raises(TypeError, match="boolean"):
        layer(_x(), jnp.ones((B, L)))

    with pytest.raises(ValueError, match="grid must be"):
        KroneckerAttention(F, (12,), rngs=rngs)
    with pytest.raises(ValueError, match="variant must be one of"):
        KroneckerAttention(F, (3, 4), variant="v", rngs=rngs)
    with pytest.raises(ValueError, match="grid"):
        KroneckerAttention(F, (3, 5), rngs=rngs)(_x())

    with pytest.raises(ValueError, match="method must be one of"):
        TensorAttention(F, method="fast", rngs=rngs)
    with pytest.raises(ValueError, match="causal by definition"):
        TensorAttention(F, method="simplicial", causal=False, rngs=rngs)
    with pytest.raises(ValueError, match="needs causal=True"):
        TensorAttention(F, w1=3, rngs=rngs)
    with pytest.raises(ValueError, match="even"):
        TensorAttention(F, method="approx", degree=3, rngs=rngs)
    with pytest.raises(ValueError, match="windows"):
        TensorAttention(F, method="approx", causal=True, w2=3, rngs=rngs)
