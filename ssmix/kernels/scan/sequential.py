"""The ``"sequential"`` form of :func:`ssmix.kernels.scan.linear_scan`: one loop step per time
index, the states written in place (the activations are never transposed to time-major
layout). Fast on CPU; on an accelerator every step is a round of kernel launches."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ssmix.kernels.scan._common import slice_t, step


def run(a, b, x_init, *, axis, reverse, time_varying, extra=None, write=True, span=False):
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
        return slice_t(a, t, axis) if time_varying else a

    b_first = slice_t(b, first, axis)
    if extra is not None:
        b_first = b_first + extra
    x = b_first if x_init is None else step(x_init, a_at(first), b_first)
    out = lax.dynamic_update_index_in_dim(jnp.empty_like(b), x, first, axis) if write else None
    prod = a_at(first) if span else None

    def body(i, carry):
        x, out, prod = carry
        t = n - 1 - i if reverse else i
        a_t = a_at(t)
        x = step(x, a_t, slice_t(b, t, axis))
        if write:
            out = lax.dynamic_update_index_in_dim(out, x, t, axis)
        if span:
            prod = prod * a_t
        return x, out, prod

    return lax.fori_loop(1, n, body, (x, out, prod))


def sequential(a, b, x0, reverse, time_varying, extra=None):
    """States ``(B, L, *S)`` and final state ``(B, *S)`` by a loop over time (promoted inputs;
    ``x0`` may be None; ``extra`` is added to the first input consumed)."""
    x, states, _ = run(a, b, x0, axis=1, reverse=reverse, time_varying=time_varying, extra=extra)
    return states, x
