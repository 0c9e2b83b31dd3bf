"""Softmax attention, Kronecker attention (KAO) and tensor / 2-simplicial attention kernels.

Pure functions over jax arrays (REFERENCE §8). Every fast form has a reference beside it:

- :func:`softmax_attention`: the materialized reference (``block_size=None``) and a blocked
  online-softmax form whose forward and backward passes keep memory O(L·(d + block_size))
  beyond the inputs (a hand-written backward recomputes each score block).
- :func:`kao`: Kronecker attention on 2-D ``(B, h, w, c)`` and 3-D ``(B, t, h, w, c)`` grids;
  :func:`kao_mixing_matrix` builds the same operator as an explicit ``N × N`` matrix.
- :func:`tensor_attention`: triple-wise attention with one softmax over all n² key pairs.
  ``"naive"`` (ordinary attention over the n² pair keys), ``"blocked"`` (exact, online softmax
  over pair blocks, hand-written backward), ``"simplicial"`` (causal windows, online softmax
  over the k2 window) and ``"approx"`` (truncated Taylor features, near-linear in n).
  :func:`tensor_attention_weights` materializes the ``n × n²`` weight tensor and
  :func:`tensor_attention_error_bound` evaluates the approximation's documented error bound.

Masks are boolean, True at valid positions. A query with no valid key (or key pair) gets a
zero output and zero gradients, never NaN. Inputs of lower precision (bfloat16, float16) are
computed in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ssmix._checks import check_choice, check_ndim, check_positive_int

__all__ = [
    "softmax_attention",
    "softmax_attention_weights",
    "kao",
    "kao_mixing_matrix",
    "tensor_attention",
    "tensor_attention_weights",
    "tensor_attention_error_bound",
    "TENSOR_METHODS",
    "KAO_VARIANTS",
]

TENSOR_METHODS = ("naive", "blocked", "simplicial", "approx")
KAO_VARIANTS = ("kv", "qkv")

# Default blocks of the tensor-attention kernels: 8 × 128 key pairs per online-softmax step of
# "blocked", 64 offsets of the k2 window per step of "simplicial", 256 positions per chunk of
# "approx" (benchmarks/attention.py).
_DEFAULT_PAIR_BLOCK = (8, 128)
_DEFAULT_WINDOW_BLOCK = 64
_DEFAULT_APPROX_CHUNK = 256


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """float32 for low-precision inputs, else the inputs' common floating dtype."""
    return jnp.result_type(*xs, jnp.float32)


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{name} must be a real floating-point array; got dtype {x.dtype}")


def _check_mask(mask: jax.Array | None, shape: tuple[int, ...], shape_doc: str) -> None:
    if mask is None:
        return
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid); got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"mask must have shape {shape_doc} = {tuple(shape)}; got {mask.shape}")


def _default_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")
    return float(scale)


def _softmax_parts(s: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax over the last axis restricted to ``valid`` (None: all valid).

    Returns ``e = exp(s − max)`` (0 where invalid) and its row sums ``z`` (keepdims; 0 for a
    row without a valid entry). Invalid scores are replaced before ``exp`` (not only after) so
    that neither the value nor the gradient can see an overflow there. Callers normalise
    after contracting with the values (:func:`_normalise`): one pass less over the scores.
    """
    if valid is None:
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - m)
    else:
        m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.where(valid, jnp.exp(jnp.where(valid, s, m) - m), 0.0)
    return e, jnp.sum(e, axis=-1, keepdims=True)


def _normalise(o: jax.Array, z: jax.Array) -> jax.Array:
    """Divide by the softmax row sums; rows without a valid entry (z = 0) stay 0."""
    return o / jnp.where(z > 0, z, 1.0)


def _masked_softmax(s: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Softmax over the last axis restricted to ``valid``; rows with no valid entry give 0."""
    return _normalise(*_softmax_parts(s, valid))


def _online_update(carry, s, valid, axes, weighted_values):
    """One online-softmax step: fold a block of scores ``s`` into ``(m, l, acc)``.

    ``axes`` are the block's key axes of ``s``; ``m`` and ``l`` (running max and normaliser)
    have the shape of ``s`` without them, ``acc`` has a trailing value axis.
    ``weighted_values(p)`` returns ``Σ_keys p · value`` for the block.
    """
    m, l, acc = carry
    # The output does not depend on the running max, so no gradient flows through it.
    m_blk = jax.lax.stop_gradient(jnp.max(jnp.where(valid, s, -jnp.inf), axis=axes))
    m_new = jnp.maximum(m, m_blk)
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    m_b = jnp.expand_dims(m_safe, axes)
    p = jnp.where(valid, jnp.exp(jnp.where(valid, s, m_b) - m_b), 0.0)
    alpha = jnp.exp(m - m_safe)  # exp(-inf) = 0 while nothing valid has been seen
    l_new = alpha * l + jnp.sum(p, axis=axes)
    acc_new = alpha[..., None] * acc + weighted_values(p)
    return m_new, l_new, acc_new


def _finish(m, l, acc):
    """Output and log-normaliser from the online-softmax state; empty rows give 0."""
    has = l > 0
    o = acc / jnp.where(has, l, 1.0)[..., None]
    lse = jnp.where(has, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(has, l, 1.0)), 0.0)
    return o, lse


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Pad ``axis`` to a multiple of ``block`` and move the block index to the front."""
    n = x.shape[axis]
    nb = -(-n // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, nb * block - n)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblock(x: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of :func:`_blocks` for an array whose block index is in front."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


# ----------------------------------------------------------------------------- softmax attention


def _validate_softmax(q, k, v, causal, mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, x, 4, "(B, H, L, d)")
        _check_float(name, x)
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
    _check_mask(mask, (q.shape[0], k.shape[2]), "(B, Lk)")


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
    dtype = _compute_dtype(q, k)
    scale = _default_scale(scale, q.shape[-1])
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(dtype) * scale, k.astype(dtype))
    w = _masked_softmax(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask))
    return w.astype(jnp.result_type(q, k))


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
    ``scale`` defaults to 1/√d.

    ``block_size=None`` materializes the ``Lq × Lk`` weights (the reference). An integer runs
    the blocked online-softmax form over key blocks of that size: the weights are never
    stored, forward and backward use O(B·H·Lq·(d + dv + block_size)) memory beyond the
    inputs; the backward pass recomputes each block's scores (flash-attention style).
    """
    _validate_softmax(q, k, v, causal, mask)
    out_dtype = jnp.result_type(q, k, v)
    dtype = _compute_dtype(q, k, v)
    scale = _default_scale(scale, q.shape[-1])
    # The scale goes on q (Lq·d entries), not on the Lq × Lk scores.
    q, k, v = q.astype(dtype) * scale, k.astype(dtype), v.astype(dtype)
    if block_size is None:
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        e, z = _softmax_parts(s, _softmax_valid(q.shape[2], k.shape[2], causal, mask))
        return _normalise(jnp.einsum("bhqk,bhkc->bhqc", e, v), z).astype(out_dtype)
    check_positive_int("block_size", block_size)
    kmask = jnp.ones((1, k.shape[2]), bool) if mask is None else mask
    block = min(block_size, k.shape[2])
    return _flash(q, k, v, kmask, causal, block).astype(out_dtype)


