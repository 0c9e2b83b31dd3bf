"""Matrix mixers: fast forms equal their materialised matrices, padding, structure, pieces."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import ssmix
from ssmix.layers import MatrixMixer
from ssmix.layers.mixers import (
    DATA_INDEPENDENT_ONLY,
    KINDS,
    TILED_KINDS,
    GatedRMSNorm,
    ShortConv,
    auto_block_size,
    depthwise_conv_same,
)
from ssmix.testing import assert_close, check_equivalent, trace_stats

MAX_LEN = 12


def mixer(kind, data_dependent, seed=0, **kw):
    """d_model 8, expand 2 -> 4 heads of 4 channels, qk_dim 3."""
    kw = dict(max_len=MAX_LEN, qk_dim=3, headdim=4, chunk_size=4, rngs=nnx.Rngs(seed)) | kw
    return MatrixMixer(8, kind, data_dependent=data_dependent, **kw)


def variants(kind):
    return [False] if kind in DATA_INDEPENDENT_ONLY else [True, False]


def to64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def padded_batch(lengths, L, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (len(lengths), L, 8), jnp.float64)
    mask = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
    return jnp.where(mask[..., None], x, 1e3), mask


def run_layers(layers, mode, backend, mask):
    """A fresh jitted ``(states, x) -> [layer(x, mask)]`` in ``mode``, traced for ``backend``."""
    graphs, _ = zip(*(nnx.split(m) for m in layers), strict=True)

    def run(states, x):
        with ssmix.auto_backend(backend):
            outs = []
            for graph, state in zip(graphs, states, strict=True):
                layer = nnx.merge(graph, state)
                layer.mode = mode
                outs.append(layer(x, mask))
            return outs

    return jax.jit(run)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_form_equals_materialized_matrix(x64, kind):
    # The structured forward pass equals building M explicitly and multiplying, for the
    # data-dependent and -independent forms, on a padded batch; for the tiled kinds also the
    # accelerator form (traced under the GPU rules, tiles of 4 over L = 11: the last one
    # padded). Gradients: the SSD and FFT kernels' own tests compare theirs, the tiled
    # products' are compared below.
    layers = [mixer(kind, dd) for dd in variants(kind)]
    states = to64(tuple(nnx.split(m)[1] for m in layers))
    x, mask = padded_batch([11, 6], 11)
    impls = {mode: run_layers(layers, mode, "cpu", mask) for mode in ("materialized", "fast")}
    if kind in TILED_KINDS:
        tiled = [mixer(kind, dd, block_size=4) for dd in variants(kind)]  # same parameters
        impls["gpu rules"] = run_layers(tiled, "fast", "gpu", mask)
    check_equivalent(impls, states, x, grads=False)


def test_tiled_products_equal_matrix_product(x64):
    # The accelerator forms of the mixing step (row tiles for vandermonde / cauchy, key blocks
    # for attention, traced under the GPU rules) equal the full matrix product in values and
    # gradients w.r.t. q, k, v: tiles of 4 over L = 11 (3 tiles, the last one padded), q, k
    # shared by the batch (data-independent) for cauchy, padded keys for attention.
    b, L = 2, 11
    mask = jnp.arange(L)[None, :] < jnp.array([[L], [6]])
    layers = {kind: mixer(kind, kind != "cauchy", block_size=4) for kind in TILED_KINDS}
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 3 * len(layers)))
    args = {}
    for kind in layers:
        qk_batch = 1 if kind == "cauchy" else b
        q, k = (jax.random.normal(next(keys), (qk_batch, L, 4, 3), jnp.float64) for _ in "qk")
        if kind == "cauchy":  # positive, as the layer makes them
            q, k = jnp.exp(q) + 0.5, jnp.exp(k) + 0.5
        args[kind] = (q, k, jax.random.normal(next(keys), (b, L, 4, 4), jnp.float64))

    def form(tiled):
        def run(args):
            out = {}
            with ssmix.auto_backend("gpu"):
                for kind, (q, k, v) in args.items():
                    layer, feats = layers[kind], {"q": q, "k": k}
                    if tiled:
                        out[kind] = layer._mix_fast(v, feats, mask)
                    else:
                        M = jnp.broadcast_to(layer._matrix(feats, mask, b, L), (b, 4, L, L))
                        out[kind] = jnp.einsum("bhts,bshp->bthp", M, v)
            return out

        return jax.jit(run)

    check_equivalent({"matrix": form(False), "tiled": form(True)}, args)


def test_auto_block_size_rules():
    assert auto_block_size("vandermonde", 2, 2, 256, 4, backend="cpu") is None
    assert auto_block_size("vandermonde", 2, 2, 1024, 4, backend="cpu") == 256
    assert auto_block_size("cauchy", 2, 2, 11, 4, backend="cpu") == 11
    # One (2, 2, 1024, 16384) float32 tile is exactly 256 MiB.
    assert auto_block_size("attention", 2, 2, 16384, 4, backend="gpu") == 1024
    assert auto_block_size("cauchy", 1, 2, 16384, 8, backend="tpu") == 1024
    assert auto_block_size("cauchy", 64, 64, 2**20, 4, backend="gpu") == 1
    with pytest.raises(ValueError, match="kind must be one of"):
        auto_block_size("low_rank", 2, 2, 16, 4)


def layer_grad(layers, backend):
    """``grad(Σ layer(x)²)`` over all ``layers`` w.r.t. their states and ``x``, traced for
    ``backend``: a training step's forward and backward."""
    graphs, _ = zip(*(nnx.split(m) for m in layers), strict=True)

    def loss(states, x):
        with ssmix.auto_backend(backend):
            ys = [nnx.merge(g, s)(x) for g, s in zip(graphs, states, strict=True)]
            return sum(jnp.sum(jnp.square(y)) for y in ys)

    return jax.grad(loss, argnums=(0, 1)), tuple(nnx.split(m)[1] for m in layers)


