"""Materialized SSD and quasiseparable forms: build the ``L × L`` mixing matrix, O(L²).

The oracles the fast forms are tested against. Shapes and formulas as in
:mod:`ssmix.kernels.ssd`; inputs are already validated and promoted to the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssmix.kernels.scan._common import segment_starts
from ssmix.kernels.ssd.common import (
    expand_groups,
    segment_sums,
    shift_earlier,
    shift_keeps,
    shift_later,
)


def _decay(A, seg, mask):
    """``exp(A·seg)`` where ``mask``, exactly 0 elsewhere (masked before the exponential)."""
    return jnp.exp(jnp.where(mask, A[:, None, None] * seg, -jnp.inf))


def ssd_matrix_naive(dt, A, B, C, reverse, labels=None):
    """The SSD matrix ``M (B, Hh, L, L)`` from ``dt (B, L, Hh)``, ``A (Hh,)`` and
    ``B, C (B, L, G, N)``; with segment ``labels (B, L)`` (:func:`segment_labels`) entries
    between different segments are zero (masked before the exponential)."""
    b, L, H = dt.shape
    dth = jnp.moveaxis(dt, 1, 2)  # (B, Hh, L)
    CB = jnp.einsum("btgn,bsgn->bgts", C, B)
    CB = jnp.repeat(CB, H // B.shape[2], axis=1)  # (B, Hh, L, L)
    if reverse:
        # Σ_{r=t}^{s−1} dt_r = segment sum of dt shifted one step later, read at [s, t].
        shifted = jnp.pad(dth[..., :-1], ((0, 0), (0, 0), (1, 0)))
        seg = jnp.swapaxes(segment_sums(shifted), -1, -2)
        mask = jnp.triu(jnp.ones((L, L), bool))
    else:
        seg = segment_sums(dth)
        mask = jnp.tril(jnp.ones((L, L), bool))
    if labels is not None:
        mask = mask & (labels[:, None, :, None] == labels[:, None, None, :])
    return CB * _decay(A, seg, mask) * dth[:, :, None, :]


def initial_state_output(h0, dt, A, C, reverse, labels=None):
    """Contribution ``exp(A·Σ dt)·h0 C_t`` of an initial state to every output ``(B, L, Hh, P)``;
    the sum runs over ``r ≤ t`` (forward) or ``r ≥ t`` (reverse). With segment ``labels`` only
    the first segment processed is reached."""
    H = dt.shape[2]
    cum = jnp.cumsum(jnp.flip(dt, 1), 1)[:, ::-1] if reverse else jnp.cumsum(dt, 1)
    decay = jnp.exp(A * cum)
    if labels is not None:
        first = labels[:, -1:] if reverse else labels[:, :1]
        decay = jnp.where((labels == first)[..., None], decay, 0)
    return jnp.einsum("bthn,bhpn->bthp", expand_groups(C, H), h0) * decay[..., None]


def ssd_naive(x, dt, A, B, C, h0, reverse, labels=None):
    """``(y (B, L, Hh, P), final state (B, Hh, P, N))`` through the materialized matrix;
    ``labels (B, L)`` (:func:`segment_labels`) or None: packed segments."""
    H = x.shape[2]
    M = ssd_matrix_naive(dt, A, B, C, reverse, labels)
    y = jnp.einsum("bhts,bshp->bthp", M, x)
    # The final state is the state after the last step: a weighted sum of dt_s·x_s B_sᵀ.
    dth = jnp.moveaxis(dt, 1, 2)
    if reverse:  # Σ_{r<s} dt_r
        to_end = jnp.pad(jnp.cumsum(dth, -1)[..., :-1], ((0, 0), (0, 0), (1, 0)))
    else:  # Σ_{r>s} dt_r
        to_end = jnp.flip(jnp.cumsum(jnp.flip(dth[..., 1:], -1), -1), -1)
        to_end = jnp.pad(to_end, ((0, 0), (0, 0), (0, 1)))
    w = jnp.exp(A[:, None] * to_end) * dth  # (B, Hh, L)
    if labels is not None:
        # Only the last segment processed reaches the final state.
        last = labels[:, :1] if reverse else labels[:, -1:]
        w = jnp.where((labels == last)[:, None], w, 0)
    final = jnp.einsum("bhs,bshp,bshn->bhpn", w, x, expand_groups(B, H))
    if h0 is not None:
        y = y + initial_state_output(h0, dt, A, C, reverse, labels)
        carry = jnp.exp(A * jnp.sum(dt, 1))
        if labels is not None:
            carry = jnp.where((labels[:, :1] == labels[:, -1:]), carry, 0)
        final = final + carry[..., None, None] * h0
    return y, final


def qs_matrix_naive(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, labels=None) -> jax.Array:
    """The quasiseparable matrix ``M (B, Hh, L, L)`` entry by entry from its explicit formula;
    with segment ``labels (B, L)`` (:func:`segment_labels`) entries between different
    segments are zero (masked before the exponential)."""
    b, L, H = dt_fw.shape
    rep = H // B_fw.shape[2]
    eye = jnp.eye(L, dtype=bool)
    lower = jnp.tril(jnp.ones((L, L), bool), -1)
    upper = lower.T
    if labels is not None:
        same = labels[:, None, :, None] == labels[:, None, None, :]  # (B, 1, L, L)
        lower, upper = lower & same, upper & same
    # s < t: C_fw[t−1]·B_fw[s]·exp(A·Σ_{r=s+1}^{t−1} dt_fw[r])·dt_fw[s]; the segment sum is
    # row t−1 of the forward segment sums.
    seg_fw = segment_sums(jnp.moveaxis(dt_fw, 1, 2))
    seg_fw = jnp.pad(seg_fw[..., :-1, :], ((0, 0), (0, 0), (1, 0), (0, 0)))
    C_prev = jnp.pad(C_fw[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    CB_fw = jnp.repeat(jnp.einsum("btgn,bsgn->bgts", C_prev, B_fw), rep, axis=1)
    M_fw = CB_fw * _decay(A, seg_fw, lower) * jnp.moveaxis(dt_fw, 1, 2)[:, :, None, :]
    # s > t: C_bw[t+1]·B_bw[s]·exp(A·Σ_{r=t+1}^{s−1} dt_bw[r])·dt_bw[s]; the segment sum is
    # entry [s−1, t] of the backward segment sums.
    seg_bw = jnp.swapaxes(segment_sums(jnp.moveaxis(dt_bw, 1, 2)), -1, -2)  # [t, s']
    seg_bw = jnp.pad(seg_bw[..., :, :-1], ((0, 0), (0, 0), (0, 0), (1, 0)))
    C_next = jnp.pad(C_bw[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))
    CB_bw = jnp.repeat(jnp.einsum("btgn,bsgn->bgts", C_next, B_bw), rep, axis=1)
    M_bw = CB_bw * _decay(A, seg_bw, upper) * jnp.moveaxis(dt_bw, 1, 2)[:, :, None, :]
    M_diag = jnp.where(eye, jnp.moveaxis(diag, 1, 2)[..., None], 0)
    return M_fw + M_bw + M_diag


def segmented_cumsum(dt: jax.Array, starts: jax.Array, reverse: bool = False) -> jax.Array:
    """Inclusive cumulative sum of ``dt (B, L, Hh)`` along axis 1 restarted where ``starts
    (B, L)`` is True (from the end when ``reverse``), summed term by term inside each
    segment (an associative scan, not a difference of two long sums, which would cancel)."""
    if reverse:
        dt, starts = jnp.flip(dt, 1), jnp.flip(starts, 1)

    def combine(a, b):
        (av, af), (bv, bf) = a, b
        return jnp.where(bf, bv, av + bv), af | bf

    flags = jnp.broadcast_to(starts[..., None], dt.shape)
    out, _ = jax.lax.associative_scan(combine, (dt, flags), axis=1)
    return jnp.flip(out, 1) if reverse else out


def qs_segment_state_terms(h_fw, h_bw, dt_fw, dt_bw, A, C_fw, C_bw, labels) -> jax.Array:
    """The quasiseparable mixer's output ``(B, L, Hh, P)`` from initial states that enter
    *every* segment (``h_fw`` at each segment's first step, ``h_bw`` after its last), for
    segment ``labels (B, L)``: what each segment run alone with ``(h_fw, h_bw)`` adds to
    :func:`~ssmix.kernels.ssd.quasiseparable` without states. States ``(B, Hh, P, N)``."""
    H = dt_fw.shape[2]
    out = []
    for h, dt, C, reverse in ((h_fw, dt_fw, C_fw, False), (h_bw, dt_bw, C_bw, True)):
        starts = segment_starts(labels, reverse)
        decay = jnp.exp(A * segmented_cumsum(dt, starts, reverse))
        y = jnp.einsum("bthn,bhpn->bthp", expand_groups(C, H), h) * decay[..., None]
        out.append(y)
    keep_fw, keep_bw = shift_keeps(labels)
    return jnp.where(keep_fw, shift_later(out[0]), 0) + jnp.where(keep_bw, shift_earlier(out[1]), 0)
