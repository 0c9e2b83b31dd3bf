"""Softmax attention: the materialized reference and the blocked online-softmax form.

:func:`softmax_attention` with ``block_size=None`` materializes the ``Lq × Lk`` weights (the
reference); with an integer it runs the blocked form, whose forward and backward passes keep
memory O(L·(d + block_size)) beyond the inputs (a hand-written backward recomputes each score
block, flash-attention style). :func:`softmax_attention_weights` returns the weights.
:func:`softmax_block_size` is the per-backend default block the layers use.

Packed sequences: both take ``segment_ids (B, L)`` (integers, Lq = Lk = L; a segment is a
contiguous run of equal ids, :func:`ssmix.kernels.ssd.common.segment_labels`): query t then
attends key s only when no segment boundary lies between them, so every document of a packed
row sees only itself, as if it ran alone. The blocked form compares one ``(Lq, block)`` tile
of segment labels per step, never an ``Lq × Lk`` one.

Why not ``jax.nn.dot_product_attention`` under the accelerator rules (jax 0.10): its ``"xla"``
implementation materializes the ``Lq × Lk`` logits, and its ``"cudnn"`` one cannot be traced
on a host without cuDNN ("cuDNN is not detected"), so neither the accelerator forms nor their
CUDA/TPU lowering could be checked from a CPU host; it also takes key padding only as
right-aligned lengths (this kernel takes any boolean key mask) and has no float64.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ssmix._backend import resolve_backend
from ssmix._checks import check_ndim, check_positive_int
from ssmix.kernels.attention._common import (
    blocks,
    check_float,
    check_mask,
    compute_dtype,
    default_scale,
    finish,
    isolate,
    masked_softmax,
    normalise,
    online_update,
    softmax_parts,
    tile_fit,
    tile_fits,
    unblock,
)
from ssmix.kernels.scan._common import check_segment_ids
from ssmix.kernels.ssd.common import segment_labels

__all__ = ["softmax_attention", "softmax_attention_weights", "softmax_block_size"]

# Fewest keys per step of the blocked form under the accelerator rules: below this a step's
# matmuls are too thin to be worth a round of kernel launches, and the (B, H, Lq, 128) tile
# is then only 128/d times the size of q itself.
_MIN_ACCEL_BLOCK = 128


def _validate_softmax(q, k, v, causal, mask, segment_ids):
    """Check the inputs; return the segment labels ``(B, L)`` int32, or None."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, x, 4, "(B, H, L, d)")
        check_float(name, x)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "q, k and v must share the batch and head axes (B, H); got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must share the head dimension d; got {q.shape}, {k.shape}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must have the same length Lk; got {k.shape}, {v.shape}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal attention needs as many queries as keys; got Lq={q.shape[2]}, Lk={k.shape[2]}"
        )
    check_mask(mask, (q.shape[0], k.shape[2]), "(B, Lk)")
    if segment_ids is None:
        return None
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            "segment_ids (packed sequences) needs as many queries as keys; got "
            f"Lq={q.shape[2]}, Lk={k.shape[2]}"
        )
    return segment_labels(check_segment_ids(segment_ids, q.shape[0], k.shape[2]))


def _softmax_valid(lq, lk, causal, mask, labels):
    """Validity ``(B or 1, 1, Lq or 1, Lk)`` from the key mask, causality and the segment
    labels ``(B, L)`` (query and key in the same segment); None if all valid."""
    if mask is None and not causal and labels is None:
        return None
    valid = jnp.ones((1, 1, 1, lk), bool)
    if mask is not None:
        valid = valid & mask[:, None, None, :]
    if causal:
        valid = valid & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])[None, None]
    if labels is not None:
        valid = valid & (labels[:, None, :, None] == labels[:, None, None, :])
    return valid


