"""Parallel SSD: Mamba-2's four batched contractions over all chunks, no loop over chunks.

The length is cut into ``nc`` chunks of ``Q`` steps and every chunk is processed at once:

1. intra-chunk outputs: the quadratic form ``(C Bᵀ ⊙ exp(segsum)) · (dt·x)`` per chunk;
2. chunk states: the state each chunk would leave behind if it started from zero,
   ``Σ_j exp(cs_end − cs_j)·dt_j·x_j B_jᵀ``;
3. state passing: the state entering every chunk from the chunk states and the chunk decays
   ``exp(cs_end)``, either as one small matmul with the exact segment-sum decay matrix over
   chunks (``nc ≤ 64``: ``O(nc²)`` scalars, one contraction) or as an
   ``lax.associative_scan`` over the ``(decay, state)`` pairs (log depth, for longer
   sequences);
4. state-to-output: ``exp(cs_i)·C_i·state_entering``.

Nothing is sequential but the log-depth associative scan, so on accelerators the forward
and its gradient trace to no loop at all. The gradient is JAX's autodiff of these steps:
for Hydra's kernel at its accelerator shape (both directions stacked: batch 4, L = 16384,
2 heads of 64, N = 64, Q = 128) it traces to 0 loop iterations with a largest array of
64 MiB (a ``(…, Q, Q)`` tensor), and XLA:CPU plans 666 MiB of temporaries; recomputing the
four steps in the backward (``jax.checkpoint``) gave the same loops and largest array and
674 MiB, since the backward needs the ``(…, Q, Q)`` tensors at once either way. No
hand-written VJP: the loop count is already 0 and the largest array is the ``(…, Q, Q)``
tensor any backward of this form builds.

Exponents are kept ≤ 0: inside a chunk they are differences ``cs_i − cs_j`` (``j ≤ i``) of a
non-increasing cumulative sum, masked before the exponential; across chunks they are exact
segment sums (masked) or products of decays ≤ 1.

Memory: the decay and score tensors ``(b, nc, G, R, Q, Q)`` hold ``b·L·Hh·Q`` numbers, ``Q/P``
times the input. When that exceeds :data:`QQ_BUDGET_BYTES` the heads of each group are split
into blocks processed one after another (``lax.map``, one loop step per block); with one
head per group no further split is possible.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from ssmix.kernels.ssd.common import chunk_resets, group_heads, pad_to_chunks, segment_sums

#: Chunk counts up to this pass states by one matmul with the chunk decay matrix; longer
#: sequences use the associative scan (the matmul costs ``nc²`` state-sized products).
MATMUL_MAX_CHUNKS = 64

#: Largest ``(…, Q, Q)`` decay / score tensor formed at once, in bytes (half the 256 MiB
#: accelerator target, leaving room for the other operand of the product); more heads than
#: fit are processed in blocks.
QQ_BUDGET_BYTES = 128 * 2**20


def ssd_parallel(
    x,
    dt,
    A,
    B,
    C,
    h0,
    chunk_size,
    labels=None,
    *,
    qq_budget_bytes=QQ_BUDGET_BYTES,
    matmul_max_chunks=MATMUL_MAX_CHUNKS,
):
    """Parallel SSD, forward direction: ``(y (B, L, Hh, P), final state (B, Hh, P, N))`` from
    promoted inputs as in :func:`ssmix.kernels.ssd.ssd` (``h0`` or None; segment ``labels
    (B, L)`` of :func:`~ssmix.kernels.ssd.common.segment_labels` or None). The heads of each
    group go in blocks whose ``(…, Q, Q)`` tensors fit ``qq_budget_bytes``; up to
    ``matmul_max_chunks`` chunks pass states by the matmul, more by the associative scan."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q, nc, (x, dt, B, C) = pad_to_chunks(x, dt, B, C, chunk_size)
    xc = x.reshape(b, nc, Q, G, R, P)
    dtc = dt.reshape(b, nc, Q, G, R)
    Bc = B.reshape(b, nc, Q, G, N)
    Cc = C.reshape(b, nc, Q, G, N)
    Ag = group_heads(A, G)
    h0 = jnp.zeros((b, G, R, P, N), x.dtype) if h0 is None else h0.reshape(b, G, R, P, N)
    k = _head_blocks(b * nc * G * Q * Q * x.dtype.itemsize, R, qq_budget_bytes)
    resets = None if labels is None else chunk_resets(labels, nc, Q)
    four_steps = functools.partial(_four_steps, resets=resets, matmul_max_chunks=matmul_max_chunks)
    if k == 1:
        y, final = four_steps(xc, dtc, Ag, Bc, Cc, h0)
    else:
        # Split the heads of each group into k blocks along a new leading axis; B and C are
        # shared by every block of a group, so they are closed over instead of mapped.
        def split(v, axis):
            v = v.reshape(*v.shape[:axis], k, R // k, *v.shape[axis + 1 :])
            return jnp.moveaxis(v, axis, 0)

        def block(args):
            return four_steps(args[0], args[1], args[2], Bc, Cc, args[3])

        y, final = lax.map(block, (split(xc, 4), split(dtc, 4), split(Ag, 1), split(h0, 2)))
        y = jnp.moveaxis(y, 0, 4).reshape(b, nc, Q, G, R, P)
        final = jnp.moveaxis(final, 0, 2).reshape(b, G, R, P, N)
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    return y, final.reshape(b, H, P, N)


def _head_blocks(bytes_per_head: int, R: int, budget: int) -> int:
    """The fewest blocks (a divisor of the ``R`` heads per group) whose ``(…, Q, Q)`` tensor,
    ``bytes_per_head`` for each head of every group, fits ``budget``."""
    for k in range(1, R + 1):
        if R % k == 0 and bytes_per_head * (R // k) <= budget:
            return k
    return R


def _four_steps(x, dt, A, B, C, h0, *, resets=None, matmul_max_chunks):
    """The four contractions over all chunks at once.

    ``x (b, nc, Q, G, R, P)``, ``dt (b, nc, Q, G, R)``, ``A (G, R)``, ``B, C (b, nc, Q, G, N)``,
    ``h0 (b, G, R, P, N)`` -> ``y (b, nc, Q, G, R, P)``, final state ``(b, G, R, P, N)``.
    ``resets (b, nc, Q)`` (:func:`chunk_resets`) or None: packed segments; every factor that
    spans a segment start is zero (a constant mask, no ``−inf`` in any sum).
    """
    Q = x.shape[2]
    cs = jnp.cumsum(dt * A, axis=2)  # ≤ 0, non-increasing inside each chunk
    cs_t = jnp.moveaxis(cs, 2, -1)  # (b, nc, G, R, Q)
    mask = jnp.tril(jnp.ones((Q, Q), bool))
    if resets is not None:
        mask = mask & (resets[:, :, None, None, :, None] == resets[:, :, None, None, None, :])
    decay = jnp.exp(jnp.where(mask, cs_t[..., :, None] - cs_t[..., None, :], -jnp.inf))
    CB = jnp.einsum("bcign,bcjgn->bcgij", C, B)
    u = x * dt[..., None]
    # 1. Intra-chunk: the quadratic form inside each chunk.
    y = jnp.einsum("bcgrij,bcjgrp->bcigrp", CB[:, :, :, None] * decay, u)
    # 2. Chunk states: what each chunk adds to the state, decayed to the chunk's end.
    to_end = jnp.exp(cs[:, :, -1:] - cs)
    from_start = jnp.exp(cs)
    cut = None
    if resets is not None:
        to_end = jnp.where((resets == resets[:, :, -1:])[..., None, None], to_end, 0)
        from_start = jnp.where((resets == 0)[..., None, None], from_start, 0)
        cut = resets[:, :, -1] > 0  # (b, nc): the chunk holds a segment start
    states = jnp.einsum("bcjgn,bcjgrp->bcgrpn", B, u * to_end[..., None])
    # 3. State passing: the state entering every chunk.
    entering, final = _pass_states(cs[:, :, -1], states, h0, matmul_max_chunks, cut)
    # 4. State to output, decayed from the chunk's start.
    y = y + from_start[..., None] * jnp.einsum("bcign,bcgrpn->bcigrp", C, entering)
    return y, final


def _pass_states(total, states, h0, matmul_max_chunks, cut=None):
    """States entering each chunk ``(b, nc, G, R, P, N)`` and the final state.

    ``total (b, nc, G, R)`` is each chunk's log-decay (≤ 0), ``states (b, nc, G, R, P, N)``
    what each chunk adds, ``h0 (b, G, R, P, N)`` the state before the first chunk, ``cut
    (b, nc)`` (or None) marks chunks holding a segment start: their decay is zero.
    """
    nc = total.shape[1]
    if nc <= matmul_max_chunks:
        # Mamba-2's form: the initial state is chunk −1 with log-decay 0; entry [z, c] of the
        # exact segment-sum matrix carries chunk c's state to the end of chunk z − 1.
        logd = jnp.moveaxis(jnp.pad(total, ((0, 0), (1, 0), (0, 0), (0, 0))), 1, -1)
        mask = jnp.tril(jnp.ones((nc + 1, nc + 1), bool))
        if cut is not None:
            # Entry [z, c] spans chunks c+1 … z: live when none of them is cut (equal counts).
            logd = jnp.where(jnp.pad(cut, ((0, 0), (1, 0)))[:, None, None], 0, logd)
            cuts = jnp.cumsum(jnp.pad(cut, ((0, 0), (1, 0))).astype(jnp.int32), axis=1)
            mask = mask & (cuts[:, None, None, :, None] == cuts[:, None, None, None, :])
        seg = segment_sums(logd)  # (b, G, R, nc + 1, nc + 1)
        carry = jnp.exp(jnp.where(mask, seg, -jnp.inf))
        all_states = jnp.concatenate([h0[:, None], states], axis=1)
        out = jnp.einsum("bgrzc,bcgrpn->bzgrpn", carry, all_states)
        return out[:, :nc], out[:, nc]

    def combine(first, second):
        a1, s1 = first
        a2, s2 = second
        return a1 * a2, a2[..., None, None] * s1 + s2

    decay = jnp.exp(total)
    if cut is not None:
        decay = jnp.where(cut[..., None, None], 0, decay)
    # Fold the initial state into the first chunk so the inclusive scan yields the state
    # after each chunk.
    states = states.at[:, 0].add(decay[:, 0, ..., None, None] * h0)
    _, after = lax.associative_scan(combine, (decay, states), axis=1)
    entering = jnp.concatenate([h0[:, None], after[:, :-1]], axis=1)
    return entering, after[:, -1]
