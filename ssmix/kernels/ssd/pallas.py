"""Pallas SSD: one fused kernel per (batch, head) walking the chunks with the state on chip.

The length is cut into ``nc`` chunks of ``Q`` steps (:func:`pad_to_chunks`). One kernel
program handles one ``(batch, head)`` pair and walks its chunks in order, carrying the
``(P, N)`` state between them without writing it to memory; per chunk it does

1. the chunk-local quadratic form ``(C Bᵀ ⊙ exp(segsum)) · (dt·x)`` — two matmuls;
2. the entering state's contribution ``exp(cs_i)·C_i·stateᵀ`` — one matmul;
3. the state update ``exp(cs_end)·state + Σ_j (exp(cs_end − cs_j)·dt_j·x_j)ᵀ B_j`` — one
   matmul,

the shape of mamba's ``_chunk_scan_fwd`` + ``_state_passing_fwd`` fused into one kernel, or
of axlearn's Pallas SSD. ``cs`` is the within-chunk cumulative sum of ``dt·A`` (≤ 0 and
non-increasing), computed outside the kernel; every exponent is ≤ 0 (masked before the
exponential inside the chunk). Head ``h`` reads ``B`` and ``C`` of group ``h // (Hh // G)``
through the block index map, so groups are never expanded in memory.

Two variants of the same chunk body, chosen at trace time from :func:`ssmix.auto_backend`:

- ``"tpu"`` (also used on CPU): grid ``(batch, Hh, nc)`` with the chunk axis last and marked
  ``"arbitrary"`` (sequential); the state is carried in the final-state output block, which
  stays resident in VMEM because its index does not depend on the chunk. Blocks are whole
  ``(Q, P)`` / ``(Q, N)`` / ``(P, N)`` trailing dimensions, so any shape satisfies Mosaic's
  tiling rule. Lowered with Mosaic TPU.
- ``"gpu"``: grid ``(batch, Hh)``; each program loops over its chunks with a ``fori_loop``
  inside the kernel, loading one chunk at a time and carrying the state in registers (a GPU
  grid has no sequential axis). Lowered with **Triton** (``pallas.triton.CompilerParams``):
  the default Mosaic GPU lowering of ``pallas_call`` is deprecated and needs warpgroup-shaped
  kernels. Triton needs power-of-two ``Q``, ``P`` and ``N`` (at least 16 for its matmuls).

``interpret=None`` runs the kernel in Pallas interpret mode when ``jax.default_backend()`` is
CPU and compiled elsewhere.

Backward (``custom_vjp``): a second kernel of the same two variants walks the chunks in
reverse carrying the state cotangent ``(P, N)`` on chip (the TPU grid's chunk index map runs
backwards; the GPU loop counts down). The forward saves the state entering every chunk,
``(b, Hh, nc, P, N)`` (``N/Q`` of the input's size, as mamba's chunk states), so the backward
recomputes nothing sequential. Per chunk it forms the cotangents of ``dt·x``, of ``B`` and
``C`` (per head; summed over each group's heads in XLA) and of the log-decay ``cs`` with
matmuls of the same shapes as the forward; the reverse cumulative sum of ``dcs`` into
``dt`` and ``A`` and the ``x``/``dt`` products are elementwise XLA work after the kernel.
Forward-mode differentiation is not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ssmix._backend import pallas_interpret, pallas_variant
from ssmix.kernels.ssd.common import chunk_resets, pad_to_chunks

__all__ = ["ssd_pallas"]


def _dot(a, b, contract):
    """2-D matmul contracting ``a``'s axis ``contract[0]`` with ``b``'s axis ``contract[1]``,
    accumulated in the operands' (float32 or float64) precision."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=prec,
        preferred_element_type=a.dtype,
    )


def _chunk_decay(cs_col, cs_row):
    """The chunk's causal decay ``exp(cs_i − cs_j)`` for ``j ≤ i`` (zero above the diagonal)
    ``(Q, Q)`` and its total log-decay ``cs[Q − 1]`` ``(1, 1)``, the latter as a masked
    reduction (no scalar extraction inside a kernel)."""
    Q = cs_col.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    col = lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    causal = row >= col
    zeros = jnp.zeros((Q, Q), cs_col.dtype)
    decay = lax.select(causal, jnp.exp(lax.select(causal, cs_col - cs_row, zeros)), zeros)
    last = lax.broadcasted_iota(jnp.int32, (1, Q), 1) == Q - 1
    total = jnp.sum(lax.select(last, cs_row, jnp.zeros_like(cs_row)), axis=1, keepdims=True)
    return decay, total


