"""Causal and bidirectional long convolutions by FFT, with their direct O(L²) references.

Shapes: ``u (B, L, H)`` (batch, length, features); kernels ``k (H, Lk)`` or ``(C, H, Lk)``
with ``C`` output channels; a kernel may be shorter than ``L`` (missing taps are zero) or
longer (taps beyond ``L − 1`` can never reach an output and are ignored).

The transforms run along the last axis of ``u`` transposed once to ``(B, H, L)`` (XLA's
FFT acts on minor dimensions; an FFT along the length axis of ``(B, L, H)`` would copy the
activations and their complex spectra around every transform). Zero padding to a 5-smooth
size of at least ``L + Lk − 1`` makes the circular convolution computed by the FFT equal the
linear one, so there is never wrap-around.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssmix._checks import check_ndim

__all__ = [
    "fft_conv",
    "fft_conv_bidirectional",
    "fft_conv_naive",
    "fft_conv_bidirectional_naive",
    "fft_size",
]


@functools.lru_cache(maxsize=None)
def fft_size(n: int) -> int:
    """Smallest even 5-smooth integer (2^a·3^b·5^c) that is at least ``n``.

    Such sizes are fast for the FFT libraries behind XLA while padding far less than the next
    power of two would (e.g. 2000 instead of 2048 for ``n = 1999``).
    """
    if n < 2:
        return 2
    best = None
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = p35 * 2  # even, so the real FFT has an exact half spectrum
            while m < n:
                m *= 2
            if best is None or m < best:
                best = m
            p35 *= 3
        p5 *= 5
    return best


def _check_inputs(u, k, D, name="k"):
    check_ndim("u", u, 3, "(B, L, H)")
    check_ndim(name, k, (2, 3), "(H, Lk) or (C, H, Lk)")
    H = u.shape[2]
    if k.shape[-2] != H:
        raise ValueError(
            f"{name} must have shape (H, Lk) or (C, H, Lk) with H = {H} (from u {u.shape}); "
            f"got {k.shape}"
        )
    if k.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one tap; got shape {k.shape}")
    if D is not None:
        expected = k.shape[:-1]
        if D.shape != expected:
            raise ValueError(
                f"D must have shape {expected} to match {name} {k.shape}; got {D.shape}"
            )


def _compute_dtype(*arrays):
    """float32 for half-precision inputs (accumulate in float32), else the promoted type."""
    dtype = jnp.result_type(*[a.dtype for a in arrays if a is not None])
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"fft_conv expects real floating-point inputs; got dtype {dtype}")
    return jnp.promote_types(dtype, jnp.float32)


def _apply(u: jax.Array, k: jax.Array, n: int, D, out_dtype) -> jax.Array:
    """Circular convolution of ``u (B, L, H)`` with the zero-padded kernel ``k (…, H, ≤n)``.

    Transforms along the last axis of ``u`` transposed to ``(B, H, L)`` (module docstring);
    the two real transposes are about 1.3× cheaper on the whole forward + backward pass than
    FFTs along axis 1 (B = 16, L = 4096, H = 128 on CPU, ``benchmarks/s4.py``).
    """
    B, L, H = u.shape
    u_f = jnp.fft.rfft(jnp.swapaxes(u, 1, 2), n=n, axis=-1)  # (B, H, F)
    k_f = jnp.fft.rfft(k, n=n, axis=-1)  # (H, F) or (C, H, F)
    if k.ndim == 3:  # channels: output (B, L, C, H)
        y = jnp.fft.irfft(u_f[:, None] * k_f[None], n=n, axis=-1)[..., :L]  # (B, C, H, L)
        y = jnp.moveaxis(y, -1, 1)
    else:
        y = jnp.swapaxes(jnp.fft.irfft(u_f * k_f[None], n=n, axis=-1)[..., :L], 1, 2)
    if D is not None:
        skip = u[:, :, None, :] * D if k.ndim == 3 else u * D
        y = y + skip
    return y.astype(out_dtype)


@jax.jit
def fft_conv(u: jax.Array, k: jax.Array, D: jax.Array | None = None) -> jax.Array:
    """Causal convolution ``y_t = Σ_{s≤t} k[t−s]·u_s (+ D·u_t)`` per feature, by FFT.

    Args:
      u: input ``(B, L, H)``, any ``L ≥ 1``.
      k: kernel ``(H, Lk)`` or ``(C, H, Lk)``; ``Lk`` may differ from ``L``.
      D: optional skip ``(H,)`` (or ``(C, H)`` with channels).

    Returns:
      ``(B, L, H)``, or ``(B, L, C, H)`` for a kernel with ``C`` output channels, in the
      promoted dtype of the inputs (half-precision inputs are computed in float32 and cast
      back).
    """
    _check_inputs(u, k, D)
    out_dtype = jnp.result_type(u, k) if D is None else jnp.result_type(u, k, D)
    dtype = _compute_dtype(u, k, D)
    L = u.shape[1]
    k = k[..., :L].astype(dtype)
    n = fft_size(L + k.shape[-1] - 1)
    D = None if D is None else D.astype(dtype)
    return _apply(u.astype(dtype), k, n, D, out_dtype)


@jax.jit
def fft_conv_bidirectional(
    u: jax.Array, k_fwd: jax.Array, k_bwd: jax.Array, D: jax.Array | None = None
) -> jax.Array:
    """Non-causal convolution with a forward (past) and a backward (future) kernel, by FFT.

    ``y_t = Σ_{s≤t} k_fwd[t−s]·u_s + Σ_{s>t} k_bwd[s−t−1]·u_s (+ D·u_t)``: the backward
    kernel's tap 0 acts on the next position. Both kernels are folded into one circular
    kernel of size ``n ≥ Lf + Lb`` (forward taps at lags 0…Lf−1, backward taps at lags
    −1…−Lb), so the cost equals one causal convolution.

    Args:
      u: input ``(B, L, H)``.
      k_fwd, k_bwd: ``(H, Lk)`` or ``(C, H, Lk)``, same leading shape, any lengths.
      D: optional skip ``(H,)`` (or ``(C, H)``).

    Returns:
      ``(B, L, H)`` or ``(B, L, C, H)``.
    """
    _check_inputs(u, k_fwd, D, "k_fwd")
    _check_inputs(u, k_bwd, None, "k_bwd")
    if k_fwd.shape[:-1] != k_bwd.shape[:-1]:
        raise ValueError(
            f"k_fwd and k_bwd must agree except in length; got {k_fwd.shape} and {k_bwd.shape}"
        )
    out_dtype = jnp.result_type(u, k_fwd, k_bwd, *([] if D is None else [D]))
    dtype = _compute_dtype(u, k_fwd, k_bwd, D)
    L = u.shape[1]
    k_fwd = k_fwd[..., :L].astype(dtype)
    # Backward taps beyond L − 2 would act on positions past the end of the sequence.
    k_bwd = k_bwd[..., : max(L - 1, 1)].astype(dtype)
    lf, lb = k_fwd.shape[-1], k_bwd.shape[-1]
    # Circular lags d ∈ (−L, L) must not alias onto kernel taps: positive lags up to L − 1
    # must stay below the backward block (n − lb > L − 1) and negative lags down to −(L − 1)
    # must stay above the forward block (n − L + 1 ≥ lf).
    n = fft_size(max(L + lb, L + lf - 1))
    pad = [(0, 0)] * (k_fwd.ndim - 1)
    combined = jnp.concatenate(
        [
            jnp.pad(k_fwd, pad + [(0, n - lf - lb)]),
            jnp.flip(k_bwd, axis=-1),  # lag -m (m = 1..lb) sits at index n - m
        ],
        axis=-1,
    )
    D = None if D is None else D.astype(dtype)
    return _apply(u.astype(dtype), combined, n, D, out_dtype)


def _toeplitz(k: jax.Array, L: int, lag_offset: int) -> jax.Array:
    """Matrix T[..., t, s] = k[..., t − s − lag_offset] where that index is in range, else 0."""
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :] - lag_offset
    valid = (lag >= 0) & (lag < k.shape[-1])
    return jnp.where(valid, jnp.take(k, jnp.clip(lag, 0, k.shape[-1] - 1), axis=-1), 0)


def _direct(u, T, D):
    if T.ndim == 4:  # (C, H, L, L)
        y = jnp.einsum("chts,bsh->btch", T, u)
        return y if D is None else y + u[:, :, None, :] * D
    y = jnp.einsum("hts,bsh->bth", T, u)
    return y if D is None else y + u * D


def fft_conv_naive(u: jax.Array, k: jax.Array, D: jax.Array | None = None) -> jax.Array:
    """Reference for :func:`fft_conv`: the same causal convolution as a direct O(L²) sum."""
    _check_inputs(u, k, D)
    return _direct(u, _toeplitz(k, u.shape[1], 0), D)


def fft_conv_bidirectional_naive(
    u: jax.Array, k_fwd: jax.Array, k_bwd: jax.Array, D: jax.Array | None = None
) -> jax.Array:
    """Reference for :func:`fft_conv_bidirectional` as a direct O(L²) sum."""
    _check_inputs(u, k_fwd, D, "k_fwd")
    _check_inputs(u, k_bwd, None, "k_bwd")
    L = u.shape[1]
    # Backward tap m acts at lag t - s = -(m + 1): T_bwd[t, s] = k_bwd[s - t - 1].
    T = _toeplitz(k_fwd, L, 0) + jnp.swapaxes(_toeplitz(k_bwd, L, 1), -1, -2)
    return _direct(u, T, D)
