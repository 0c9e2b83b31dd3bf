"""Softmax attention: the materialized reference and the blocked online-softmax form.

:func:`softmax_attention` with ``block_size=None`` materializes the ``Lq × Lk`` weights (the
reference); with an integer it runs the blocked form, whose forward and backward passes keep
memory O(L·(d + block_size)) beyond the inputs (a hand-written backward recomputes each score
block, flash-attention style). :func:`softmax_attention_weights` returns the weights.
:func:`softmax_block_size` is the per-backend default block the layers use.

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

__all__ = ["softmax_attention", "softmax_attention_weights", "softmax_block_size"]

# Fewest keys per step of the blocked form under the accelerator rules: below this a step's
# matmuls are too thin to be worth a round of kernel launches, and the (B, H, Lq, 128) tile
# is then only 128/d times the size of q itself.
_MIN_ACCEL_BLOCK = 128


def _validate_softmax(q, k, v, causal, mask):
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


def _softmax_valid(lq, lk, causal, mask):
    """Validity ``(B or 1, 1, Lq or 1, Lk)`` from the key mask and causality; None if all."""
    if mask is None and not causal:
        return None
    valid = jnp.ones((1, 1, 1, lk), bool)
    if mask is not None:
        valid = valid & mask[:, None, None, :]
    if causal:
        valid = valid & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])[None, None]
    return valid


def softmax_attention_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention weights ``softmax(scale · q kᵀ)``: ``q (B, H, Lq, d), k (B, H, Lk, d)``.

    Returns ``(B, H, Lq, Lk)``. ``mask (B, Lk)`` bool marks valid keys; ``causal`` (Lq = Lk)
    lets query t see keys s ≤ t. Rows with no valid key are all zero. ``scale`` defaults to 1/√d.
    """
    _validate_softmax(q, k, k, causal, mask)
    dtype = compute_dtype(q, k)
    scale = default_scale(scale, q.shape[-1])
    (k,) = isolate(None if mask is None else mask[:, None, :], k.astype(dtype))
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(dtype) * scale, k)
    w = masked_softmax(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask))
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
) -> jax.Array:
    """Multi-head softmax attention ``softmax(scale · q kᵀ) v``.

    Shapes: ``q (B, H, Lq, d)``, ``k (B, H, Lk, d)``, ``v (B, H, Lk, dv)`` -> ``(B, H, Lq, dv)``
    (heads before length). ``mask (B, Lk)`` bool marks valid keys (True = valid); ``causal``
    (needs Lq = Lk) lets query t attend to keys s ≤ t. Queries without any valid key output 0.
    ``scale`` defaults to 1/√d. Masked keys and values are replaced by zeros (``jnp.where``)
    before use, so a NaN or inf stored there reaches no output or gradient; the mask applies
    to keys only, so a non-finite query gives a non-finite output row, as it should.

    ``block_size=None`` materializes the ``Lq × Lk`` weights (the reference). An integer runs
    the blocked online-softmax form over key blocks of that size: the weights are never
    stored, forward and backward use O(B·H·Lq·(d + dv + block_size)) memory beyond the
    inputs; the backward pass recomputes each block's scores (flash-attention style).
    """
    _validate_softmax(q, k, v, causal, mask)
    out_dtype = jnp.result_type(q, k, v)
    dtype = compute_dtype(q, k, v)
    scale = default_scale(scale, q.shape[-1])
    # The scale goes on q (Lq·d entries), not on the Lq × Lk scores.
    q, k, v = q.astype(dtype) * scale, k.astype(dtype), v.astype(dtype)
    k, v = isolate(None if mask is None else mask[:, None, :], k, v)
    if block_size is None:
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        e, z = softmax_parts(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask))
        return normalise(jnp.einsum("bhqk,bhkc->bhqc", e, v), z).astype(out_dtype)
    check_positive_int("block_size", block_size)
    kmask = jnp.ones((1, k.shape[2]), bool) if mask is None else mask
    block = min(block_size, k.shape[2])
    return _flash(q, k, v, kmask, causal, block).astype(out_dtype)


def _flash_scan_inputs(k, v, kmask, block):
    lk = k.shape[2]
    kb = blocks(k, 2, block)  # (nb, B, H, block, d)
    vb = blocks(v, 2, block)
    mb = blocks(kmask, 1, block)  # (nb, B|1, block); padding is False
    ib = blocks(jnp.arange(lk), 0, block)  # (nb, block)
    return kb, vb, mb, ib


def _flash_block_valid(lq, causal, mb, ib):
    valid = mb[:, None, None, :]
    if causal:
        valid = valid & (jnp.arange(lq)[:, None] >= ib[None, :])[None, None]
    return valid


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, kmask, causal, block):
    """Blocked online-softmax attention of pre-scaled queries (see :func:`softmax_attention`)."""
    return _flash_fwd(q, k, v, kmask, causal, block)[0]


def _flash_fwd(q, k, v, kmask, causal, block):
    b, h, lq, _ = q.shape
    dv = v.shape[-1]

    def body(carry, xs):
        kb, vb, mb, ib = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kb)
        valid = _flash_block_valid(lq, causal, mb, ib)
        carry = online_update(
            carry, s, valid, (-1,), lambda p: jnp.einsum("bhqk,bhkc->bhqc", p, vb)
        )
        return carry, None

    init = (
        jnp.full((b, h, lq), -jnp.inf, q.dtype),
        jnp.zeros((b, h, lq), q.dtype),
        jnp.zeros((b, h, lq, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(body, init, _flash_scan_inputs(k, v, kmask, block))
    o, lse = finish(*carry)
    return o, (q, k, v, kmask, o, lse)


def _flash_bwd(causal, block, res, do):
    q, k, v, kmask, o, lse = res
    lq, lk = q.shape[2], k.shape[2]
    delta = jnp.sum(do * o, axis=-1)  # (B, H, Lq)

    def body(dq, xs):
        kb, vb, mb, ib = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kb)
        valid = _flash_block_valid(lq, causal, mb, ib)
        lse_b = lse[..., None]
        p = jnp.where(valid, jnp.exp(jnp.where(valid, s, lse_b) - lse_b), 0.0)
        dv_b = jnp.einsum("bhqk,bhqc->bhkc", p, do)
        ds = p * (jnp.einsum("bhqc,bhkc->bhqk", do, vb) - delta[..., None])
        dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kb)
        dk_b = jnp.einsum("bhqk,bhqd->bhkd", ds, q)
        return dq, (dk_b, dv_b)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros_like(q), _flash_scan_inputs(k, v, kmask, block))
    return dq, unblock(dk, 2, lk), unblock(dv, 2, lk), None


_flash.defvjp(_flash_fwd, _flash_bwd)