def _gates(cs_col, cs_row, z=None):
    """The chunk's decay factors: ``decay (Q, Q)`` and ``total (1, 1)`` of
    :func:`_chunk_decay`, ``e_cs = exp(cs_i) (Q, 1)`` (entering state -> row ``i``),
    ``to_end = exp(total − cs_j) (Q, 1)`` (row ``j`` -> state after the chunk) and
    ``e_total = exp(total) (1, 1)``. With packed segments ``z = (z_col (Q, 1), z_row (1, Q))``,
    the chunk's segment-start counts (:func:`~ssmix.kernels.ssd.common.chunk_resets`), every
    factor spanning a segment start is zero (constant masks: the gradients keep their form)."""
    decay, total = _chunk_decay(cs_col, cs_row)
    e_cs = jnp.exp(cs_col)
    to_end = jnp.exp(total - cs_col)
    e_total = jnp.exp(total)
    if z is not None:
        z_col, z_row = z
        Q = cs_col.shape[0]
        last = lax.broadcasted_iota(jnp.int32, (1, Q), 1) == Q - 1
        z_last = jnp.sum(lax.select(last, z_row, jnp.zeros_like(z_row)), axis=1, keepdims=True)
        same = jnp.broadcast_to(z_col, (Q, Q)) == jnp.broadcast_to(z_row, (Q, Q))
        decay = lax.select(same, decay, jnp.zeros_like(decay))
        e_cs = lax.select(z_col == 0, e_cs, jnp.zeros_like(e_cs))
        to_end = lax.select(
            z_col == jnp.broadcast_to(z_last, (Q, 1)), to_end, jnp.zeros_like(to_end)
        )
        e_total = lax.select(z_last == 0, e_total, jnp.zeros_like(e_total))
    return decay, total, e_cs, to_end, e_total


def _chunk(x, dt, cs_col, cs_row, Bm, Cm, state, z=None):
    """One chunk: ``x (Q, P)``, ``dt, cs_col (Q, 1)``, ``cs_row (1, Q)``, ``Bm, Cm (Q, N)``,
    entering ``state (P, N)`` (``z``: packed segments, :func:`_gates`) -> ``(y (Q, P), state
    after the chunk (P, N))``."""
    u = x * dt
    decay, _, e_cs, to_end, e_total = _gates(cs_col, cs_row, z)
    scores = _dot(Cm, Bm, (1, 1)) * decay  # (Q, Q): C_i·B_j·exp(cs_i − cs_j), j ≤ i
    y = _dot(scores, u, (1, 0)) + e_cs * _dot(Cm, state, (1, 1))
    new_state = e_total * state + _dot(u * to_end, Bm, (0, 0))
    return y, new_state