def softmax_attention_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Attention weights ``softmax(scale · q kᵀ)``: ``q (B, H, Lq, d), k (B, H, Lk, d)``.

    Returns ``(B, H, Lq, Lk)``. ``mask (B, Lk)`` bool marks valid keys; ``causal`` (Lq = Lk)
    lets query t see keys s ≤ t; ``segment_ids (B, L)`` integers (Lq = Lk = L, packed
    sequences) let query t see only keys of its own segment (contiguous run of equal ids), so
    the weights across segments are exactly 0. Rows with no valid key are all zero. ``scale``
    defaults to 1/√d.
    """
    labels = _validate_softmax(q, k, k, causal, mask, segment_ids)
    dtype = compute_dtype(q, k)
    scale = default_scale(scale, q.shape[-1])
    (k,) = isolate(None if mask is None else mask[:, None, :], k.astype(dtype))
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(dtype) * scale, k)
    w = masked_softmax(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask, labels))
    return w.astype(jnp.result_type(q, k))


def softmax_block_size(
    batch: int,
    heads: int,
    lq: int,
    lk: int,
    *,
    dtype=jnp.float32,
    backend: str | None = None,
) -> int | None:
    """The ``block_size`` the layers pass to :func:`softmax_attention` by default, per backend.

    ``batch``, ``heads``, ``lq``, ``lk`` are the shapes of ``q (B, H, Lq, d)`` and
    ``k (B, H, Lk, d)``; ``dtype`` the compute dtype (float32 for bfloat16 inputs); ``backend``
    defaults to :func:`ssmix.auto_backend`. Returns None (materialized weights) or an int:

    - ``"cpu"``: None at every length (the materialized form: the CPU default, unchanged).
    - ``"gpu"``, ``"tpu"``: None while the ``(B, H, Lq, Lk)`` scores fit in 256 MiB (one
      batched matmul and no loop); beyond, the largest power of two (at least 128) whose
      ``(B, H, Lq, block)`` score tile fits in 256 MiB. Forward and backward then run
      ``2·⌈Lk / block⌉`` loop steps; at B = 2, one head, L = 16384 in float32 that is
      block 2048 and 16 steps, never materialising the 2 GiB ``L × L`` scores.
    """
    backend = resolve_backend(backend)
    if backend == "cpu":
        return None
    row_bytes = batch * heads * lq * jnp.dtype(dtype).itemsize
    if tile_fits(row_bytes * lk):
        return None
    return max(tile_fit(row_bytes), _MIN_ACCEL_BLOCK)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    block_size: int | None = None,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Multi-head softmax attention ``softmax(scale · q kᵀ) v``.

    Shapes: ``q (B, H, Lq, d)``, ``k (B, H, Lk, d)``, ``v (B, H, Lk, dv)`` -> ``(B, H, Lq, dv)``
    (heads before length). ``mask (B, Lk)`` bool marks valid keys (True = valid); ``causal``
    (needs Lq = Lk) lets query t attend to keys s ≤ t. Queries without any valid key output 0.
    ``scale`` defaults to 1/√d. Masked keys and values are replaced by zeros (``jnp.where``)
    before use, so a NaN or inf stored there reaches no output or gradient; the mask applies
    to keys only, so a non-finite query gives a non-finite output row, as it should.

    ``segment_ids (B, L)`` integers (packed sequences; needs Lq = Lk = L): a segment is a
    contiguous run of equal ids (a repeated id after a different one starts a new segment),
    and query t attends key s only when both are in the same segment, combined with
    ``causal`` and ``mask``: each segment's outputs equal running it alone. A ``TypeError``
    for a non-integer array, a ``ValueError`` for another shape or Lq ≠ Lk.

    ``block_size=None`` materializes the ``Lq × Lk`` weights (the reference). An integer runs
    the blocked online-softmax form over key blocks of that size: the weights are never
    stored, forward and backward use O(B·H·Lq·(d + dv + block_size)) memory beyond the
    inputs; the backward pass recomputes each block's scores (flash-attention style). The
    segment labels of each key block travel with it through the loop; the query labels
    ``(B, Lq)`` are a residual of the backward pass.
    """
    labels = _validate_softmax(q, k, v, causal, mask, segment_ids)
    out_dtype = jnp.result_type(q, k, v)
    dtype = compute_dtype(q, k, v)
    scale = default_scale(scale, q.shape[-1])
    # The scale goes on q (Lq·d entries), not on the Lq × Lk scores.
    q, k, v = q.astype(dtype) * scale, k.astype(dtype), v.astype(dtype)
    k, v = isolate(None if mask is None else mask[:, None, :], k, v)
    if block_size is None:
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        e, z = softmax_parts(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask, labels))
        return normalise(jnp.einsum("bhqk,bhkc->bhqc", e, v), z).astype(out_dtype)
    check_positive_int("block_size", block_size)
    kmask = jnp.ones((1, k.shape[2]), bool) if mask is None else mask
    block = min(block_size, k.shape[2])
    return _flash(q, k, v, kmask, labels, causal, block).astype(out_dtype)


