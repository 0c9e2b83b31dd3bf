"""The ``"associative"`` form of :func:`ssmix.kernels.scan.linear_scan`: ``lax.associative_scan``
over the whole length with ``(a_i, b_i) ∘ (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``. For a constant
decay the first element of each pair is the integer segment length ``m`` and the product is
``a^m``, so ``a`` is never broadcast along time. ``log₂ L`` levels, no loop."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ssmix.kernels.scan._common import int_power, slice_t


def associative(a, b, x0, reverse, time_varying, extra=None):
    """States ``(B, L, *S)`` and final state ``(B, *S)`` by a parallel prefix scan (promoted
    inputs; ``x0`` may be None; ``extra`` is added to the first input consumed)."""
    L = b.shape[1]
    if x0 is not None or extra is not None:
        # Fold the initial state (and any injected term) into the first input consumed.
        t0 = L - 1 if reverse else 0
        a0 = slice_t(a, t0) if time_varying else a
        add = (0 if x0 is None else a0 * x0) + (0 if extra is None else extra)
        b = b.at[:, t0].add(add)
    if time_varying:

        def combine(first, second):
            a1, b1 = first
            a2, b2 = second
            return a2 * a1, a2 * b1 + b2

        _, states = lax.associative_scan(combine, (a, b), reverse=reverse, axis=1)
    else:
        lengths = jnp.ones((1, L) + (1,) * (b.ndim - 2), jnp.int32)

        def combine(first, second):
            m1, b1 = first
            m2, b2 = second
            return m1 + m2, int_power(a, m2) * b1 + b2

        _, states = lax.associative_scan(combine, (lengths, b), reverse=reverse, axis=1)
    final = states[:, 0] if reverse else states[:, -1]
    return states, final