def _flash_scan_inputs(k, v, kmask, block):
    lk = k.shape[2]
    kb = _blocks(k, 2, block)  # (nb, B, H, block, d)
    vb = _blocks(v, 2, block)
    mb = _blocks(kmask, 1, block)  # (nb, B|1, block); padding is False
    ib = _blocks(jnp.arange(lk), 0, block)  # (nb, block)
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
        carry = _online_update(
            carry, s, valid, (-1,), lambda p: jnp.einsum("bhqk,bhkc->bhqc", p, vb)
        )
        return carry, None

    init = (
        jnp.full((b, h, lq), -jnp.inf, q.dtype),
        jnp.zeros((b, h, lq), q.dtype),
        jnp.zeros((b, h, lq, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(body, init, _flash_scan_inputs(k, v, kmask, block))
    o, lse = _finish(*carry)
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
    return dq, _unblock(dk, 2, lk), _unblock(dv, 2, lk), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- Kronecker attention


def _kao_grid(name: str, x: jax.Array) -> tuple[int, ...]:
    check_ndim(name, x, (4, 5), "(B, h, w, c) or (B, t, h, w, c)")
    _check_float(name, x)
    return tuple(x.shape[1:-1])


def _modal_means(x: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-mode means over all other grid axes, concatenated: ``(B, *grid, c) -> (B, S, c)``.

    ``S = Σ grid`` (h + w, or t + h + w). With ``weights (B, *grid)`` (the mask as 0/1) the
    means run over valid positions only; the second result ``(B, S)`` is True where a slice
    has at least one valid position.
    """
    grid_axes = tuple(range(1, x.ndim - 1))
    means, counts = [], []
    for a in grid_axes:
        others = tuple(ax for ax in grid_axes if ax != a)
        if weights is None:
            means.append(jnp.mean(x, axis=others))
            counts.append(jnp.ones((x.shape[0], x.shape[a]), x.dtype))
        else:
            wsum = jnp.sum(weights, axis=tuple(ax for ax in others))
            total = jnp.sum(x * weights[..., None], axis=others)
            means.append(total / jnp.maximum(wsum, 1.0)[..., None])
            counts.append(wsum)
    return jnp.concatenate(means, axis=1), jnp.concatenate(counts, axis=1) > 0


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``(B, S, c) -> (B, heads, S, c / heads)``; c is checked to be divisible beforehand."""
    c = x.shape[-1]
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (num_heads, c // num_heads)), -2, 1)


def _kao_prepare(x, variant, num_heads, scale, keys, values, mask):
    """Validate, cast and build the per-head pieces shared by :func:`kao` and its matrix."""
    check_choice("variant", variant, KAO_VARIANTS)
    check_positive_int("num_heads", num_heads)
    grid = _kao_grid("x", x)
    keys = x if keys is None else keys
    values = x if values is None else values
    for name, y in (("keys", keys), ("values", values)):
        if _kao_grid(name, y) != grid or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{name} must share x's batch and grid axes {x.shape[:-1]}; got {y.shape}"
            )
    if keys.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"x (queries) and keys need the same channels; got {x.shape[-1]}, {keys.shape[-1]}"
        )
    _check_mask(mask, x.shape[:-1], "(B, *grid)")
    dtype = _compute_dtype(x, keys, values)
    x, keys, values = x.astype(dtype), keys.astype(dtype), values.astype(dtype)
    for name, y in (("x", x), ("values", values)):
        if y.shape[-1] % num_heads:
            raise ValueError(
                f"{name} channels ({y.shape[-1]}) must be divisible by num_heads ({num_heads})"
            )
    weights = None if mask is None else mask.astype(dtype)
    ck, valid = _modal_means(keys, weights)
    x = x * _default_scale(scale, x.shape[-1] // num_heads)
    kh = _split_heads(ck, num_heads)  # (B, H, S, dh)
    if variant == "kv":
        qh = _split_heads(x.reshape(x.shape[0], -1, x.shape[-1]), num_heads)  # (B,H,N,dh)
    else:
        qh = _split_heads(_modal_means(x, weights)[0], num_heads)  # (B, H, S, dh)
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh)  # (B, H, N or S, S)
    valid = None if weights is None else valid[:, None, None, :]
    return grid, dtype, weights, values, s, valid


def _kao_spread(o: jax.Array, grid: tuple[int, ...]) -> jax.Array:
    """QKV output: position (i, j[, k]) sums the slice outputs of its row, column (and tube).

    ``o (B, H, S, dv) -> (B, H, *grid, dv)``.
    """
    out = 0.0
    start = 0
    for a, n_a in enumerate(grid):
        part = o[:, :, start : start + n_a]  # (B, H, n_a, dv)
        shape = [o.shape[0], o.shape[1]] + [1] * len(grid) + [o.shape[-1]]
        shape[2 + a] = n_a
        out = out + part.reshape(shape)
        start += n_a
    return out


def kao(
    x: jax.Array,
    *,
    variant: str = "kv",
    num_heads: int = 1,
    scale: float | None = None,
    keys: jax.Array | None = None,
    values: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Kronecker attention operator (KAO, REFERENCE §8) on an image or video grid.

    Shapes: ``x (B, h, w, c)`` or ``(B, t, h, w, c)`` holds the queries; ``keys`` (same shape,
    default ``x``) and ``values`` (``(B, *grid, cv)``, default ``x``) are reduced to their
    per-mode means: for each grid mode, the mean over all other modes, giving
    ``S = h + w`` (or ``t + h + w``) summary vectors ``C = [L̄; H̄(; T̄)]``. Channels are split
    into ``num_heads`` heads; ``scale`` defaults to 1/√(c / num_heads). Returns
    ``(B, *grid, cv)``.

    - ``variant="kv"``: every grid position queries the S summaries, ``O = softmax(Q Cₖᵀ) Cᵥ``;
      cost O(N·S·c) with N = h·w(·t) instead of O(N²·c).
    - ``variant="qkv"``: the summaries query themselves, ``Ō = softmax(C_q C_kᵀ) C_v``, and
      position (i, j) outputs ``Ō[i] + Ō[h + j]`` (3-D: ``Ō[a] + Ō[t + i] + Ō[t + h + j]``);
      cost O(S²·c).

    ``mask (B, *grid)`` bool (True = valid): the means run over valid positions only, slices
    without a valid position are dropped as keys, and masked positions output 0, so masked
    positions never influence valid outputs.
    """
    out_dtype = jnp.result_type(x, x if keys is None else keys, x if values is None else values)
    grid, _, weights, values, s, valid = _kao_prepare(
        x, variant, num_heads, scale, keys, values, mask
    )
    cv, _ = _modal_means(values, weights)
    vh = _split_heads(cv, num_heads)  # (B, H, S, dvh)
    e, z = _softmax_parts(s, valid)
    o = _normalise(jnp.einsum("bhqk,bhkc->bhqc", e, vh), z)
    if variant == "kv":
        o = o.reshape(o.shape[:2] + grid + o.shape[-1:])
    else:
        o = _kao_spread(o, grid)
    o = jnp.moveaxis(o, 1, -2).reshape(x.shape[:-1] + (values.shape[-1],))
    if weights is not None:
        o = o * weights[..., None]
    return o.astype(out_dtype)


def kao_mixing_matrix(
    x: jax.Array,
    *,
    variant: str = "kv",
    num_heads: int = 1,
    scale: float | None = None,
    keys: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """KAO as an explicit linear map on the values: ``(B, *grid, c) -> M (B, H, N, N)``.

    N = h·w(·t), positions flattened in row-major grid order. For value channels of head ``h``,
    ``kao(x, ..., values=v)`` equals ``M[:, h] @ v_flat[..., head h channels]``. Each row of M is
    the KAO weights composed with the per-mode averaging (KV) or additionally with the
    row/column spreading (QKV). Arguments as in :func:`kao`; O(N²) memory (small grids only).
    """
    out_dtype = jnp.result_type(x, x if keys is None else keys)
    grid, dtype, weights, _, s, valid = _kao_prepare(x, variant, num_heads, scale, keys, None, mask)
    w = _masked_softmax(s, valid)
    b, n = x.shape[0], math.prod(grid)
    wgt = jnp.ones((b,) + grid, dtype) if weights is None else weights
    # avg[b, s, p]: weight of position p in summary s (mode means over valid positions).
    rows = []
    for a in range(len(grid)):
        onehot = jax.nn.one_hot(jnp.indices(grid)[a], grid[a], dtype=dtype)  # (*grid, n_a)
        contrib = wgt[..., None] * onehot  # (B, *grid, n_a)
        contrib = contrib.reshape(b, n, grid[a])
        rows.append(contrib / jnp.maximum(jnp.sum(contrib, axis=1, keepdims=True), 1.0))
    avg = jnp.swapaxes(jnp.concatenate(rows, axis=-1), 1, 2)  # (B, S, N)
    m = jnp.einsum("bhqs,bsn->bhqn", w, avg)
    if variant == "qkv":
        spread = jnp.concatenate(
            [
                jax.nn.one_hot(jnp.indices(grid)[a].reshape(n), grid[a], dtype=dtype)
                for a in range(len(grid))
            ],
            axis=-1,
        )  # (N, S)
        m = jnp.einsum("ns,bhsm->bhnm", spread, m)
    if weights is not None:
        m = m * weights.reshape(b, 1, n, 1)
    return m.astype(out_dtype)


# ----------------------------------------------------------------------------- tensor attention


def _validate_tensor(q, k1, k2, v1, v2, mask):
    for name, x in (("q", q), ("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2)):
        check_ndim(name, x, 3, "(B, n, d)")
        _check_float(name, x)
    if not (q.shape == k1.shape == k2.shape):
        raise ValueError(
            f"q, k1 and k2 must have the same shape (B, n, d); got {q.shape}, {k1.shape}, "
            f"{k2.shape}"
        )
    if v1.shape != v2.shape or v1.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"v1 and v2 must have the same shape (B, n, dv) with q's (B, n) = {q.shape[:2]}; "
            f"got {v1.shape}, {v2.shape}"
        )
    _check_mask(mask, q.shape[:2], "(B, n)")


def _check_windows(causal: bool, w1: int | None, w2: int | None) -> None:
    for name, w in (("w1", w1), ("w2", w2)):
        if w is not None:
            check_positive_int(name, w)
            if not causal:
                raise ValueError(f"{name} (a causal window) needs causal=True")


def _pair_valid(n, causal, w1, w2, m1, m2, i_idx, j_idx):
    """Validity of key pairs for every query: ``(B|1, n, len(i_idx), len(j_idx))``.

    ``m1 (B|1, ni)`` and ``m2 (B|1, nj)`` are the key masks of the two index sets.
    """
    valid = m1[:, None, :, None] & m2[:, None, None, :]
    lq = jnp.arange(n)[:, None, None]
    if causal:
        valid = valid & (i_idx[None, :, None] <= lq) & (j_idx[None, None, :] <= lq)
    if w1 is not None:
        valid = valid & (i_idx[None, :, None] > lq - w1)
    if w2 is not None:
        valid = valid & (j_idx[None, None, :] > lq - w2)
    return valid


def tensor_attention_weights(
    q: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    mask: jax.Array | None = None,
    w1: int | None = None,
    w2: int | None = None,
) -> jax.Array:
    """The n × n² tensor-attention weights: ``(B, n, d) ×3 -> W (B, n, n, n)``.

    ``W[b, l, i, j] = softmax_{(i, j)}(scale · Σ_k q_lk k1_ik k2_jk)`` over valid pairs: both
    keys valid under ``mask (B, n)``, with ``causal`` i, j ≤ l, and windows
    ``l − w1 < i``, ``l − w2 < j`` (windows need ``causal``). Rows without a valid pair are 0.
    ``scale`` defaults to 1/√d. Memory O(B·n³): small n only.
    """
    _validate_tensor(q, k1, k2, k1[..., :1], k1[..., :1], mask)
    _check_windows(causal, w1, w2)
    b, n, d = q.shape
    out_dtype = jnp.result_type(q, k1, k2)
    dtype = _compute_dtype(q, k1, k2)
    scale = _default_scale(scale, d)
    q, k1, k2 = q.astype(dtype) * scale, k1.astype(dtype), k2.astype(dtype)
    s = jnp.einsum("bld,bid,bjd->blij", q, k1, k2)
    m = jnp.ones((1, n), bool) if mask is None else mask
    idx = jnp.arange(n)
    valid = _pair_valid(n, causal, w1, w2, m, m, idx, idx)
    valid = jnp.broadcast_to(valid, (valid.shape[0], n, n, n)).reshape(-1, n, n * n)
    w = _masked_softmax(s.reshape(b, n, n * n), valid)
    return w.reshape(b, n, n, n).astype(out_dtype)


def tensor_attention(
    q: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    v1: jax.Array,
    v2: jax.Array,
    *,
    method: str = "blocked",
    scale: float | None = None,
    causal: bool = False,
    mask: jax.Array | None = None,
    w1: int | None = None,
    w2: int | None = None,
    degree: int = 4,
    block_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    """Tensor (triple-wise) attention, REFERENCE §8: one softmax over all n² key pairs.

    ``out_l = Σ_{i,j} softmax_{(i,j)}(scale · Σ_k q_lk k1_ik k2_jk) · (v1_i ∘ v2_j)``.
    Shapes: ``q, k1, k2 (B, n, d)``, ``v1, v2 (B, n, dv)`` -> ``(B, n, dv)``; fold heads into
    the leading batch axis. ``scale`` defaults to 1/√d. ``mask (B, n)`` bool: a pair is valid
    when both keys are valid. ``causal``: pairs with i, j ≤ l. ``w1, w2`` (with ``causal``):
    windows ``l − w1 < i ≤ l``, ``l − w2 < j ≤ l``; None means unbounded. Queries without a
    valid pair output 0.

    Methods:

    - ``"naive"``: ordinary attention over the n² pair keys ``k1_i ∘ k2_j`` with values
      ``v1_i ∘ v2_j``; O(n³·d) time, O(B·n³) memory. The reference.
    - ``"blocked"``: exact; online softmax over blocks of ``block_size = (bi, bj)`` pairs
      (default (8, 128)), never storing the pair matrix; forward and backward (hand-written,
      recomputing scores) use O(B·n·(d + dv + bi·bj)) memory beyond the inputs. O(n³·d) time.
    - ``"simplicial"``: 2-simplicial attention, always causal with windows ``w1``, ``w2``
      (default: unbounded); per-query windows of k1/v1 and k2/v2 are gathered, then an online
      softmax runs over blocks of ``block_size`` (int, default 64) offsets of the k2 window.
      O(n·w1·w2·d) time, O(B·n·(w1 + w2)·(d + dv) + B·n·w1·block) memory; the backward pass
      recomputes each block (rematerialisation).
    - ``"approx"``: replaces ``exp(x)`` by its Taylor polynomial ``T_p(x) = Σ_{m≤p} x^m/m!`` of
      even ``degree`` p. Because ``x`` is trilinear, ``x^m`` factorises into monomial features
      of q, k1 and k2 of degree m, so sums over i and j separate: O(n·D·dv) time with
      ``D = C(d + p, p)`` features (linear in n for fixed d and p). The sequence is scanned in
      chunks of ``block_size`` positions (int, default 256), so the forward pass needs
      O(B·D·(block_size + dv)) memory. ``causal`` is supported (prefix sums within a chunk on
      top of the running sums, O(B·D·dv·block_size)); windows are not.

    Error of ``"approx"`` (see :func:`tensor_attention_error_bound`): if every score satisfies
    ``|x| ≤ R`` (guaranteed by ``R = scale · Σ_k max_l|q_lk| · max_i|k1_ik| · max_j|k2_jk|``),
    Lagrange's remainder gives ``|T_p(x) − eˣ| ≤ ε·eˣ`` with ``ε = R^(p+1) e^R / (p+1)!``, hence
    every output entry is within ``2ε/(1 − ε) · max_{i,j}|v1_i ∘ v2_j|`` of the exact one
    (ε < 1). The normaliser stays positive because ``T_p(x) > 0`` for every real x when p is
    even, which is why odd degrees are rejected. For d = 8, entries in [−½, ½] and the default
    p = 4, ε ≤ 7e-5. Large entries (R ≳ 2) break the approximation: bound them first.
    """
    check_choice("method", method, TENSOR_METHODS)
    _validate_tensor(q, k1, k2, v1, v2, mask)
    _check_windows(causal, w1, w2)
    out_dtype = jnp.result_type(q, k1, k2, v1, v2)
    dtype = _compute_dtype(q, k1, k2, v1, v2)
    b, n, d = q.shape
    scale = _default_scale(scale, d)
    q, k1, k2, v1, v2 = (x.astype(dtype) for x in (q, k1, k2, v1, v2))
    kmask = jnp.ones((1, n), bool) if mask is None else mask

    if method == "naive":
        out = _tensor_naive(q * scale, k1, k2, v1, v2, kmask, causal, w1, w2)
    elif method == "blocked":
        bi, bj = _pair_block(block_size)
        out = _tensor_blocked(
            q * scale, k1, k2, v1, v2, kmask, causal, w1, w2, min(bi, n), min(bj, n)
        )
    elif method == "simplicial":
        if not causal:
            raise ValueError("method='simplicial' is causal by definition; pass causal=True")
        block = _DEFAULT_WINDOW_BLOCK if block_size is None else block_size
        check_positive_int("block_size", block)
        out = _tensor_simplicial(q * scale, k1, k2, v1, v2, kmask, w1 or n, w2 or n, block)
    else:
        _check_degree(degree)
        if w1 is not None or w2 is not None:
            raise ValueError("method='approx' does not support windows w1, w2")
        chunk = _DEFAULT_APPROX_CHUNK if block_size is None else block_size
        check_positive_int("block_size", chunk)
        out = _tensor_approx(q, k1, k2, v1, v2, kmask, scale, causal, degree, chunk)
    return out.astype(out_dtype)


def _pair_block(block_size) -> tuple[int, int]:
    if block_size is None:
        return _DEFAULT_PAIR_BLOCK
    if isinstance(block_size, int):
        check_positive_int("block_size", block_size)
        return block_size, block_size
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise ValueError(f"block_size must be an int or a pair (bi, bj); got {block_size!r}")
    return check_positive_int("block_size[0]", block_size[0]), check_positive_int(
        "block_size[1]", block_size[1]
    )


def _check_degree(degree) -> None:
    check_positive_int("degree", degree)
    if degree % 2:
        raise ValueError(
            f"degree must be even (an even Taylor polynomial of exp is positive everywhere, "
            f"which keeps the approximate softmax normaliser positive); got {degree}"
        )


def _tensor_naive(q, k1, k2, v1, v2, kmask, causal, w1, w2):
    """Attention over the n² pair keys; ``q`` is pre-scaled."""
    b, n, d = q.shape
    pair_k = (k1[:, :, None, :] * k2[:, None, :, :]).reshape(b, n * n, d)
    pair_v = (v1[:, :, None, :] * v2[:, None, :, :]).reshape(b, n * n, -1)
    s = jnp.einsum("bld,bpd->blp", q, pair_k)
    idx = jnp.arange(n)
    valid = _pair_valid(n, causal, w1, w2, kmask, kmask, idx, idx)
    valid = jnp.broadcast_to(valid, (valid.shape[0], n, n, n)).reshape(-1, n, n * n)
    e, z = _softmax_parts(s, valid)
    return _normalise(jnp.einsum("blp,bpc->blc", e, pair_v), z)


# -- blocked (exact, hand-written backward)


def _tensor_block_inputs(k1, k2, v1, v2, kmask, bi, bj):
    n = k1.shape[1]
    side1 = (
        _blocks(k1, 1, bi),
        _blocks(v1, 1, bi),
        _blocks(kmask, 1, bi),
        _blocks(jnp.arange(n), 0, bi),
    )
    side2 = (
        _blocks(k2, 1, bj),
        _blocks(v2, 1, bj),
        _blocks(kmask, 1, bj),
        _blocks(jnp.arange(n), 0, bj),
    )
    return side1, side2


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _tensor_blocked(q, k1, k2, v1, v2, kmask, causal, w1, w2, bi, bj):
    """Exact tensor attention by pair blocks with online softmax; ``q`` is pre-scaled."""
    return _tensor_blocked_fwd(q, k1, k2, v1, v2, kmask, causal, w1, w2, bi, bj)[0]


def _tensor_blocked_fwd(q, k1, k2, v1, v2, kmask, causal, w1, w2, bi, bj):
    b, n, _ = q.shape
    dv = v1.shape[-1]
    side1, side2 = _tensor_block_inputs(k1, k2, v1, v2, kmask, bi, bj)

    def outer(carry, xs1):
        k1b, v1b, m1, i_idx = xs1
        qk1 = q[:, :, None, :] * k1b[:, None, :, :]  # (B, n, bi, d)

        def inner(carry, xs2):
            k2b, v2b, m2, j_idx = xs2
            s = jnp.einsum("blid,bjd->blij", qk1, k2b)
            valid = _pair_valid(n, causal, w1, w2, m1, m2, i_idx, j_idx)

            def weighted_values(p):
                pv2 = jnp.einsum("blij,bjc->blic", p, v2b)
                return jnp.einsum("blic,bic->blc", pv2, v1b)

            return _online_update(carry, s, valid, (-2, -1), weighted_values), None

        return jax.lax.scan(inner, carry, side2)[0], None

    init = (
        jnp.full((b, n), -jnp.inf, q.dtype),
        jnp.zeros((b, n), q.dtype),
        jnp.zeros((b, n, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(outer, init, side1)
    o, lse = _finish(*carry)
    return o, (q, k1, k2, v1, v2, kmask, o, lse)


def _tensor_blocked_bwd(causal, w1, w2, bi, bj, res, do):
    q, k1, k2, v1, v2, kmask, o, lse = res
    n = q.shape[1]
    delta = jnp.sum(do * o, axis=-1)  # (B, n)
    side1, side2 = _tensor_block_inputs(k1, k2, v1, v2, kmask, bi, bj)
    lse_b = lse[:, :, None, None]

    def outer(carry, xs1):
        dq, dk2, dv2 = carry
        k1b, v1b, m1, i_idx = xs1
        qk1 = q[:, :, None, :] * k1b[:, None, :, :]  # (B, n, bi, d)
        dov1 = do[:, :, None, :] * v1b[:, None, :, :]  # (B, n, bi, dv)

        def inner(carry, xs2):
            dq, dk1b, dv1b = carry
            k2b, v2b, m2, j_idx = xs2
            s = jnp.einsum("blid,bjd->blij", qk1, k2b)
            valid = _pair_valid(n, causal, w1, w2, m1, m2, i_idx, j_idx)
            p = jnp.where(valid, jnp.exp(jnp.where(valid, s, lse_b) - lse_b), 0.0)
            ds = p * (jnp.einsum("blic,bjc->blij", dov1, v2b) - delta[:, :, None, None])
            t = jnp.einsum("blij,bjd->blid", ds, k2b)  # Σ_j dS k2_j
            dq = dq + jnp.einsum("blid,bid->bld", t, k1b)
            dk1b = dk1b + jnp.einsum("blid,bld->bid", t, q)
            dk2b = jnp.einsum("blij,blid->bjd", ds, qk1)
            pv2 = jnp.einsum("blij,bjc->blic", p, v2b)
            dv1b = dv1b + jnp.einsum("blic,blc->bic", pv2, do)
            dv2b = jnp.einsum("blij,blic->bjc", p, dov1)
            return (dq, dk1b, dv1b), (dk2b, dv2b)

        init = (dq, jnp.zeros_like(k1b), jnp.zeros_like(v1b))
        (dq, dk1b, dv1b), (dk2_blocks, dv2_blocks) = jax.lax.scan(inner, init, side2)
        dk2 = dk2 + _unblock(dk2_blocks, 1, n)
        dv2 = dv2 + _unblock(dv2_blocks, 1, n)
        return (dq, dk2, dv2), (dk1b, dv1b)

    init = (jnp.zeros_like(q), jnp.zeros_like(k2), jnp.zeros_like(v2))
    (dq, dk2, dv2), (dk1, dv1) = jax.lax.scan(outer, init, side1)
    return dq, _unblock(dk1, 1, n), dk2, _unblock(dv1, 1, n), dv2, None


_tensor_blocked.defvjp(_tensor_blocked_fwd, _tensor_blocked_bwd)


# -- 2-simplicial (causal windows)


def _windows(x: jax.Array, w: int, total: int) -> jax.Array:
    """Causal windows ``(B, n, ...) -> (B, n, total, ...)``; slot a holds index l − w + 1 + a.

    Slots before index 0 or at a ≥ w hold zeros (``total ≥ w`` pads the window to a multiple
    of the block size).
    """
    n = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (w - 1, total - w)
    xp = jnp.pad(x, pad)
    idx = jnp.arange(n)[:, None] + jnp.arange(total)[None, :]
    inside = (jnp.arange(total) < w).reshape((total,) + (1,) * (x.ndim - 2))
    return jnp.where(inside, xp[:, idx], jnp.zeros((), x.dtype))


def _tensor_simplicial(q, k1, k2, v1, v2, kmask, w1, w2, block):
    """Causal windowed tensor attention, online softmax over the k2 window; ``q`` pre-scaled."""
    b, n, _ = q.shape
    dv = v1.shape[-1]
    w1, w2 = min(w1, n), min(w2, n)
    block = min(block, w2)
    total2 = -(-w2 // block) * block
    kmask = jnp.broadcast_to(kmask, (b, n))
    k1w, v1w, m1w = (_windows(x, w1, w1) for x in (k1, v1, kmask))  # (B, n, w1, ·)
    qk1 = q[:, :, None, :] * k1w
    # The k2 side is cut into blocks of window offsets, scanned with an online softmax.
    k2w, v2w, m2w = (_blocks(_windows(x, w2, total2), 2, block) for x in (k2, v2, kmask))

    @partial(jax.checkpoint, prevent_cse=False)
    def body(carry, xs):
        k2b, v2b, m2b = xs  # (B, n, block, ·)
        s = jnp.einsum("blad,blcd->blac", qk1, k2b)
        valid = m1w[:, :, :, None] & m2b[:, :, None, :]

        def weighted_values(p):
            pv2 = jnp.einsum("blac,blcv->blav", p, v2b)
            return jnp.einsum("blav,blav->blv", pv2, v1w)

        return _online_update(carry, s, valid, (-2, -1), weighted_values), None

    init = (
        jnp.full((b, n), -jnp.inf, q.dtype),
        jnp.zeros((b, n), q.dtype),
        jnp.zeros((b, n, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(body, init, (k2w, v2w, m2w))
    return _finish(*carry)[0]


# -- Taylor-feature approximation


def _monomials(d: int, degree: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Layout of the monomial features of d variables up to ``degree``.

    Each degree-m monomial ``x_{k1} ⋯ x_{km}`` (k1 ≤ … ≤ km) is a degree-(m−1) monomial (its
    "parent") times ``x_{km}``. Returns, per degree m = 1..p, the parent positions among the
    degree-(m−1) monomials and the last factors, and a ``(2, D)`` array holding each
    feature's degree m and its weight ``1/α!`` (α the exponent counts; the constant first).
    """
    tables, degrees, inv_fact = [], [0], [1.0]
    prev = [()]
    for m in range(1, degree + 1):
        cur, parent, last = [], [], []
        for i, t in enumerate(prev):
            for k in range(t[-1] if t else 0, d):
                cur.append(t + (k,))
                parent.append(i)
                last.append(k)
        tables.append((np.array(parent, np.int32), np.array(last, np.int32)))
        degrees += [m] * len(cur)
        inv_fact += [1.0 / math.prod(math.factorial(c) for c in np.bincount(t)) for t in cur]
        prev = cur
    return tables, np.array([degrees, inv_fact], np.float64)


def _features(x: jax.Array, tables: list[tuple[np.ndarray, np.ndarray]]) -> jax.Array:
    """Monomial features ``(B, n, d) -> (B, D, n)``: 1, then every x^α with |α| = 1..p.

    Features go before positions, so each degree is one row gather and product over
    contiguous length-n rows (measured several times faster on CPU than a trailing feature
    axis). The result is materialized (optimization barrier): fused into its consumers, XLA
    evaluated the concatenation element by element, which measured far slower.
    """
    xt = jnp.swapaxes(x, 1, 2)  # (B, d, n)
    feats = [jnp.ones((x.shape[0], 1, x.shape[1]), x.dtype)]
    for parent, last in tables:
        feats.append(feats[-1][:, parent] * xt[:, last])
    return jax.lax.optimization_barrier(jnp.concatenate(feats, axis=1))


def _tensor_approx(q, k1, k2, v1, v2, kmask, scale, causal, degree, chunk):
    """Taylor-feature tensor attention, scanning the sequence in chunks of ``chunk`` positions.

    Chunking keeps the (D, chunk) feature blocks in cache, so the time per position does not
    grow with n (unchunked, the features of long sequences spill to memory and the measured
    time grew faster than n), and the memory is O(B·D·(chunk + dv)) (causal: ×dv per chunk).
    """
    b, n, d = q.shape
    dv = v1.shape[-1]
    tables, (deg, inv_fact) = _monomials(d, degree)
    # x^m / m! = scale^m Σ_{|α|=m} (q∘k1∘k2)^α / α!. The weights and the key mask are applied
    # to the small summed factors, not to the (D, chunk) features: an elementwise op fused into
    # a dot operand measured 10× slower.
    coefs = jnp.asarray((scale**deg * inv_fact).astype(np.dtype(q.dtype)))
    dim = coefs.shape[0]
    chunk = min(chunk, n)
    maskf = jnp.broadcast_to(kmask, (b, n)).astype(q.dtype)
    v1m, v2m = v1 * maskf[..., None], v2 * maskf[..., None]
    # Padding at the end is masked out as keys; its query outputs are cut off below.
    xs = tuple(_blocks(x, 1, chunk) for x in (q, k1, k2, v1m, v2m, maskf))
    zeros = (
        jnp.zeros((b, dv, dim), q.dtype),
        jnp.zeros((b, dv, dim), q.dtype),
        jnp.zeros((b, dim), q.dtype),
        jnp.zeros((b, dim), q.dtype),
    )

    if causal:

        def step(carry, x):
            qc, k1c, k2c, v1c, v2c, mc = x
            a, c, s1, s2 = carry
            fq, f1, f2 = (_features(y, tables) for y in (qc, k1c, k2c))  # (B, D, chunk)
            # Prefix sums inside the chunk on top of the sums over earlier chunks.
            pa = a[..., None] + jnp.cumsum(f1[:, None] * jnp.swapaxes(v1c, 1, 2)[:, :, None], -1)
            pc = c[..., None] + jnp.cumsum(f2[:, None] * jnp.swapaxes(v2c, 1, 2)[:, :, None], -1)
            p1 = s1[..., None] + jnp.cumsum(f1 * mc[:, None], axis=-1)  # (B, D, chunk)
            p2 = s2[..., None] + jnp.cumsum(f2 * mc[:, None], axis=-1)
            num = jnp.einsum("bfl,bcfl->bcl", fq, coefs[:, None] * pa * pc)  # (B, dv, chunk)
            den = jnp.einsum("bfl,bfl->bl", fq, coefs[:, None] * p1 * p2)
            return (pa[..., -1], pc[..., -1], p1[..., -1], p2[..., -1]), (num, den)

        _, (num, den) = jax.lax.scan(step, zeros, xs)
    else:

        def key_step(carry, x):
            _, k1c, k2c, v1c, v2c, mc = x
            a, c, s1, s2 = carry
            f1, f2 = _features(k1c, tables), _features(k2c, tables)  # (B, D, chunk)
            a = a + jnp.einsum("bic,bfi->bcf", v1c, f1)
            c = c + jnp.einsum("bjc,bfj->bcf", v2c, f2)
            s1 = s1 + jnp.einsum("bfi,bi->bf", f1, mc)
            s2 = s2 + jnp.einsum("bfj,bj->bf", f2, mc)
            return (a, c, s1, s2), None

        (a, c, s1, s2), _ = jax.lax.scan(key_step, zeros, xs)
        w_num, w_den = coefs * a * c, coefs * s1 * s2

        def query_step(_, qc):
            fq = _features(qc, tables)
            return None, (
                jnp.einsum("bcf,bfl->bcl", w_num, fq),
                jnp.einsum("bf,bfl->bl", w_den, fq),
            )

        _, (num, den) = jax.lax.scan(query_step, None, xs[0])
    num = jnp.moveaxis(num, 0, 2).reshape(b, dv, -1)[:, :, :n]  # (B, dv, n)
    den = jnp.moveaxis(den, 0, 1).reshape(b, -1)[:, :n]
    # den is a sum of T_p(x) > 0 over valid pairs (even p); it is 0 only without valid pairs.
    has = den > 0
    out = jnp.where(has[:, None], num / jnp.where(has, den, 1.0)[:, None], 0.0)
    return jnp.swapaxes(out, 1, 2)


def tensor_attention_error_bound(
    q: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    v1: jax.Array,
    v2: jax.Array,
    *,
    degree: int = 4,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The documented error bound of ``tensor_attention(..., method="approx")``.

    Shapes: ``q, k1, k2 (B, n, d)``, ``v1, v2 (B, n, dv)``. Returns ``(eps (B,), bound (B, dv))``:
    ``R = scale · Σ_k max_l|q_lk| · max_i|k1_ik| · max_j|k2_jk|`` bounds every score, each
    approximate weight is within a relative ``eps = R^(p+1) e^R / (p+1)!`` of the exact one,
    and every output entry of channel c is within
    ``bound[c] = 2·eps/(1 − eps) · max_i|v1_ic| · max_j|v2_jc|`` of the exact output
    (``inf`` where eps ≥ 1, where the bound says nothing). Masks and causality only remove
    pairs, so the bound holds for them too.
    """
    _validate_tensor(q, k1, k2, v1, v2, None)
    _check_degree(degree)
    dtype = _compute_dtype(q, k1, k2, v1, v2)
    scale = _default_scale(scale, q.shape[-1])
    amax = lambda x: jnp.max(jnp.abs(x.astype(dtype)), axis=1)  # (B, ·)
    r = abs(scale) * jnp.sum(amax(q) * amax(k1) * amax(k2), axis=-1)
    eps = r ** (degree + 1) * jnp.exp(r) / math.factorial(degree + 1)
    factor = jnp.where(eps < 1, 2 * eps / jnp.where(eps < 1, 1 - eps, 1.0), jnp.inf)
    return eps, factor[:, None] * amax(v1) * amax(v2)
