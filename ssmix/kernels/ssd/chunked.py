"""Chunked SSD: a ``lax.fori_loop`` over chunks in the caller's layout, hand-written gradient.

The length is cut into chunks of ``Q`` steps. Inside a chunk the output is the quadratic
(attention-like) form ``(C Bᵀ ⊙ decay) · (dt·x)``; between chunks only the ``(P, N)`` states
travel. One loop walks the chunks reading and writing them in place in the caller's
``(B, L, Hh, P)`` layout, so the activations are never transposed (a transpose of a large
activation costs as much as the whole mixing on XLA:CPU) and each step works on a
cache-sized slab. The gradient is a hand-written reverse loop over the chunks
(``custom_vjp``) that recomputes the chunk-local terms from the inputs and the saved
chunk-entry states. Segment sums of the decay are differences of chunk-local cumulative
sums, masked before the exponential, so every exponent is ≤ 0 and nothing overflows.
Cost O(L·Q·(N + P) + L·N·P) per head. The fastest form on XLA:CPU; on accelerators every
loop step is a round of small kernel launches (see :mod:`ssmix.kernels.ssd.parallel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssmix.kernels.ssd.common import chunk_resets, group_heads, pad_to_chunks

# --------------------------------------------------------------------------------------
# Chunked form: a loop over chunks in the caller's layout, with a hand-written gradient.
#
# Inside the loop, chunk arrays are ``xk (b, Q, G, R, P)``, ``dtk (b, Q, G, R)``,
# ``Bk, Ck (b, Q, G, N)``; the state is kept as ``(b, G, N, R, P)`` so that both the output
# contraction ``C_i · state`` and the state update ``Bᵀ · (decay·dt·x)`` are plain matmuls
# over the native ``(Q, Hh·P)`` slab of the chunk.


def ssd_chunked(x, dt, A, B, C, h0, chunk_size, labels=None):
    """Chunked SSD, forward direction: ``(y (B, L, Hh, P), final state (B, Hh, P, N))`` from
    promoted inputs as in :func:`ssmix.kernels.ssd.ssd` (``h0`` or None; segment ``labels
    (B, L)`` of :func:`~ssmix.kernels.ssd.common.segment_labels` or None)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q, nc, (x, dt, B, C) = pad_to_chunks(x, dt, B, C, chunk_size)
    # The loop sees (b, chunks, Q, features) views of the caller's arrays. Heads are split into
    # groups only per chunk: XLA:CPU copies whole arrays whose layouts differ only in where a
    # size-1 axis (such as G = 1) sits, which the loop's operands would otherwise trigger.
    xc = x.reshape(b, nc, Q, H * P)
    dtc = dt.reshape(b, nc, Q, H)
    Bc = B.reshape(b, nc, Q, G * N)
    Cc = C.reshape(b, nc, Q, G * N)
    if h0 is None:
        h0 = jnp.zeros((b, H, P, N), x.dtype)
    s0 = jnp.moveaxis(h0.reshape(b, G, R, P, N), 4, 2)
    resets = None if labels is None else chunk_resets(labels, nc, Q)
    y, s_final = _chunked_core(xc, dtc, group_heads(A, G), Bc, Cc, s0, resets)
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    return y, jnp.moveaxis(s_final, 2, 4).reshape(b, H, P, N)


def _chunk(v, k):
    return lax.dynamic_index_in_dim(v, k, axis=1, keepdims=False)


def _put(buf, v, k):
    return lax.dynamic_update_index_in_dim(buf, v.reshape(buf.shape[:1] + buf.shape[2:]), k, axis=1)


def _split(v, *shape):
    """A chunk ``(b, Q, features)`` viewed as ``(b, Q, *shape)``."""
    return v.reshape(*v.shape[:2], *shape)


