"""Helpers shared by the forms of :func:`ssmix.kernels.scan.linear_scan`: the recurrence step,
input validation and promotion, and small array utilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def step(state: jax.Array, a_t: jax.Array, b_t: jax.Array) -> jax.Array:
    """One step of the recurrence: ``a_t ⊙ state + b_t`` (shapes broadcast against ``state``)."""
    return a_t * state + b_t


def prepare(a, b, initial_state):
    """Validate shapes, promote dtypes; return (a, b, x0, time_varying, out_dtype)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if b.ndim < 2:
        raise ValueError(f"b must have shape (B, L, *S) with at least 2 axes; got {b.shape}")
    B, L, S = b.shape[0], b.shape[1], b.shape[2:]
    if L < 1:
        raise ValueError(f"the length axis of b (axis 1) must be at least 1; got {b.shape}")
    if a.ndim == b.ndim and b.ndim > len(S):
        time_varying = True
        if a.shape[1] != L or a.shape[0] not in (1, B):
            raise ValueError(
                f"a time-varying decay must have shape (B or 1, L, *S) = (1|{B}, {L}, ...) "
                f"broadcastable to b {b.shape}; got {a.shape}"
            )
    elif a.ndim <= len(S):
        time_varying = False
    else:
        raise ValueError(
            f"a must be constant with a shape broadcastable to S = {S}, or time-varying "
            f"with shape (B or 1, L, *S) for b {b.shape}; got {a.shape}"
        )
    try:
        jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError as err:
        raise ValueError(f"a {a.shape} does not broadcast against b {b.shape}") from err
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        if initial_state.shape != (B, *S):
            raise ValueError(
                f"initial_state must have shape (B, *S) = {(B, *S)}; got {initial_state.shape}"
            )
    if not time_varying:
        # Constant decays get the full rank of S so they align with the state axes.
        a = a.reshape((1,) * (len(S) - a.ndim) + a.shape)
    arrays = [a, b] + ([] if initial_state is None else [initial_state])
    out_dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(out_dtype, jnp.inexact):
        raise TypeError(f"linear_scan expects floating-point or complex inputs; got {out_dtype}")
    # Half-precision inputs accumulate in float32.
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    if initial_state is not None:
        initial_state = initial_state.astype(dtype)
    return a, b, initial_state, time_varying, out_dtype


def slice_t(x, t, axis=1):
    """``x`` at index ``t`` (traced or static) of ``axis``, that axis dropped."""
    return lax.dynamic_index_in_dim(x, t, axis=axis, keepdims=False)


def int_power(a, m):
    """``a ** m`` for integer ``m`` broadcast against ``a``, without NaN at ``a = 0``."""
    mf = m.astype(jnp.finfo(a.dtype).dtype)
    # exp(m·log|a|) with m = 0 and a = 0 would be exp(nan); a^0 is 1.
    mag = jnp.where(m == 0, 1.0, jnp.exp(mf * jnp.log(jnp.abs(a))))
    if jnp.iscomplexobj(a):
        ang = mf * jnp.angle(a)
        return lax.complex(mag * jnp.cos(ang), mag * jnp.sin(ang))
    sign = jnp.where((a < 0) & (m % 2 == 1), -1.0, 1.0)
    return (sign * mag).astype(a.dtype)


def sum_to_shape(x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to it."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


def check_segment_ids(segment_ids, batch: int, length: int, *, name: str = "segment_ids"):
    """Validate packed-sequence ids: an integer ``(batch, length)`` array (``TypeError`` for
    any other dtype, ``ValueError`` for any other shape). Returns it as an array."""
    dtype = getattr(segment_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = dtype if dtype is not None else type(segment_ids).__name__
        raise TypeError(
            f"{name} must be an integer array of shape (B, L) = {(batch, length)} (equal ids = "
            f"same document); got {got}"
        )
    if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape (B, L) = {(batch, length)}; got {tuple(segment_ids.shape)}"
        )
    return jnp.asarray(segment_ids)


def segment_starts(segment_ids: jax.Array, reverse: bool = False) -> jax.Array:
    """``(B, L)`` bool: True where a new segment begins in the direction of the recurrence,
    i.e. where the id differs from the previous position's (``t − 1``; ``t + 1`` when
    ``reverse``). Position 0 (``L − 1`` when ``reverse``) is never a start: the initial state
    belongs to the first segment processed."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # between t and t + 1
    edge = jnp.zeros_like(change[:, :1])
    return jnp.concatenate([change, edge] if reverse else [edge, change], axis=1)


def positions_in_segment(segment_ids: jax.Array) -> jax.Array:
    """``(B, L)`` int: the index of each position within its segment (segments as
    :func:`segment_starts` defines them: contiguous runs of equal ids)."""
    t = jnp.arange(segment_ids.shape[1])
    return t - jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