def _chunk_bwd(x, dt, cs_col, cs_row, Bm, Cm, state, dy, dstate, z=None):
    """Reverse of :func:`_chunk`: ``state`` entering the chunk, ``dy (Q, P)`` and the
    cotangent ``dstate (P, N)`` of the state after the chunk -> ``((du (Q, P), dB (Q, N),
    dC (Q, N), dcs (Q, 1)), cotangent of the entering state (P, N))`` with ``u = dt·x`` and
    ``cs`` the within-chunk cumulative log-decay."""
    Q = x.shape[0]
    u = x * dt
    decay, total, e_cs, to_end, e_total = _gates(cs_col, cs_row, z)
    CB = _dot(Cm, Bm, (1, 1))  # (Q, Q)
    scores = CB * decay
    dS_B = _dot(Bm, dstate, (1, 1))  # (Q, P): dstate B_j
    du = _dot(scores, dy, (0, 0)) + to_end * dS_B
    Wd = _dot(dy, u, (1, 1)) * decay  # (Q, Q): dy_i·u_j·exp(cs_i − cs_j), j ≤ i
    dC = _dot(Wd, Bm, (1, 0)) + e_cs * _dot(dy, state, (1, 0))
    dB = _dot(Wd, Cm, (0, 0)) + to_end * _dot(u, dstate, (1, 0))
    W = Wd * CB
    from_state = e_cs * jnp.sum(dy * _dot(Cm, state, (1, 1)), axis=1, keepdims=True)
    to_state = to_end * jnp.sum(u * dS_B, axis=1, keepdims=True)
    # Row sums minus column sums of W; the column sums (1, Q) are moved to a (Q, 1) column
    # through the diagonal (no transpose, no matmul with a width-1 operand: Triton's dots
    # need every dimension ≥ 16).
    col_sums = jnp.sum(W, axis=0, keepdims=True)
    eye = lax.broadcasted_iota(jnp.int32, (Q, Q), 0) == lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    col_sums = jnp.sum(lax.select(eye, jnp.broadcast_to(col_sums, (Q, Q)), jnp.zeros_like(W)), 1)
    dcs = jnp.sum(W, axis=1, keepdims=True) - col_sums[:, None] + from_state - to_state
    d_total = e_total * jnp.sum(
        jnp.sum(dstate * state, axis=1, keepdims=True), axis=0, keepdims=True
    )
    d_total = d_total + jnp.sum(to_state, axis=0, keepdims=True)  # (1, 1)
    last_col = lax.broadcasted_iota(jnp.int32, (Q, 1), 0) == Q - 1
    dcs = dcs + lax.select(last_col, jnp.broadcast_to(d_total, (Q, 1)), jnp.zeros((Q, 1), x.dtype))
    d_entering = e_total * dstate + _dot(dy * e_cs, Cm, (0, 0))
    return (du, dB, dC, dcs), d_entering


def _forward_body(x, dt, cs_col, cs_row, Bm, Cm, state):
    y, new_state = _chunk(x, dt, cs_col, cs_row, Bm, Cm, state)
    return (y, state), new_state


def _forward_body_packed(x, dt, cs_col, cs_row, Bm, Cm, z_col, z_row, state):
    y, new_state = _chunk(x, dt, cs_col, cs_row, Bm, Cm, state, (z_col, z_row))
    return (y, state), new_state


def _backward_body_packed(x, dt, cs_col, cs_row, Bm, Cm, z_col, z_row, state, dy, dstate):
    return _chunk_bwd(x, dt, cs_col, cs_row, Bm, Cm, state, dy, dstate, (z_col, z_row))


def _tpu_kernel(body, n_in, *refs):
    """One chunk per grid step; the carry lives in the last output block (resident: its
    index does not depend on the chunk), seeded from the last input at the first step."""
    ins, outs = refs[:n_in], refs[n_in:]

    @pl.when(pl.program_id(2) == 0)
    def _():
        outs[-1][...] = ins[-1][...]

    results, carry = body(*(r[...] for r in ins[:-1]), outs[-1][...])
    for ref, val in zip(outs[:-1], results, strict=True):
        ref[...] = val.astype(ref.dtype)
    outs[-1][...] = carry


def _gpu_kernel(body, n_in, reverse, *refs):
    """All chunks of one (batch, head): a loop inside the kernel carrying the state."""
    ins, outs = refs[:n_in], refs[n_in:]
    nc = ins[0].shape[0]

    def step(k, carry):
        c = nc - 1 - k if reverse else k
        results, carry = body(*(r[c] for r in ins[:-1]), carry)
        for ref, val in zip(outs[:-1], results, strict=True):
            ref[c] = val.astype(ref.dtype)
        return carry

    outs[-1][...] = lax.fori_loop(0, nc, step, ins[-1][...])