def _chunk_terms(xk, dtk, A, Bk, Ck, zk=None):
    """Chunk-local quantities shared by the forward and the backward pass.

    Returns ``cs (b, Q, G, R)`` (cumulative ``dt·A`` inside the chunk, ≤ 0 and decreasing),
    ``Lm (b, G, R, Q, Q)`` (``exp(cs_i − cs_j)`` for ``j ≤ i``, else 0), ``CB (b, G, Q, Q)``,
    ``u (b, Q, G, R, P)`` (``dt·x``), ``e (b, Q, G, R)`` (``exp(cs_end − cs_j)``), ``ecs
    (b, Q, G, R)`` (``exp(cs_i)``: entering state to row ``i``) and ``d_end (b, G, R)``
    (``exp(cs_end)``: the decay across the chunk). With the chunk's segment-start counts
    ``zk (b, Q)`` (:func:`chunk_resets`) every factor that spans a segment start is zero: the
    masks are constants, so the gradients below hold unchanged.
    """
    Q = xk.shape[1]
    cs = jnp.cumsum(dtk * A, axis=1)
    cs_t = jnp.moveaxis(cs, 1, 3)  # (b, G, R, Q)
    mask = jnp.tril(jnp.ones((Q, Q), bool))
    if zk is not None:
        mask = mask & (zk[:, None, None, :, None] == zk[:, None, None, None, :])
    Lm = jnp.exp(jnp.where(mask, cs_t[..., :, None] - cs_t[..., None, :], -jnp.inf))
    CB = jnp.einsum("bign,bjgn->bgij", Ck, Bk)
    u = xk * dtk[..., None]
    e = jnp.exp(cs[:, -1:] - cs)
    ecs = jnp.exp(cs)
    d_end = jnp.exp(cs[:, -1])
    if zk is not None:
        e = jnp.where((zk == zk[:, -1:])[..., None, None], e, 0)
        ecs = jnp.where((zk == 0)[..., None, None], ecs, 0)
        d_end = jnp.where((zk[:, -1] == 0)[:, None, None], d_end, 0)
    return cs, Lm, CB, u, e, ecs, d_end


def _chunk_forward(xk, dtk, A, Bk, Ck, s, zk=None):
    """One chunk: outputs ``(b, Q, G, R, P)`` and the state after the chunk."""
    cs, Lm, CB, u, e, ecs, d_end = _chunk_terms(xk, dtk, A, Bk, Ck, zk)
    W = CB[:, :, None] * Lm
    y = jnp.einsum("bgrij,bjgrp->bigrp", W, u)
    y = y + ecs[..., None] * jnp.einsum("bign,bgnrp->bigrp", Ck, s)
    s_next = d_end[:, :, None, :, None] * s
    s_next = s_next + jnp.einsum("bjgn,bjgrp->bgnrp", Bk, u * e[..., None])
    return y, s_next


def _resets_at(zc, k):
    return None if zc is None else _chunk(zc, k)


def _chunked_loop(xc, dtc, A, Bc, Cc, s0, zc, save_states):
    nc = xc.shape[1]
    G, N, R, P = s0.shape[1:]

    def body(k, carry):
        s, y, states = carry
        if save_states:
            states = _put(states, s, k)
        yk, s = _chunk_forward(
            _split(_chunk(xc, k), G, R, P),
            _split(_chunk(dtc, k), G, R),
            A,
            _split(_chunk(Bc, k), G, N),
            _split(_chunk(Cc, k), G, N),
            s,
            _resets_at(zc, k),
        )
        return s, _put(y, yk, k), states

    states = jnp.zeros((s0.shape[0], nc, s0[0].size), s0.dtype) if save_states else None
    s, y, states = lax.fori_loop(0, nc, body, (s0, jnp.zeros_like(xc), states))
    return y, s, states


@jax.custom_vjp
def _chunked_core(xc, dtc, A, Bc, Cc, s0, zc):
    y, s, _ = _chunked_loop(xc, dtc, A, Bc, Cc, s0, zc, save_states=False)
    return y, s


def _chunked_core_fwd(xc, dtc, A, Bc, Cc, s0, zc):
    y, s, states = _chunked_loop(xc, dtc, A, Bc, Cc, s0, zc, save_states=True)
    return (y, s), (xc, dtc, A, Bc, Cc, states, zc)


