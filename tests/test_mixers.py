"""Matrix mixers: fast forms equal their materialised matrices, padding, structure, pieces."""

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


@pytest.mark.parametrize("kind", KINDS)
def test_fast_form_equals_materialized_matrix(x64, kind):
    # The structured forward pass equals building M explicitly and multiplying, for the
    # data-dependent and -independent forms, on a padded batch. (The fast forms' gradients are
    # those of their kernels, which their own tests compare: ssd / quasiseparable, fft_conv.)
    layers = [mixer(kind, dd) for dd in variants(kind)]
    graphs, states = zip(*(nnx.split(m) for m in layers), strict=True)
    x, mask = padded_batch([11, 6], 11)

    def impl(mode):
        def run(states, x):
            outs = []
            for graph, state in zip(graphs, states, strict=True):
                layer = nnx.merge(graph, state)
                layer.mode = mode
                outs.append(layer(x, mask))
            return outs

        return jax.jit(run)

    check_equivalent({m: impl(m) for m in ("materialized", "fast")}, to64(states), x, grads=False)


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


def test_tiled_forms_equal_materialized_matrix(x64):
    # The accelerator forms (row tiles / key blocks, traced under the GPU rules) equal the
    # materialised matrix in values and gradients on a padded batch, with tiles of 4 over
    # L = 11 (3 tiles, the last one padded); a data-independent kind checks the shared matrix.
    # One program for all of them (compiling dominates).
    layers = [mixer(kind, kind != "cauchy", block_size=4) for kind in TILED_KINDS]
    states = to64(tuple(nnx.split(m)[1] for m in layers))
    x, mask = padded_batch([11, 6], 11)
    impls = {
        "materialized": run_layers(layers, "materialized", "cpu", mask),
        "gpu rules": run_layers(layers, "fast", "gpu", mask),
    }
    check_equivalent(impls, states, x)


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
    # The tiled forms (row tiles with checkpointing, blocked attention) and the loop-free short
    # convolution lower for the accelerators from this CPU host, forward and backward.
    layers = [mixer(kind, True, block_size=4) for kind in ("vandermonde", "attention")]
    grad, states = layer_grad(layers, backend)
    x = jnp.zeros((2, 11, 8))
    jax.jit(grad).trace(states, x).lower(lowering_platforms=(platform,))


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


def conv_reference(x, w, b, mask):
    """Masked depthwise "same" convolution by XLA's grouped convolution primitive."""
    K, C = w.shape
    left = (K - 1) // 2
    valid = mask[..., None]
    y = lax.conv_general_dilated(
        jnp.where(valid, x, 0),
        w[:, None, :],
        (1,),
        [(left, K - 1 - left)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=C,
    )
    return jnp.where(valid, y + b, 0)


def test_short_conv_forms_match_depthwise_convolution(x64):
    # The CPU form (per-batch loop) and the accelerator form (whole batch) equal XLA's grouped
    # convolution in values and gradients, for odd and even K, L < K, L = 1 and a padded row.
    # All cases (K, L) run in one program per form (compiling dominates).
    cases = [(7, 9), (4, 3), (2, 1)]
    graphs, states = zip(
        *(nnx.split(ShortConv(5, K, rngs=nnx.Rngs(K))) for K, _ in cases), strict=True
    )
    xs = [jax.random.normal(jax.random.PRNGKey(L), (2, L, 5), jnp.float64) for _, L in cases]
    masks = [jnp.arange(L)[None, :] < jnp.array([[L], [max(1, L // 2)]]) for _, L in cases]

    def form(backend):
        def run(states, xs):
            with ssmix.auto_backend(backend):
                layers = [nnx.merge(g, s) for g, s in zip(graphs, states, strict=True)]
                return [f(x, m) for f, x, m in zip(layers, xs, masks, strict=True)]

        return jax.jit(run)

    @jax.jit
    def reference(states, xs):
        return [
            conv_reference(x, s["weight"][...], s["bias"][...], m)
            for s, x, m in zip(states, xs, masks, strict=True)
        ]

    impls = {"reference": reference, "cpu": form("cpu"), "gpu": form("gpu")}
    check_equivalent(impls, to64(states), xs)


def test_short_conv_padding_and_loops():
    conv = ShortConv(5, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 5))
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [4]])
    y = conv(jnp.where(mask[..., None], x, 1e3), mask)
    assert_close(conv(x[1:, :4])[0], y[1, :4])
    assert bool(jnp.all(y[1, 4:] == 0))
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