def test_accelerator_rules_bound_loops_and_memory():
    # Forward + backward at B = 2, L = 16384, d_model = 64 (traced only, nothing runs): under
    # the GPU rules at most 64 sequential loop iterations and no array over 256 MiB.
    L = 16384
    x = jax.ShapeDtypeStruct((2, L, 64), jnp.float32)
    for kind in (k for k in KINDS if k not in DATA_INDEPENDENT_ONLY):
        grad, states = layer_grad([MatrixMixer(64, kind, max_len=L, rngs=nnx.Rngs(0))], "gpu")
        stats = trace_stats(grad, states, x)
        assert stats.loop_iterations <= 64, (kind, stats.loops)
        assert stats.largest_bytes <= 256 * 2**20, (kind, stats.largest)
        assert stats.unknown_loops == 0, kind


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_accelerator_forms_lower(platform, backend):
    # The row-tiled form (checkpointed lax.map) and the loop-free short convolution lower for
    # the accelerators from this CPU host, forward and backward.
    grad, states = layer_grad([mixer("vandermonde", True, block_size=4)], backend)
    jax.jit(grad).trace(states, jnp.zeros((2, 11, 8))).lower(lowering_platforms=(platform,))


def test_padding_equals_per_sequence_runs(x64):
    x, mask = padded_batch([10, 4], 10, seed=1)
    configs = [(kind, dd) for kind in KINDS for dd in variants(kind)]
    layers = [
        nnx.merge(*(lambda g, s: (g, to64(s)))(*nnx.split(mixer(k, dd, seed=2))))
        for k, dd in configs
    ]
    # One program for all kinds (compiling them one by one costs more than running them).
    padded = jax.jit(lambda x: [layer(x, mask)[1, :4] for layer in layers])(x)
    alone = jax.jit(lambda x: [layer(x)[0] for layer in layers])(x[1:, :4])
    for (kind, dd), p, a in zip(configs, padded, alone, strict=True):
        assert_close(a, p, name=f"{kind} data_dependent={dd}")


@pytest.mark.parametrize("data_dependent", [True, False])
def test_toeplitz_is_truly_toeplitz(x64, data_dependent):
    layer = nnx.merge(*(lambda g, s: (g, to64(s)))(*nnx.split(mixer("toeplitz", data_dependent))))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 8), jnp.float64)
    M = np.asarray(layer.materialize(x))
    # M[i, j] depends on i − j only: every diagonal is constant.
    np.testing.assert_allclose(M[..., 1:, 1:], M[..., :-1, :-1], rtol=0, atol=1e-14)
    if not data_dependent:
        # ... and equals the learned tap k[i − j] (plus the skip D on the diagonal).
        taps, D = np.asarray(layer.taps[...]), np.asarray(layer.D[...])
        lag = np.arange(9)[:, None] - np.arange(9)[None, :]
        expected = taps[:, MAX_LEN - 1 + lag] + D[:, None, None] * np.eye(9)
        np.testing.assert_allclose(M[0], expected, rtol=1e-12, atol=1e-14)


