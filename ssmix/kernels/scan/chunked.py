"""The ``"chunked"`` form of :func:`ssmix.kernels.scan.linear_scan` (CPU's default).

The time axis is cut into chunks of ``T`` steps. A decay-weighted sum over each chunk gives
every chunk's contribution to its end state; a short recurrence over the ``L/T`` chunk
summaries gives every chunk's incoming state; a final pass runs the recurrence inside all
chunks at once, starting from those states. ``T + L/T`` dependent loop steps instead of ``L``,
each over a ``L/T``-times larger slab, with two reads of ``b`` and one write of the states.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from ssmix.kernels.scan._common import int_power, step
from ssmix.kernels.scan.sequential import run

#: Chunk length when none is given.
DEFAULT_CHUNK = 64


def chunked(a, b, x0, reverse, time_varying, T, extra=None):
    """States ``(B, L, *S)`` and final state ``(B, *S)`` with chunks of ``T`` steps (promoted
    inputs; ``x0`` may be None; ``extra`` is added to the first input consumed)."""
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
    chunk_run = functools.partial(run, ac, bc, axis=2, reverse=reverse, time_varying=time_varying)
    if extra is not None:
        # Only the first chunk processed receives the injected term.
        extra = jnp.zeros((B, C, *S), b.dtype).at[:, C - 1 if reverse else 0].set(extra)

    # Pass 1: every chunk's contribution to the state it hands on (from a zero start), and
    # the total decay across the chunk.
    summary, _, span = chunk_run(None, extra=extra, write=False, span=time_varying)
    if not time_varying:
        span = int_power(a, jnp.asarray(T))[None, None]

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
    _, out, _ = chunk_run(jnp.moveaxis(incoming, 0, 1), extra=extra)
    states = out.reshape(B, C * T, *S)
    if pad:
        states = states[:, pad:] if reverse else states[:, :L]
    final = states[:, 0] if reverse else states[:, -1]
    return states, final
