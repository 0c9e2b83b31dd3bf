"""Diagonal linear recurrences ``x_t = a_t ⊙ x_{t−1} + b_t`` along the time axis.

Shapes: ``b (B, L, *S)`` (batch, length, any state shape ``S``, real or complex). The decay
``a`` is either constant, of a shape broadcastable to ``S`` (the LTI case: it is never
broadcast to the length in memory), or time-varying, of the same rank as ``b`` and
broadcastable to it with length ``L`` on axis 1 (e.g. ``(1, L, *S)`` shared by the batch).
``initial_state (B, *S)`` is the state before the first step (after the last one for
``reverse=True``, where ``x_t = a_t ⊙ x_{t+1} + b_t``).

Three methods compute the same thing:

- ``"sequential"``: one step per time index (``lax.fori_loop`` updating the output in place,
  so the activations are never transposed to time-major layout).
- ``"associative"``: ``lax.associative_scan`` with the operator
  ``(a_i, b_i) ∘ (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``; for a constant decay the first
  element of each pair is the integer segment length ``m`` and the product is ``a^m``.
- ``"chunked"``: the time axis is cut into chunks of ``T`` steps. A decay-weighted sum over
  each chunk (a contraction with the weights ``a^(T−1−t)`` when ``a`` is constant) gives
  every chunk's contribution to its end state; a short recurrence over the ``L/T`` chunk
  summaries gives every chunk's incoming state; a final pass runs the recurrence inside all
  chunks at once, starting from those states. ``T + L/T`` dependent steps instead of ``L``,
  each over a ``L/T``-times larger slab, with two reads of ``b`` and one write of the states.

Gradients: the adjoint of a linear recurrence is the same recurrence run the other way
(``λ_t = g_t + a_{t+1} λ_{t+1}``), so every method differentiates by calling itself in
reverse (a ``custom_vjp``), as fast as the forward pass and without storing anything but
the states. Forward-mode differentiation (``jax.jvp``) is therefore not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssmix._checks import check_choice, check_positive_int

__all__ = ["linear_scan", "linear_scan_naive", "step", "METHODS"]

METHODS = ("sequential", "associative", "chunked")


def step(state: jax.Array, a_t: jax.Array, b_t: jax.Array) -> jax.Array:
    """One step of the recurrence: ``a_t ⊙ state + b_t`` (shapes broadcast against ``state``)."""
    return a_t * state + b_t


def _prepare(a, b, initial_state):
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


@functools.partial(jax.jit, static_argnames=("reverse", "method", "chunk_size"))
def linear_scan(
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    reverse: bool = False,
    method: str = "chunked",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Run ``x_t = a_t ⊙ x_{t−1} + b_t`` over axis 1 and return all states and the last one.

    Args:
      a: decay, constant ``(*S')`` broadcastable to ``S`` or time-varying ``(B|1, L, *S')``.
      b: input ``(B, L, *S)``, real or complex.
      initial_state: ``(B, *S)`` state before the first step; zeros when omitted.
      reverse: run from ``t = L − 1`` down to 0 (``x_t = a_t ⊙ x_{t+1} + b_t``).
      method: ``"sequential"``, ``"associative"`` or ``"chunked"`` (module docstring).
      chunk_size: chunk length ``T`` of the chunked method (any positive integer; ``L`` need
        not be a multiple of it).

    Returns:
      ``(states (B, L, *S), final_state (B, *S))`` in the promoted dtype of the inputs;
      ``final_state`` is ``states[:, -1]`` (``states[:, 0]`` for ``reverse=True``).
    """
    check_choice("method", method, METHODS)
    check_positive_int("chunk_size", chunk_size)
    a, b, x0, time_varying, out_dtype = _prepare(a, b, initial_state)
    states, final = _scan(a, b, x0, bool(reverse), method, int(chunk_size), time_varying)
    return states.astype(out_dtype), final.astype(out_dtype)


