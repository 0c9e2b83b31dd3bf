"""FFT convolutions against the direct O(L²) sums: outputs and gradients, never circular."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmix.kernels.fftconv import (
    fft_conv,
    fft_conv_bidirectional,
    fft_conv_bidirectional_naive,
    fft_conv_naive,
    fft_size,
)
from ssmix.testing import assert_close, check_equivalent

LENGTHS = [1, 2, 7, 97, 128, 1000]


def _inputs(key, B, L, H, Lk, dtype, channels=None):
    k1, k2, k3 = jax.random.split(key, 3)
    u = jax.random.normal(k1, (B, L, H), dtype)
    kshape = (H, Lk) if channels is None else (channels, H, Lk)
    k = jax.random.normal(k2, kshape, dtype) / jnp.sqrt(Lk).astype(dtype)
    D = jax.random.normal(k3, kshape[:-1], dtype)
    return u, k, D


@pytest.mark.parametrize("L", LENGTHS)
def test_causal_matches_direct(float_dtype, L):
    u, k, D = _inputs(jax.random.PRNGKey(L), 2, L, 3, L, float_dtype)
    check_equivalent({"direct": fft_conv_naive, "fft": fft_conv}, u, k, D)


@pytest.mark.parametrize("L", LENGTHS)
def test_bidirectional_matches_direct(float_dtype, L):
    u, kf, D = _inputs(jax.random.PRNGKey(L), 2, L, 3, L, float_dtype)
    kb = jax.random.normal(jax.random.PRNGKey(L + 100), kf.shape, float_dtype) / jnp.sqrt(L)
    check_equivalent(
        {"direct": fft_conv_bidirectional_naive, "fft": fft_conv_bidirectional}, u, kf, kb, D
    )


@settings(max_examples=4)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 70),
    H=st.integers(1, 4),
    Lk=st.integers(1, 90),
    Lb=st.integers(1, 90),
    channels=st.sampled_from([None, 1, 2]),
    with_D=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, L, H, Lk, Lb, channels, with_D, seed):
    """Kernels shorter or longer than the input, with or without channels and skip."""
    with jax.enable_x64(True):
        u, k, D = _inputs(jax.random.PRNGKey(seed), B, L, H, Lk, jnp.float64, channels)
        kb = jax.random.normal(jax.random.PRNGKey(seed + 1), k.shape[:-1] + (Lb,), jnp.float64)
        D = D if with_D else None
        check_equivalent({"direct": fft_conv_naive, "fft": fft_conv}, u, k, D)
        check_equivalent(
            {"direct": fft_conv_bidirectional_naive, "fft": fft_conv_bidirectional},
            u,
            k,
            kb,
            D,
        )


def test_channels_layout(x64):
    u, k, D = _inputs(jax.random.PRNGKey(0), 2, 9, 3, 9, jnp.float64, channels=4)
    y = fft_conv(u, k, D)
    assert y.shape == (2, 9, 4, 3)
    for c in range(4):
        assert_close(y[:, :, c], fft_conv(u, k[c], D[c]))


def test_no_circular_wraparound(x64):
    """An impulse at the last position must not reach earlier outputs in the causal form,
    and the backward kernel must not reach positions before the impulse's past."""
    L = 16
    u = jnp.zeros((1, L, 1)).at[0, L - 1, 0].set(1.0)
    k = jnp.ones((1, L))
    assert_close(fft_conv(u, k)[0, :, 0], jnp.zeros(L).at[L - 1].set(1.0))
    u0 = jnp.zeros((1, L, 1)).at[0, 0, 0].set(1.0)
    y = fft_conv_bidirectional(u0, jnp.zeros((1, L)), jnp.ones((1, L)))
    assert_close(y[0, :, 0], jnp.zeros(L))  # nothing lies in the future of every t ≥ 0
    y = fft_conv_bidirectional(u, jnp.zeros((1, L)), jnp.arange(1.0, L + 1)[None])
    # y_t = k_bwd[L − 1 − t − 1] for t < L − 1: the impulse seen from t at distance L−1−t.
    expected = jnp.concatenate([jnp.arange(L - 1.0, 0, -1), jnp.zeros(1)])
    assert_close(y[0, :, 0], expected)


def test_bfloat16_input_keeps_dtype():
    u, k, _ = _inputs(jax.random.PRNGKey(1), 1, 50, 2, 50, jnp.float32)
    y = fft_conv(u.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert_close(fft_conv_naive(u, k), y.astype(jnp.float32), ratio=3e-2)


def test_fft_size_is_smooth_and_large_enough():
    for n in [1, 2, 3, 17, 97, 1000, 1999, 4095, 8193]:
        m = fft_size(n)
        assert m >= n and m % 2 == 0
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1


def test_bad_inputs():
    u = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match=r"u must have shape \(B, L, H\)"):
        fft_conv(jnp.ones((5, 3)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="H = 3"):
        fft_conv(u, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"k must have shape"):
        fft_conv(u, jnp.ones(5))
    with pytest.raises(ValueError, match=r"D must have shape \(3,\)"):
        fft_conv(u, jnp.ones((3, 5)), jnp.ones(4))
    with pytest.raises(ValueError, match="agree except in length"):
        fft_conv_bidirectional(u, jnp.ones((2, 3, 5)), jnp.ones((3, 5)))
    with pytest.raises(TypeError, match="real floating-point"):
        fft_conv(u.astype(jnp.complex64), jnp.ones((3, 5)))
