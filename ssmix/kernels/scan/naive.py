"""Reference for :func:`ssmix.kernels.scan.linear_scan`: a Python loop over time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssmix.kernels.scan._common import prepare, step


def linear_scan_naive(
    a: jax.Array, b: jax.Array, initial_state: jax.Array | None = None, *, reverse: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Reference for :func:`~ssmix.kernels.scan.linear_scan` (same arguments and results): a
    Python loop over time, ``x_t = a_t ⊙ x_{t−1} + b_t``; slow, obviously right."""
    a, b, x0, time_varying, out_dtype = prepare(a, b, initial_state)
    L = b.shape[1]
    x = jnp.zeros(b.shape[:1] + b.shape[2:], b.dtype) if x0 is None else x0
    out = [None] * L
    for t in reversed(range(L)) if reverse else range(L):
        x = step(x, a[:, t] if time_varying else a, b[:, t])
        out[t] = x
    return jnp.stack(out, axis=1).astype(out_dtype), x.astype(out_dtype)