def _flash_scan_inputs(k, v, kmask, labels, block):
    lk = k.shape[2]
    kb = blocks(k, 2, block)  # (nb, B, H, block, d)
    vb = blocks(v, 2, block)
    mb = blocks(kmask, 1, block)  # (nb, B|1, block); padding is False
    ib = blocks(jnp.arange(lk), 0, block)  # (nb, block)
    # (nb, B, block) key labels; padding (label 0) is masked by mb anyway.
    zb = None if labels is None else blocks(labels, 1, block)
    return kb, vb, mb, ib, zb


def _flash_block_valid(lq, causal, labels, mb, ib, zb):
    """Validity ``(B|1, 1, Lq|1, block)`` of one key block: mask, causality, same segment."""
    valid = mb[:, None, None, :]
    if causal:
        valid = valid & (jnp.arange(lq)[:, None] >= ib[None, :])[None, None]
    if labels is not None:
        valid = valid & (labels[:, None, :, None] == zb[:, None, None, :])
    return valid


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, kmask, labels, causal, block):
    """Blocked online-softmax attention of pre-scaled queries (see :func:`softmax_attention`);
    ``labels (B, L)`` int32 segment labels or None."""
    return _flash_fwd(q, k, v, kmask, labels, causal, block)[0]


def _flash_fwd(q, k, v, kmask, labels, causal, block):
    b, h, lq, _ = q.shape
    dv = v.shape[-1]

    def body(carry, xs):
        kb, vb, mb, ib, zb = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kb)
        valid = _flash_block_valid(lq, causal, labels, mb, ib, zb)
        carry = online_update(
            carry, s, valid, (-1,), lambda p: jnp.einsum("bhqk,bhkc->bhqc", p, vb)
        )
        return carry, None

    init = (
        jnp.full((b, h, lq), -jnp.inf, q.dtype),
        jnp.zeros((b, h, lq), q.dtype),
        jnp.zeros((b, h, lq, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(body, init, _flash_scan_inputs(k, v, kmask, labels, block))
    o, lse = finish(*carry)
    return o, (q, k, v, kmask, labels, o, lse)


def _flash_bwd(causal, block, res, do):
    q, k, v, kmask, labels, o, lse = res
    lq, lk = q.shape[2], k.shape[2]
    delta = jnp.sum(do * o, axis=-1)  # (B, H, Lq)

    def body(dq, xs):
        kb, vb, mb, ib, zb = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kb)
        valid = _flash_block_valid(lq, causal, labels, mb, ib, zb)
        lse_b = lse[..., None]
        p = jnp.where(valid, jnp.exp(jnp.where(valid, s, lse_b) - lse_b), 0.0)
        dv_b = jnp.einsum("bhqk,bhqc->bhkc", p, do)
        ds = p * (jnp.einsum("bhqc,bhkc->bhqk", do, vb) - delta[..., None])
        dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kb)
        dk_b = jnp.einsum("bhqk,bhqd->bhkd", ds, q)
        return dq, (dk_b, dv_b)

    xs = _flash_scan_inputs(k, v, kmask, labels, block)
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros_like(q), xs)
    return dq, unblock(dk, 2, lk), unblock(dv, 2, lk), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
