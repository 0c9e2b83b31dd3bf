"""Matrix mixers: fast forms equal their materialised matrices, padding, structure, pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ssmix.layers import MatrixMixer
from ssmix.layers.mixers import DATA_INDEPENDENT_ONLY, KINDS, GatedRMSNorm, ShortConv
from ssmix.testing import assert_close, check_equivalent

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


@pytest.mark.parametrize("K", [7, 4, 1])
def test_short_conv_matches_depthwise_convolution(x64, K):
    conv = ShortConv(5, K, rngs=nnx.Rngs(0))
    w, b = conv.weight[...].astype(jnp.float64), conv.bias[...].astype(jnp.float64)
    conv.weight, conv.bias = nnx.Param(w), nnx.Param(b)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 5), jnp.float64)
    left = (K - 1) // 2
    ref = lax.conv_general_dilated(
        x,
        w[:, None, :],
        (1,),
        [(left, K - 1 - left)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=5,
    )
    assert_close(ref + b, conv(x))
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [4]])
    y = conv(jnp.where(mask[..., None], x, 1e3), mask)
    assert_close(conv(x[1:, :4])[0], y[1, :4])
    assert bool(jnp.all(y[1, 4:] == 0))


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
