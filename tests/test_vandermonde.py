"""Diagonal SSM kernels: Vandermonde kernel, state forwarding and the chunked convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmix.kernels import vandermonde as V
from ssmix.kernels.fftconv import fft_conv, fft_conv_bidirectional
from ssmix.testing import assert_close
from ssmix.testing import check_equivalent as _check_equivalent

H, N2, BATCH = 3, 4, 2


def check_equivalent(impls, *args, **kwargs):
    """The harness with every implementation jitted (eager dispatch under grad is slow)."""
    return _check_equivalent({k: jax.jit(f) for k, f in impls.items()}, *args, **kwargs)


def _cplx(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), dtype)


def _system(dtype, seed=0, channels=None, dt_per_mode=False):
    """Random stable modes (Re A < 0), B, C and Δ of the given real dtype."""
    rng = np.random.default_rng(seed)
    cdtype = jnp.promote_types(dtype, jnp.complex64)
    A = jnp.asarray(-rng.uniform(0.1, 1.0, (H, N2)) + 1j * rng.normal(0, 3, (H, N2)), cdtype)
    B = _cplx(rng, (H, N2), cdtype)
    C = _cplx(rng, (H, N2) if channels is None else (channels, H, N2), cdtype)
    dt_shape = (H, N2) if dt_per_mode else (H,)
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-2), np.log(0.5), dt_shape)), dtype)
    return A, B, C, dt


LENGTHS = (1, 2, 97)


def test_kernel_matches_naive_tensor_float64(x64):
    """Every discretisation and length (1, 2, odd), values and gradients, in one compile."""
    A, B, C, dt = _system(jnp.float64)

    def kernels(kernel_fn):
        def run(A, B, C, dt):
            return {
                (disc, L): kernel_fn(A, B, C, dt, L, disc, l_norm=50)
                for disc in V.DISCS
                for L in LENGTHS
            }

        return run

    check_equivalent(
        {"naive": kernels(V.diag_ssm_kernel_naive), "fast": kernels(V.diag_ssm_kernel)},
        A,
        B,
        C,
        dt,
    )


def test_kernel_matches_naive_tensor_float32():
    A, B, C, dt = _system(jnp.float32)
    for L in LENGTHS:
        K = V.diag_ssm_kernel(A, B, C, dt, L)
        assert K.dtype == jnp.float32
        assert_close(V.diag_ssm_kernel_naive(A, B, C, dt, L), K)


@pytest.mark.parametrize("L", [5, 64])
def test_kernel_channels_and_per_mode_dt(x64, L):
    A, B, C, dt = _system(jnp.float64, channels=2, dt_per_mode=True)
    K = V.diag_ssm_kernel(A, B, C, dt, L, "bilinear")
    assert K.shape == (2, H, L) and K.dtype == jnp.float64
    assert_close(V.diag_ssm_kernel_naive(A, B, C, dt, L, "bilinear"), K)


def test_kernel_memory_is_linear_in_length():
    """No (H, N/2, L) tensor: XLA's temp memory stays a small multiple of the output."""
    A, B, C, dt = _system(jnp.float32)
    Hb, N2b, L = 4, 32, 1 << 16
    A = jnp.broadcast_to(A[:1, :1], (Hb, N2b))
    B = C = jnp.ones((Hb, N2b), jnp.complex64)
    dt = jnp.full((Hb,), 0.01, jnp.float32)
    fn = jax.jit(lambda A, B, C, dt: V.diag_ssm_kernel(A, B, C, dt, L))
    stats = fn.lower(A, B, C, dt).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    out_bytes = Hb * L * 4
    tensor_bytes = Hb * N2b * L * 8  # what the naive form allocates
    assert stats.temp_size_in_bytes < 8 * out_bytes < tensor_bytes


def test_state_forward_and_output_match_loops(x64):
    """Next state and the output contribution of an initial state, values and gradients."""
    L = 9
    A, B, C, dt = _system(jnp.float64, channels=2)
    log_dA, dB = V.discretize_diag(A, B, dt, "zoh")
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(BATCH, L, H)))
    x0 = _cplx(rng, (BATCH, H, N2), log_dA.dtype)

    def both(forward, output):
        def run(log_dA, dB, C, u, x0):
            return forward(log_dA, dB, u, x0), output(log_dA, C, x0, L), forward(log_dA, dB, u)

        return run

    check_equivalent(
        {
            "loop": both(V.diag_state_forward_naive, V.diag_state_output_naive),
            "fast": both(V.diag_state_forward, V.diag_state_output),
        },
        log_dA,
        dB,
        C,
        u,
        x0,
    )
    one = C[0]
    assert_close(
        V.diag_state_output_naive(log_dA, one, x0, L), V.diag_state_output(log_dA, one, x0, L)
    )