def linear_scan_naive(
    a: jax.Array, b: jax.Array, initial_state: jax.Array | None = None, *, reverse: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Reference for :func:`linear_scan`: a Python loop over time (slow, obviously right)."""
    a, b, x0, time_varying, out_dtype = _prepare(a, b, initial_state)
    L = b.shape[1]
    x = jnp.zeros(b.shape[:1] + b.shape[2:], b.dtype) if x0 is None else x0
    out = [None] * L
    for t in reversed(range(L)) if reverse else range(L):
        x = step(x, a[:, t] if time_varying else a, b[:, t])
        out[t] = x
    return jnp.stack(out, axis=1).astype(out_dtype), x.astype(out_dtype)


# --------------------------------------------------------------------------------------
# Forward computations. All take promoted arrays; x0 may be None.


def _slice_t(x, t, axis=1):
    return lax.dynamic_index_in_dim(x, t, axis=axis, keepdims=False)


def _run(a, b, x_init, *, axis, reverse, time_varying, extra=None, write=True, span=False):
    """Step the recurrence along ``axis`` of ``b`` (and of ``a`` when time-varying).

    Every step updates a slab of ``b`` in place of a fresh array (XLA:CPU pays dearly for
    large temporaries and transposes), so the memory traffic is one read of ``b`` and, with
    ``write``, one write of the states. ``extra`` is added to the first input consumed (how
    the backward pass injects the final state's cotangent without copying ``b``). With
    ``span`` the product of the decays is returned as well (time-varying only).

    Returns ``(last_state, states or None, decay_product or None)``.
    """
    n = b.shape[axis]
    first = n - 1 if reverse else 0

    def a_at(t):
        return _slice_t(a, t, axis) if time_varying else a

    b_first = _slice_t(b, first, axis)
    if extra is not None:
        b_first = b_first + extra
    x = b_first if x_init is None else step(x_init, a_at(first), b_first)
    out = lax.dynamic_update_index_in_dim(jnp.empty_like(b), x, first, axis) if write else None
    prod = a_at(first) if span else None

    def body(i, carry):
        x, out, prod = carry
        t = n - 1 - i if reverse else i
        a_t = a_at(t)
        x = step(x, a_t, _slice_t(b, t, axis))
        if write:
            out = lax.dynamic_update_index_in_dim(out, x, t, axis)
        if span:
            prod = prod * a_t
        return x, out, prod

    return lax.fori_loop(1, n, body, (x, out, prod))


def _sequential(a, b, x0, reverse, time_varying, extra=None):
    x, states, _ = _run(a, b, x0, axis=1, reverse=reverse, time_varying=time_varying, extra=extra)
    return states, x


def _int_power(a, m):
    """``a ** m`` for integer ``m`` broadcast against ``a``, without NaN at ``a = 0``."""
    mf = m.astype(jnp.finfo(a.dtype).dtype)
    # exp(m·log|a|) with m = 0 and a = 0 would be exp(nan); a^0 is 1.
    mag = jnp.where(m == 0, 1.0, jnp.exp(mf * jnp.log(jnp.abs(a))))
    if jnp.iscomplexobj(a):
        ang = mf * jnp.angle(a)
        return lax.complex(mag * jnp.cos(ang), mag * jnp.sin(ang))
    sign = jnp.where((a < 0) & (m % 2 == 1), -1.0, 1.0)
    return (sign * mag).astype(a.dtype)


def _associative(a, b, x0, reverse, time_varying, extra=None):
    L = b.shape[1]
    if x0 is not None or extra is not None:
        # Fold the initial state (and any injected term) into the first input consumed.
        t0 = L - 1 if reverse else 0
        a0 = _slice_t(a, t0) if time_varying else a
        add = (0 if x0 is None else a0 * x0) + (0 if extra is None else extra)
        b = b.at[:, t0].add(add)
    if time_varying:

        def combine(first, second):
            a1, b1 = first
            a2, b2 = second
            return a2 * a1, a2 * b1 + b2

        _, states = lax.associative_scan(combine, (a, b), reverse=reverse, axis=1)
    else:
        # Only segment lengths are scanned, so `a` is never broadcast along time.
        lengths = jnp.ones((1, L) + (1,) * (b.ndim - 2), jnp.int32)

        def combine(first, second):
            m1, b1 = first
            m2, b2 = second
            return m1 + m2, _int_power(a, m2) * b1 + b2

        _, states = lax.associative_scan(combine, (lengths, b), reverse=reverse, axis=1)
    final = states[:, 0] if reverse else states[:, -1]
    return states, final


def _chunked(a, b, x0, reverse, time_varying, T, extra=None):
    B, L = b.shape[:2]
    S = b.shape[2:]
    T = min(T, L)
    C = -(-L // T)
    pad = C * T - L
    # Padding goes where the recurrence ends, so it never touches the real states.
    pad_width = [(0, 0), (pad, 0) if reverse else (0, pad)] + [(0, 0)] * len(S)
    if pad:
        b = jnp.pad(b, pad_width)
        if time_varying:
            a = jnp.pad(a, pad_width, constant_values=1)
    bc = b.reshape(B, C, T, *S)
    ac = a.reshape(a.shape[0], C, T, *a.shape[2:]) if time_varying else a
    run = functools.partial(_run, ac, bc, axis=2, reverse=reverse, time_varying=time_varying)
    if extra is not None:
        # Only the first chunk processed receives the injected term.
        extra = jnp.zeros((B, C, *S), b.dtype).at[:, C - 1 if reverse else 0].set(extra)

    # Pass 1: every chunk's contribution to the state it hands on (from a zero start), and
    # the total decay across the chunk.
    summary, _, span = run(None, extra=extra, write=False, span=time_varying)
    if not time_varying:
        span = _int_power(a, jnp.asarray(T))[None, None]

    # Pass 2: the state entering each chunk, by a short recurrence over the C summaries.
    x_init = jnp.zeros((B, *S), b.dtype) if x0 is None else x0
    span_tm = jnp.moveaxis(jnp.broadcast_to(span, (span.shape[0], C, *S)), 1, 0)

    def carry_body(x, inputs):
        s, e = inputs
        return step(x, s, e), x

    _, incoming = lax.scan(
        carry_body, x_init, (span_tm, jnp.moveaxis(summary, 1, 0)), reverse=reverse
    )
    # Pass 3: the recurrence inside all chunks at once, from the states entering them.
    _, out, _ = run(jnp.moveaxis(incoming, 0, 1), extra=extra)
    states = out.reshape(B, C * T, *S)
    if pad:
        states = states[:, pad:] if reverse else states[:, :L]
    final = states[:, 0] if reverse else states[:, -1]
    return states, final


def _forward(a, b, x0, reverse, method, chunk_size, time_varying, extra=None):
    if method == "sequential":
        return _sequential(a, b, x0, reverse, time_varying, extra)
    if method == "associative":
        return _associative(a, b, x0, reverse, time_varying, extra)
    return _chunked(a, b, x0, reverse, time_varying, chunk_size, extra)


# --------------------------------------------------------------------------------------
# Gradients: the adjoint recurrence runs the other way with the decay shifted by one step.


def _sum_to_shape(x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to it."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _scan(a, b, x0, reverse, method, chunk_size, time_varying):
    return _forward(a, b, x0, reverse, method, chunk_size, time_varying)


def _scan_fwd(a, b, x0, reverse, method, chunk_size, time_varying):
    states, final = _forward(a, b, x0, reverse, method, chunk_size, time_varying)
    return (states, final), (a, states, x0)


def _decay_grad(lam, states, x0, a_shape, reverse, time_varying):
    """dL/da_t = λ_t ⊙ x_{t−1} (x_{t+1} in reverse; the initial state at the first step),
    summed over the axes along which ``a`` was broadcast. Accumulated step by step: on
    XLA:CPU a fused reduction over the leading axes of a large complex product is many times
    slower than a loop over time slabs."""
    L = lam.shape[1]
    first = L - 1 if reverse else 0
    offset = 1 if reverse else -1
    head = jnp.zeros_like(lam[:, 0]) if x0 is None else _slice_t(lam, first) * x0

    def term(i):
        t = L - 1 - i if reverse else i
        return t, _slice_t(lam, t) * _slice_t(states, t + offset)

    if time_varying:
        step_shape = (a_shape[0], *a_shape[2:])

        def write(i, out):
            t, value = term(i)
            return lax.dynamic_update_index_in_dim(out, _sum_to_shape(value, step_shape), t, 1)

        out = jnp.empty(a_shape, lam.dtype)
        out = lax.dynamic_update_index_in_dim(out, _sum_to_shape(head, step_shape), first, 1)
        return lax.fori_loop(1, L, write, out)
    acc = lax.fori_loop(1, L, lambda i, acc: acc + term(i)[1], head)
    return _sum_to_shape(acc, a_shape)


def _scan_bwd(reverse, method, chunk_size, time_varying, residuals, cotangents):
    a, states, x0 = residuals
    g_states, g_final = cotangents
    if time_varying:
        # λ_t = g_t + a_{t+1} λ_{t+1} (forward); the decay feeding λ_t sits one step later.
        ones = jnp.ones_like(a[:, :1])
        a_adj = (
            jnp.concatenate([ones, a[:, :-1]], axis=1)
            if reverse
            else jnp.concatenate([a[:, 1:], ones], axis=1)
        )
    else:
        a_adj = a
    # The final state's cotangent enters the adjoint recurrence at its first step.
    lam, _ = _forward(
        a_adj, g_states, None, not reverse, method, chunk_size, time_varying, extra=g_final
    )
    g_a = _decay_grad(lam, states, x0, a.shape, reverse, time_varying)
    if x0 is None:
        return g_a, lam, None
    first = states.shape[1] - 1 if reverse else 0
    a_first = _slice_t(a, first) if time_varying else a
    return g_a, lam, _sum_to_shape(a_first * _slice_t(lam, first), x0.shape)


_scan.defvjp(_scan_fwd, _scan_bwd)