def _launch(body, ins, outs, *, R, nc, reverse, interpret, target):
    """Run ``body`` over the chunks of every (batch, head) in one ``pallas_call``.

    ``ins``/``outs``: ``(array or ShapeDtypeStruct, kind)`` with kind ``"head"``
    ``(b, Hh, nc, …)``, ``"group"`` ``(b, G, nc, …)`` (head h reads group h // R),
    ``"batch"`` ``(b, 1, nc, …)`` (shared by every head) or ``"state"`` ``(b, Hh, P, N)``;
    the last input and output are the carry's start and end.
    """
    b, H = outs[0][0].shape[:2]
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        grid, lead = (b, H, nc), (None, None, None)
        chunk = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
        index = {
            "head": lambda i, h, c: (i, h, chunk(c), 0, 0),
            "group": lambda i, h, c: (i, lax.div(h, np.int32(R)), chunk(c), 0, 0),
            "batch": lambda i, h, c: (i, 0, chunk(c), 0, 0),
            "state": lambda i, h, c: (i, h, 0, 0),
        }
        kernel = functools.partial(_tpu_kernel, body, len(ins))
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    else:
        from jax.experimental.pallas import triton as pltriton

        grid, lead = (b, H), (None, None, nc)
        index = {
            "head": lambda i, h: (i, h, 0, 0, 0),
            "group": lambda i, h: (i, lax.div(h, np.int32(R)), 0, 0, 0),
            "batch": lambda i, h: (i, 0, 0, 0, 0),
            "state": lambda i, h: (i, h, 0, 0),
        }
        kernel = functools.partial(_gpu_kernel, body, len(ins), reverse)
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)

    def spec(v, kind):
        if kind == "state":
            return pl.BlockSpec((None, None, *v.shape[2:]), index[kind])
        return pl.BlockSpec((*lead, *v.shape[3:]), index[kind])

    return pl.pallas_call(
        kernel,
        out_shape=tuple(v for v, _ in outs),
        grid=grid,
        in_specs=[spec(v, k) for v, k in ins],
        out_specs=tuple(spec(v, k) for v, k in outs),
        compiler_params=params,
        interpret=interpret,
    )(*(v for v, _ in ins))


def _prepare(x, dt, A, B, C, chunk_size):
    """Pad to chunks and lay the inputs out per head: ``(Q, nc, x (b, Hh, nc, Q, P),
    dt, cs_col (b, Hh, nc, Q, 1), cs_row (b, Hh, nc, 1, Q), B, C (b, G, nc, Q, N))``."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q, nc, (x, dt, B, C) = pad_to_chunks(x, dt, B, C, chunk_size)
    cs = jnp.cumsum((dt * A).reshape(b, nc, Q, H), axis=2)  # ≤ 0, non-increasing per chunk
    per_head = lambda v: jnp.moveaxis(v, 3, 1)  # (b, nc, Q, H, …) -> (b, H, nc, Q, …)  # noqa: E731
    csc = per_head(cs[..., None])
    return (
        Q,
        nc,
        per_head(x.reshape(b, nc, Q, H, P)),
        per_head(dt.reshape(b, nc, Q, H, 1)),
        csc,
        jnp.swapaxes(csc, -1, -2),
        per_head(B.reshape(b, nc, Q, G, N)),
        per_head(C.reshape(b, nc, Q, G, N)),
    )


def _segment_inputs(labels, nc, Q, dtype):
    """Packed segments as kernel inputs: the chunk's segment-start counts as a column
    ``(b, 1, nc, Q, 1)`` and a row ``(b, 1, nc, 1, Q)`` in ``dtype`` (small integers, exact),
    shared by every head; ``[]`` without segments."""
    if labels is None:
        return []
    z = chunk_resets(labels, nc, Q).astype(dtype)[:, None, :, :, None]
    return [(z, "batch"), (jnp.swapaxes(z, -1, -2), "batch")]


def _forward(x, dt, A, B, C, h0, chunk_size, interpret, target, labels=None):
    """``(y, final state)`` and the state entering every chunk ``(b, Hh, nc, P, N)``."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q, nc, xh, dth, csc, csr, Bg, Cg = _prepare(x, dt, A, B, C, chunk_size)
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, x.dtype)  # noqa: E731
    ins = [(xh, "head"), (dth, "head"), (csc, "head"), (csr, "head")]
    ins += [(Bg, "group"), (Cg, "group")] + _segment_inputs(labels, nc, Q, x.dtype)
    ins += [(h0, "state")]
    outs = [(sds(b, H, nc, Q, P), "head"), (sds(b, H, nc, P, N), "head")]
    outs += [(sds(b, H, P, N), "state")]
    y, states, final = _launch(
        _forward_body if labels is None else _forward_body_packed,
        ins,
        outs,
        R=H // G,
        nc=nc,
        reverse=False,
        interpret=interpret,
        target=target,
    )
    y = jnp.moveaxis(y, 1, 3).reshape(b, nc * Q, H, P)[:, :L]
    return (y, final), states