def _chunk_backward(xk, dtk, A, Bk, Ck, s, gy, gs, zk=None):
    """Gradients of one chunk given the entry state ``s``, the output cotangent ``gy`` and the
    cotangent ``gs`` of the state after the chunk."""
    cs, Lm, CB, u, e, ecs, d_end = _chunk_terms(xk, dtk, A, Bk, Ck, zk)
    W = CB[:, :, None] * Lm
    gy_e = gy * ecs[..., None]
    # Inputs: through the quadratic form and through the state handed on.
    v = jnp.einsum("bjgn,bgnrp->bjgrp", Bk, gs)  # gs·B_j
    gu = jnp.einsum("bgrij,bigrp->bjgrp", W, gy) + e[..., None] * v
    # State before the chunk: decayed through the chunk, and read by every output.
    gs_prev = d_end[:, :, None, :, None] * gs
    gs_prev = gs_prev + jnp.einsum("bign,bigrp->bgnrp", Ck, gy_e)
    # C and B: through C Bᵀ in the quadratic form, the output read-out and the state update.
    gW = jnp.einsum("bigrp,bjgrp->bgrij", gy, u)
    gCB = jnp.sum(gW * Lm, axis=2)
    gC = jnp.einsum("bgij,bjgn->bign", gCB, Bk)
    gC = gC + jnp.einsum("bigrp,bgnrp->bign", gy_e, s)
    gB = jnp.einsum("bgij,bign->bjgn", gCB, Ck)
    gB = gB + jnp.einsum("bjgrp,bgnrp->bjgn", u * e[..., None], gs)
    # Cumulative decay cs: exp(cs_i − cs_j) in W, exp(cs_i) in the read-out,
    # exp(cs_end − cs_j) and exp(cs_end) in the state update.
    T = gW * W
    g_cs = jnp.moveaxis(jnp.sum(T, axis=4) - jnp.sum(T, axis=3), 3, 1)
    y_state = jnp.einsum("bign,bgnrp->bigrp", Ck, s)
    g_cs = g_cs + jnp.sum(gy_e * y_state, axis=-1)
    g_e = e * jnp.sum(u * v, axis=-1)
    g_end = jnp.sum(g_e, axis=1) + d_end * jnp.einsum("bgnrp,bgnrp->bgr", gs, s)
    g_cs = (g_cs - g_e).at[:, -1].add(g_end)
    # cs_i = Σ_{j≤i} dt_j·A, so each step's exponent gradient is a reverse cumulative sum.
    g_a = jnp.flip(jnp.cumsum(jnp.flip(g_cs, 1), 1), 1)
    gx = gu * dtk[..., None]
    gdt = jnp.sum(gu * xk, axis=-1) + g_a * A
    gA = jnp.sum(g_a * dtk, axis=(0, 1))
    return gx, gdt, gA, gB, gC, gs_prev


def _chunked_core_bwd(residuals, cotangents):
    xc, dtc, A, Bc, Cc, states, zc = residuals
    gy, gs = cotangents
    nc = xc.shape[1]
    G, R = A.shape
    N = Bc.shape[-1] // G
    P = xc.shape[-1] // (G * R)

    def body(i, carry):
        gs, gA, gx, gdt, gB, gC = carry
        k = nc - 1 - i
        grads = _chunk_backward(
            _split(_chunk(xc, k), G, R, P),
            _split(_chunk(dtc, k), G, R),
            A,
            _split(_chunk(Bc, k), G, N),
            _split(_chunk(Cc, k), G, N),
            _chunk(states, k).reshape(-1, G, N, R, P),
            _split(_chunk(gy, k), G, R, P),
            gs,
            _resets_at(zc, k),
        )
        gx_k, gdt_k, gA_k, gB_k, gC_k, gs = grads
        return (
            gs,
            gA + gA_k,
            _put(gx, gx_k, k),
            _put(gdt, gdt_k, k),
            _put(gB, gB_k, k),
            _put(gC, gC_k, k),
        )

    zeros = jnp.zeros_like
    init = (gs, zeros(A), zeros(xc), zeros(dtc), zeros(Bc), zeros(Cc))
    gs0, gA, gx, gdt, gB, gC = lax.fori_loop(0, nc, body, init)
    return gx, gdt, gA, gB, gC, gs0, None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)