@pytest.mark.parametrize("L, T", [(1, 4), (13, 3)])
def test_chunked_conv_matches_loop_fft_and_state_maps(x64, L, T):
    A, B, C, dt = _system(jnp.float64, channels=2)
    log_dA, dB = V.discretize_diag(A, B, dt, "bilinear")
    rng = np.random.default_rng(2)
    u = jnp.asarray(rng.normal(size=(BATCH, L, H)))
    x0c = _cplx(rng, (BATCH, H, N2), jnp.complex128)
    x0 = jnp.concatenate([x0c.real, x0c.imag], axis=-1)
    ops = V.diag_chunk_operators(log_dA, dB, C, T)
    y, xf = V.chunked_ssm_conv(u, ops, x0, return_state=True)
    y_loop, x_loop = V.chunked_ssm_conv_naive(u, ops, x0)
    assert_close(y_loop, y)
    assert_close(x_loop, xf)
    K = V.vandermonde_kernel(log_dA, C * dB, L)
    assert_close(fft_conv(u, K) + V.diag_state_output(log_dA, C, x0c, L), y)
    xs = V.diag_state_forward(log_dA, dB, u, x0c)
    assert_close(jnp.concatenate([xs.real, xs.imag], axis=-1), xf)
    assert_close(xf, V.chunked_state_forward(u, ops, x0))
    assert_close(V.chunked_ssm_conv(jnp.zeros_like(u), ops, x0), V.chunked_state_output(ops, x0, L))


@pytest.mark.parametrize("L, T, dtype", [(1, 2, "float32"), (8, 8, "float32"), (11, 4, "float64")])
def test_chunked_bidirectional_matches_fft(L, T, dtype):
    """Values in float32 (gradients at the causal test), values and gradients in float64."""
    with jax.enable_x64(dtype == "float64"):
        _bidirectional_case(L, T, jnp.dtype(dtype))


def _bidirectional_case(L, T, float_dtype):
    A, B, C, dt = _system(float_dtype, channels=1)
    C_b = C * (0.5 - 0.3j)
    rng = np.random.default_rng(3)
    u = jnp.asarray(rng.normal(size=(BATCH, L, H)), float_dtype)

    def fft_form(u, B, C, C_b, dt):
        log_dA, dB = V.discretize_diag(A, B, dt)
        k_f = V.vandermonde_kernel(log_dA, C * dB, L)
        return fft_conv_bidirectional(u, k_f, V.vandermonde_kernel(log_dA, C_b * dB, L))

    def chunked(u, B, C, C_b, dt):
        log_dA, dB = V.discretize_diag(A, B, dt)
        ops_f = V.diag_chunk_operators(log_dA, dB, C, T)
        ops_b = V.diag_chunk_operators(log_dA, dB, C_b, T, strict=True)
        return V.chunked_ssm_conv_bidirectional(u, ops_f, ops_b)

    grads = float_dtype == jnp.float64
    check_equivalent({"fft": fft_form, "chunked": chunked}, u, B, C, C_b, dt, grads=grads)


def test_bad_input_raises():
    A, B, C, dt = _system(jnp.float32)
    with pytest.raises(ValueError, match="disc must be one of"):
        V.diag_ssm_kernel(A, B, C, dt, 8, "euler")
    with pytest.raises(ValueError, match="pass l_norm"):
        V.diag_ssm_kernel(A, B, C, dt, 8, "dss")
    with pytest.raises(ValueError, match="L must be a positive integer"):
        V.diag_ssm_kernel(A, B, C, dt, 0)
    with pytest.raises(ValueError, match="B must have the shape of A"):
        V.diag_ssm_kernel(A, B[:, :2], C, dt, 8)
    with pytest.raises(ValueError, match="dt must have shape"):
        V.diag_ssm_kernel(A, B, C, dt[:2], 8)
    with pytest.raises(ValueError, match="C must have shape"):
        V.diag_ssm_kernel(A, B, C[:, :2], dt, 8)
    log_dA, dB = V.discretize_diag(A, B, dt)
    with pytest.raises(ValueError, match=r"u must have shape \(B, L, H\)"):
        V.diag_state_forward(log_dA, dB, jnp.zeros((4, H)))
    with pytest.raises(ValueError, match="state must have shape"):
        V.diag_state_output(log_dA, C, jnp.zeros((2, H, N2 + 1), jnp.complex64), 4)
    ops = V.diag_chunk_operators(log_dA, dB, C[None], 4)
    with pytest.raises(ValueError, match="chunk operators must have shapes"):
        V.chunked_ssm_conv(jnp.zeros((2, 8, H + 1)), ops)
    with pytest.raises(ValueError, match="state must have shape"):
        V.chunked_ssm_conv(jnp.zeros((2, 8, H)), ops, jnp.zeros((2, H, 3)))