def test_data_independent_matrices_ignore_the_input():
    x1, x2 = (jax.random.normal(jax.random.PRNGKey(s), (1, 7, 8)) for s in (4, 5))
    layer = mixer("quasiseparable", False)
    assert_close(layer.materialize(x1), layer.materialize(x2))
    layer = mixer("attention", True)
    assert not np.allclose(layer.materialize(x1), layer.materialize(x2))


def conv_reference(x, w):
    """Depthwise "same" convolution by XLA's grouped convolution primitive."""
    K, C = w.shape
    left = (K - 1) // 2
    dims = ("NWC", "WIO", "NWC")
    pad = [(left, K - 1 - left)]
    return lax.conv_general_dilated(
        x, w[:, None, :], (1,), pad, dimension_numbers=dims, feature_group_count=C
    )


def test_depthwise_conv_forms_match_grouped_convolution(x64):
    # The CPU form (per-batch loop) and the accelerator form (whole batch) equal XLA's grouped
    # convolution in values and gradients, for odd and even K, L < K and L = 1. All cases
    # (K, L) run in one program per form (compiling dominates).
    cases = [(7, 9), (4, 3), (2, 1)]
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(cases))
    ws = [jax.random.normal(keys[2 * i], (K, 5), jnp.float64) for i, (K, _) in enumerate(cases)]
    xs = [
        jax.random.normal(keys[2 * i + 1], (2, L, 5), jnp.float64) for i, (_, L) in enumerate(cases)
    ]

    def form(conv):
        return jax.jit(lambda ws, xs: [conv(x, w) for w, x in zip(ws, xs, strict=True)])

    impls = {"grouped convolution": form(conv_reference)}
    for backend in ("cpu", "gpu"):
        impls[backend] = form(functools.partial(depthwise_conv_same, backend=backend))
    check_equivalent(impls, ws, xs)


def test_short_conv_padding_and_loops():
    # Under both rules, a right-padded sequence gets its unpadded result and zeros beyond it.
    conv = ShortConv(5, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 5))
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [4]])
    for backend in ("cpu", "gpu"):
        with ssmix.auto_backend(backend):
            padded, alone = jax.jit(
                lambda x: (conv(jnp.where(mask[..., None], x, 1e3), mask), conv(x[1:, :4]))
            )(x)
        assert_close(alone[0], padded[1, :4])
        assert bool(jnp.all(padded[1, 4:] == 0))
    # Forward and backward: one loop step per batch element under the CPU rule, none under the
    # accelerator rules.
    w = conv.weight[...]
    grad = jax.grad(lambda x, w: jnp.sum(depthwise_conv_same(x, w) ** 2), argnums=(0, 1))
    for backend, loops in (("cpu", 3 * 2), ("gpu", 0), ("tpu", 0)):
        with ssmix.auto_backend(backend):
            assert trace_stats(grad, x, w).loop_iterations == loops, backend


def test_gated_rms_norm():
    norm = GatedRMSNorm(6)
    norm.weight = nnx.Param(jnp.arange(1.0, 7.0))
    y, z = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 3, 6))
    rms = jnp.sqrt(jnp.mean(y**2, axis=-1, keepdims=True) + 1e-5)
    assert_close(y / rms * jnp.arange(1.0, 7.0) * jax.nn.silu(z), norm(y, z))
    with pytest.raises(ValueError, match="same shape"):
        norm(y, z[..., :3])


def test_matrix_mixer_rejects_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="kind must be one of"):
        mixer("circulant", True)
    with pytest.raises(ValueError, match="only a data-independent form"):
        mixer("dense", True)
    with pytest.raises(ValueError, match="mode must be one of"):
        mixer("toeplitz", True, mode="chunked")
    with pytest.raises(ValueError, match="ssd_method must be one of"):
        mixer("semiseparable", True, ssd_method="scan")
    with pytest.raises(ValueError, match="ssd_method applies to the kinds"):
        mixer("attention", True, ssd_method="parallel")
    with pytest.raises(ValueError, match="block_size applies to the kinds"):
        mixer("low_rank", True, block_size=4)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        mixer("cauchy", True, block_size=0)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        mixer("toeplitz", False, max_len=0)
    with pytest.raises(ValueError, match="divisible by headdim"):
        mixer("low_rank", True, headdim=5)
    layer = mixer("low_rank", True)
    with pytest.raises(ValueError, match="exceeds max_len"):
        layer(jnp.zeros((1, MAX_LEN + 1, 8)))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\)"):
        layer(jnp.zeros((1, 5, 8)), jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="channels"):
        ShortConv(4, 3, rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 3)))
