"""Sequential SSD: one ``lax.scan`` step per position (shapes as in :mod:`ssmix.kernels.ssd`).

From ``L = 256`` on the scan runs in blocks of about √L steps, each rematerialised under
differentiation, so that the backward pass stores O(√L) states instead of L.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ssmix.kernels.scan._common import segment_starts
from ssmix.kernels.ssd.common import group_heads

_REMAT_MIN_LENGTH = 256


def ssd_sequential(x, dt, A, B, C, h0, reverse, labels=None):
    """``(y (B, L, Hh, P), final state (B, Hh, P, N))``; promoted inputs, ``h0`` or None;
    segment ``labels (B, L)`` (:func:`~ssmix.kernels.ssd.common.segment_labels`) or None:
    the decay is zero where a segment starts in the direction of the scan."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    tm = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731  time-major for lax.scan
    xs = (tm(x.reshape(b, L, G, R, P)), tm(group_heads(dt, G)), tm(B), tm(C))
    if labels is not None:
        # The decay is zero where a segment starts (the padding of long sequences below gets
        # False: padded steps reset nothing).
        xs += (tm(segment_starts(labels, reverse)),)
    Ag = group_heads(A, G)

    def step(h, inp):
        x_t, dt_t, B_t, C_t, *start = inp  # (b, G, R, P), (b, G, R), (b, G, N) ×2, [(b,)]
        decay = jnp.exp(dt_t * Ag)
        if start:
            decay = jnp.where(start[0][:, None, None], 0, decay)
        decay = decay[..., None, None]
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, None, :]
        return h, jnp.einsum("bgrpn,bgn->bgrp", h, C_t)

    h = jnp.zeros((b, G, R, P, N), x.dtype) if h0 is None else h0.reshape(b, G, R, P, N)
    if L < _REMAT_MIN_LENGTH:
        h, ys = lax.scan(step, h, xs, reverse=reverse)
        return jnp.moveaxis(ys.reshape(L, b, H, P), 0, 1), h.reshape(b, H, P, N)
    # Long sequences: blocks of ~√L steps, rematerialised under differentiation, so only the
    # block-boundary states (not all L states) are stored for the backward pass.
    K = math.isqrt(L)
    nb = -(-L // K)
    pad = nb * K - L
    if pad:
        # Zero steps are identity steps; they go where the scan ends so the states before
        # them are untouched.
        width = ((pad, 0) if reverse else (0, pad),)
        xs = tuple(jnp.pad(v, width + ((0, 0),) * (v.ndim - 1)) for v in xs)
    xs = tuple(v.reshape(nb, K, *v.shape[1:]) for v in xs)

    @jax.checkpoint
    def block(h, inp):
        return lax.scan(step, h, inp, reverse=reverse)

    h, ys = lax.scan(block, h, xs, reverse=reverse)
    ys = ys.reshape(nb * K, b, H, P)
    ys = ys[pad:] if reverse else ys[:L]
    return jnp.moveaxis(ys, 0, 1), h.reshape(b, H, P, N)