def _backward(x, dt, A, B, C, states, dy, dfinal, chunk_size, interpret, target, labels=None):
    """Cotangents of ``(x, dt, A, B, C, h0)``: one kernel walking the chunks in reverse with
    the state cotangent on chip, then elementwise work and sums over heads in XLA."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q, nc, xh, dth, csc, csr, Bg, Cg = _prepare(x, dt, A, B, C, chunk_size)
    dy = jnp.pad(dy, ((0, 0), (0, nc * Q - L), (0, 0), (0, 0)))
    dyh = jnp.moveaxis(dy.reshape(b, nc, Q, H, P), 3, 1)
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, x.dtype)  # noqa: E731
    ins = [(xh, "head"), (dth, "head"), (csc, "head"), (csr, "head")]
    ins += [(Bg, "group"), (Cg, "group")] + _segment_inputs(labels, nc, Q, x.dtype)
    ins += [(states, "head"), (dyh, "head"), (dfinal, "state")]
    outs = [(sds(b, H, nc, Q, P), "head"), (sds(b, H, nc, Q, N), "head")]
    outs += [(sds(b, H, nc, Q, N), "head"), (sds(b, H, nc, Q, 1), "head")]
    outs += [(sds(b, H, P, N), "state")]
    body = _chunk_bwd if labels is None else _backward_body_packed
    du, dBh, dCh, dcs, dh0 = _launch(
        body, ins, outs, R=R, nc=nc, reverse=True, interpret=interpret, target=target
    )
    back = lambda v: jnp.moveaxis(v, 1, 3).reshape(b, nc * Q, H, *v.shape[4:])[:, :L]  # noqa: E731
    du = back(du)
    # cs = within-chunk cumsum of dt·A: its cotangent is a reverse cumsum inside each chunk.
    dcs = dcs[..., 0]  # (b, H, nc, Q)
    d_dtA = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1)
    d_dtA = jnp.moveaxis(d_dtA, 1, 3).reshape(b, nc * Q, H)[:, :L]
    dx = du * dt[..., None]
    ddt = jnp.sum(du * x, axis=-1) + d_dtA * A
    dA = jnp.sum(d_dtA * dt, axis=(0, 1))
    group_sum = lambda v: back(v).reshape(b, L, G, R, N).sum(axis=3)  # noqa: E731
    return dx, ddt, dA, group_sum(dBh), group_sum(dCh), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ssd_fused(x, dt, A, B, C, h0, labels, chunk_size, interpret, target):
    return _forward(x, dt, A, B, C, h0, chunk_size, interpret, target, labels)[0]


def _ssd_fused_fwd(x, dt, A, B, C, h0, labels, chunk_size, interpret, target):
    out, states = _forward(x, dt, A, B, C, h0, chunk_size, interpret, target, labels)
    return out, (x, dt, A, B, C, states, labels)


def _ssd_fused_bwd(chunk_size, interpret, target, saved, cotangents):
    x, dt, A, B, C, states, labels = saved
    dy, dfinal = cotangents
    grads = _backward(x, dt, A, B, C, states, dy, dfinal, chunk_size, interpret, target, labels)
    return (*grads, None)


_ssd_fused.defvjp(_ssd_fused_fwd, _ssd_fused_bwd)


def ssd_pallas(x, dt, A, B, C, h0, chunk_size, labels=None, *, interpret=None, target=None):
    """Pallas SSD, forward direction: ``(y (B, L, Hh, P), final state (B, Hh, P, N))`` from
    promoted inputs as in :func:`ssmix.kernels.ssd.ssd` (``h0`` or None; segment ``labels
    (B, L)`` of :func:`~ssmix.kernels.ssd.common.segment_labels` or None).

    ``interpret``: Pallas interpret mode (None: on a CPU default backend). ``target``:
    ``"tpu"`` or ``"gpu"`` kernel variant (None: :func:`ssmix._backend.pallas_variant`).
    Differentiable in reverse mode only, by the backward kernel (module docstring).
    """
    interpret = pallas_interpret(interpret)
    target = pallas_variant() if target is None else target
    if target not in ("tpu", "gpu"):
        raise ValueError(f"target must be 'tpu' or 'gpu'; got {target!r}")
    if h0 is None:
        b, _, H, P = x.shape
        h0 = jnp.zeros((b, H, P, B.shape[3]), x.dtype)
    return _ssd_fused(x, dt, A, B, C, h0, labels, chunk_size, interpret, target)
