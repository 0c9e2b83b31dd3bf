"""Tensor (triple-wise) and 2-simplicial attention: one softmax over all n² key pairs.

:func:`tensor_attention` has four methods: ``"naive"`` (ordinary attention over the n² pair
keys, the reference), ``"blocked"`` (exact, online softmax over pair blocks, hand-written
backward), ``"simplicial"`` (causal windows, online softmax over the k2 window) and
``"approx"`` (truncated Taylor features, near-linear in n). :func:`tensor_attention_weights`
materializes the ``n × n²`` weight tensor and :func:`tensor_attention_error_bound` evaluates
the approximation's documented error bound.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_ndim, check_positive_int
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
    unblock,
)

__all__ = [
    "tensor_attention",
    "tensor_attention_weights",
    "tensor_attention_error_bound",
    "TENSOR_METHODS",
]

TENSOR_METHODS = ("naive", "blocked", "simplicial", "approx")

# Default blocks of the tensor-attention kernels under the CPU rules: 8 × 128 key pairs per
# online-softmax step of "blocked", 64 offsets of the k2 window per step of "simplicial", 256
# positions per chunk of "approx" (benchmarks/attention.py). The accelerator rules size them
# from the tile budget instead (see tensor_attention).
_DEFAULT_PAIR_BLOCK = (8, 128)
_DEFAULT_WINDOW_BLOCK = 64
_DEFAULT_APPROX_CHUNK = 256


def _validate_tensor(q, k1, k2, v1, v2, mask):
    for name, x in (("q", q), ("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2)):
        check_ndim(name, x, 3, "(B, n, d)")
        check_float(name, x)
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
    check_mask(mask, q.shape[:2], "(B, n)")


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
    dtype = compute_dtype(q, k1, k2)
    scale = default_scale(scale, d)
    q = q.astype(dtype) * scale
    k1, k2 = isolate(mask, k1.astype(dtype), k2.astype(dtype))
    s = jnp.einsum("bld,bid,bjd->blij", q, k1, k2)
    m = jnp.ones((1, n), bool) if mask is None else mask
    idx = jnp.arange(n)
    valid = _pair_valid(n, causal, w1, w2, m, m, idx, idx)
    valid = jnp.broadcast_to(valid, (valid.shape[0], n, n, n)).reshape(-1, n, n * n)
    w = masked_softmax(s.reshape(b, n, n * n), valid)
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
    """Tensor (triple-wise) attention (Alman & Song 2023): one softmax over all n² key
    pairs.

    ``out_l = Σ_{i,j} softmax_{(i,j)}(scale · Σ_k q_lk k1_ik k2_jk) · (v1_i ∘ v2_j)``.
    Shapes: ``q, k1, k2 (B, n, d)``, ``v1, v2 (B, n, dv)`` -> ``(B, n, dv)``; fold heads into
    the leading batch axis. ``scale`` defaults to 1/√d. ``mask (B, n)`` bool: a pair is valid
    when both keys are valid. ``causal``: pairs with i, j ≤ l. ``w1, w2`` (with ``causal``):
    windows ``l − w1 < i ≤ l``, ``l − w2 < j ≤ l``; None means unbounded. Queries without a
    valid pair output 0. Masked keys and values are replaced by zeros (``jnp.where``) before
    any method runs, so a NaN or inf stored there reaches no output or gradient; the mask
    applies to keys only, and a non-finite valid input gives non-finite outputs (never a
    silent 0).

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

    Defaults per backend (:func:`ssmix.auto_backend`, decided when the call is traced). CPU:
    the measured blocks above, unchanged. GPU/TPU: no per-step array over 256 MiB, with as
    few loop steps as that allows. ``"blocked"`` with ``block_size=None`` takes bj = 128 and
    the bi that fills a ``(B, n, bi, bj)`` score tile of 256 MiB: the B·n³ scores then take
    about n²/(bi·bj) steps per pass, the fewest that budget allows (B = 16, n = 16384 in
    float32: (2, 128), 4× the steps of the CPU blocks, ¼ of their memory). ``"simplicial"`` also
    walks the queries in blocks whose gathered windows and ``(B, ·, w1, block)`` scores fit,
    recomputing each block's windows in the backward pass. ``"approx"`` takes the longest
    chunk whose ``(B, D, chunk)`` features (causal: ``(B, dv, D, chunk)`` prefix sums) fit,
    and recomputes each chunk's features in the backward pass (``jax.checkpoint``) instead
    of keeping them for every chunk.
    """
    check_choice("method", method, TENSOR_METHODS)
    _validate_tensor(q, k1, k2, v1, v2, mask)
    _check_windows(causal, w1, w2)
    out_dtype = jnp.result_type(q, k1, k2, v1, v2)
    dtype = compute_dtype(q, k1, k2, v1, v2)
    b, n, d = q.shape
    scale = default_scale(scale, d)
    q, k1, k2, v1, v2 = (x.astype(dtype) for x in (q, k1, k2, v1, v2))
    k1, k2, v1, v2 = isolate(mask, k1, k2, v1, v2)
    kmask = jnp.ones((1, n), bool) if mask is None else mask
    # Accelerator rules (see the docstring); the CPU rules keep the measured defaults.
    accel = resolve_backend(None) != "cpu"
    itemsize = jnp.dtype(dtype).itemsize

    if method == "naive":
        out = _tensor_naive(q * scale, k1, k2, v1, v2, kmask, causal, w1, w2)
    elif method == "blocked":
        bi, bj = _pair_block(block_size, b * n * itemsize if accel else None)
        out = _tensor_blocked(
            q * scale, k1, k2, v1, v2, kmask, causal, w1, w2, min(bi, n), min(bj, n)
        )
    elif method == "simplicial":
        if not causal:
            raise ValueError("method='simplicial' is causal by definition; pass causal=True")
        block = _DEFAULT_WINDOW_BLOCK if block_size is None else block_size
        check_positive_int("block_size", block)
        out = _tensor_simplicial(
            q * scale, k1, k2, v1, v2, kmask, w1 or n, w2 or n, block, itemsize if accel else None
        )
    else:
        _check_degree(degree)
        if w1 is not None or w2 is not None:
            raise ValueError("method='approx' does not support windows w1, w2")
        if block_size is not None:
            chunk = check_positive_int("block_size", block_size)
        elif accel:
            # Per position: D features (causal: D × dv prefix sums) for each of the B rows.
            features = math.comb(d + degree, degree) * (v1.shape[-1] if causal else 1)
            chunk = tile_fit(b * features * itemsize)
        else:
            chunk = _DEFAULT_APPROX_CHUNK
        out = _tensor_approx(q, k1, k2, v1, v2, kmask, scale, causal, degree, chunk, remat=accel)
    return out.astype(out_dtype)


def _pair_block(block_size, pair_bytes: int | None) -> tuple[int, int]:
    """``(bi, bj)`` from ``block_size``; None: the CPU default, or with ``pair_bytes`` (bytes of
    one key pair's scores for all B·n queries) the accelerator rule: bj = 128 and bi filling
    the tile budget (bi·bj pairs).
    """
    if block_size is None:
        if pair_bytes is None:
            return _DEFAULT_PAIR_BLOCK
        pairs = tile_fit(pair_bytes)
        bj = min(_DEFAULT_PAIR_BLOCK[1], pairs)
        return pairs // bj, bj
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
    e, z = softmax_parts(s, valid)
    return normalise(jnp.einsum("blp,bpc->blc", e, pair_v), z)


# -- blocked (exact, hand-written backward)


def _tensor_block_inputs(k1, k2, v1, v2, kmask, bi, bj):
    n = k1.shape[1]
    side1 = (
        blocks(k1, 1, bi),
        blocks(v1, 1, bi),
        blocks(kmask, 1, bi),
        blocks(jnp.arange(n), 0, bi),
    )
    side2 = (
        blocks(k2, 1, bj),
        blocks(v2, 1, bj),
        blocks(kmask, 1, bj),
        blocks(jnp.arange(n), 0, bj),
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

            return online_update(carry, s, valid, (-2, -1), weighted_values), None

        return jax.lax.scan(inner, carry, side2)[0], None

    init = (
        jnp.full((b, n), -jnp.inf, q.dtype),
        jnp.zeros((b, n), q.dtype),
        jnp.zeros((b, n, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(outer, init, side1)
    o, lse = finish(*carry)
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
        dk2 = dk2 + unblock(dk2_blocks, 1, n)
        dv2 = dv2 + unblock(dv2_blocks, 1, n)
        return (dq, dk2, dv2), (dk1b, dv1b)

    init = (jnp.zeros_like(q), jnp.zeros_like(k2), jnp.zeros_like(v2))
    (dq, dk2, dv2), (dk1, dv1) = jax.lax.scan(outer, init, side1)
    return dq, unblock(dk1, 1, n), dk2, unblock(dv1, 1, n), dv2, None


_tensor_blocked.defvjp(_tensor_blocked_fwd, _tensor_blocked_bwd)


# -- 2-simplicial (causal windows)


def _pad_for_windows(x: jax.Array, w: int, total: int, count: int) -> jax.Array:
    """Pad ``(B, n, ...)`` on the position axis for the windows of ``count ≥ n`` queries.

    Index p of the result is position p − w + 1 (zeros outside 0..n−1), its length
    ``count + total − 1``, so the windows of queries l..l+c−1 lie in ``[l, l + c + total − 1)``.
    """
    pad = [(0, 0)] * x.ndim
    pad[1] = (w - 1, count + total - w - x.shape[1])
    return jnp.pad(x, pad)


def _windows(xp: jax.Array, w: int, total: int, count: int) -> jax.Array:
    """Causal windows of ``count`` queries from their padded segment (:func:`_pad_for_windows`).

    ``xp (B, count + total − 1, ...) -> (B, count, total, ...)``; slot a of query l holds
    position l − w + 1 + a. Slots before position 0 or at a ≥ w hold zeros (``total ≥ w`` pads
    the window to a multiple of the block size).
    """
    idx = jnp.arange(count)[:, None] + jnp.arange(total)[None, :]
    inside = (jnp.arange(total) < w).reshape((total,) + (1,) * (xp.ndim - 2))
    return jnp.where(inside, xp[:, idx], jnp.zeros((), xp.dtype))


def _simplicial_queries(q, side1, side2, w1, w2, total2, block):
    """Outputs ``(B, c, dv)`` of the pre-scaled queries ``q (B, c, d)``.

    ``side1 = (k1, v1, mask)`` and ``side2 = (k2, v2, mask)`` are the segments of these
    queries' windows padded by :func:`_pad_for_windows` (window sizes w1 and w2, the k2 side
    to ``total2``, a multiple of ``block``).
    """
    b, c, _ = q.shape
    dv = side1[1].shape[-1]
    k1w, v1w, m1w = (_windows(x, w1, w1, c) for x in side1)  # (B, c, w1, ·)
    qk1 = q[:, :, None, :] * k1w
    # The k2 side is cut into blocks of window offsets, scanned with an online softmax.
    k2w, v2w, m2w = (blocks(_windows(x, w2, total2, c), 2, block) for x in side2)

    @partial(jax.checkpoint, prevent_cse=False)
    def body(carry, xs):
        k2b, v2b, m2b = xs  # (B, c, block, ·)
        s = jnp.einsum("blad,blcd->blac", qk1, k2b)
        valid = m1w[:, :, :, None] & m2b[:, :, None, :]

        def weighted_values(p):
            pv2 = jnp.einsum("blac,blcv->blav", p, v2b)
            return jnp.einsum("blav,blav->blv", pv2, v1w)

        return online_update(carry, s, valid, (-2, -1), weighted_values), None

    init = (
        jnp.full((b, c), -jnp.inf, q.dtype),
        jnp.zeros((b, c), q.dtype),
        jnp.zeros((b, c, dv), q.dtype),
    )
    carry, _ = jax.lax.scan(body, init, (k2w, v2w, m2w))
    return finish(*carry)[0]


def _tensor_simplicial(q, k1, k2, v1, v2, kmask, w1, w2, block, itemsize):
    """Causal windowed tensor attention, online softmax over the k2 window; ``q`` pre-scaled.

    ``itemsize`` None (CPU rule): all queries at once. An int (accelerator rule): queries in
    blocks of c, the most whose gathered windows ``(B, c, w, max(d, dv))`` and per-step scores
    ``(B, c, w1, block)`` fit in the tile budget (one block when all n fit).
    """
    b, n, d = q.shape
    w1, w2 = min(w1, n), min(w2, n)
    block = min(block, w2)
    total2 = -(-w2 // block) * block
    kmask = jnp.broadcast_to(kmask, (b, n))
    c = n
    if itemsize is not None:
        width = max(d, v1.shape[-1])
        c = min(tile_fit(b * itemsize * max(w1 * max(block, width), total2 * width)), n)
    nq = -(-n // c)
    side1 = tuple(_pad_for_windows(x, w1, w1, nq * c) for x in (k1, v1, kmask))
    side2 = tuple(_pad_for_windows(x, w2, total2, nq * c) for x in (k2, v2, kmask))
    if nq == 1:
        return _simplicial_queries(q, side1, side2, w1, w2, total2, block)

    # Each step gathers only its block's windows; checkpointed, so the backward pass gathers
    # them again instead of keeping (nq, B, c, w, ·) windows for every block. Padded queries
    # (zeros, past n) are cut off below.
    @partial(jax.checkpoint, prevent_cse=False)
    def step(_, xs):
        qb, start = xs
        seg = lambda x, total: jax.lax.dynamic_slice_in_dim(x, start, c + total - 1, axis=1)
        s1 = tuple(seg(x, w1) for x in side1)
        s2 = tuple(seg(x, total2) for x in side2)
        return None, _simplicial_queries(qb, s1, s2, w1, w2, total2, block)

    _, out = jax.lax.scan(step, None, (blocks(q, 1, c), jnp.arange(nq) * c))
    return unblock(out, 1, n)


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


def _tensor_approx(q, k1, k2, v1, v2, kmask, scale, causal, degree, chunk, remat):
    """Taylor-feature tensor attention, scanning the sequence in chunks of ``chunk`` positions.

    Chunking keeps the (D, chunk) feature blocks in cache, so the time per position does not
    grow with n (unchunked, the features of long sequences spill to memory and the measured
    time grew faster than n), and the memory is O(B·D·(chunk + dv)) (causal: ×dv per chunk).
    With ``remat`` each chunk's step is checkpointed: the backward pass recomputes its
    features instead of keeping ``(n / chunk, B, D, chunk)`` stacked features (O(B·D·n)).
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
    xs = tuple(blocks(x, 1, chunk) for x in (q, k1, k2, v1m, v2m, maskf))
    zeros = (
        jnp.zeros((b, dv, dim), q.dtype),
        jnp.zeros((b, dv, dim), q.dtype),
        jnp.zeros((b, dim), q.dtype),
        jnp.zeros((b, dim), q.dtype),
    )
    scan = jax.lax.scan
    if remat:
        scan = lambda f, *a: jax.lax.scan(jax.checkpoint(f, prevent_cse=False), *a)  # noqa: E731

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

        _, (num, den) = scan(step, zeros, xs)
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

        (a, c, s1, s2), _ = scan(key_step, zeros, xs)
        w_num, w_den = coefs * a * c, coefs * s1 * s2

        def query_step(_, qc):
            fq = _features(qc, tables)
            return None, (
                jnp.einsum("bcf,bfl->bcl", w_num, fq),
                jnp.einsum("bf,bfl->bl", w_den, fq),
            )

        _, (num, den) = scan(query_step, None, xs[0])
    num = jnp.moveaxis(num, 0, 2).reshape(b, dv, -1)[:, :, :n]  # (B, dv, n)
    den = jnp.moveaxis(den, 0, 1).reshape(b, -1)[:, :n]
    # den is a sum of T_p(x) > 0 over valid pairs (even p); it is 0 only without valid pairs.
    # A NaN den (a NaN valid input) must stay NaN, not count as "no valid pair".
    has = den != 0
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
    dtype = compute_dtype(q, k1, k2, v1, v2)
    scale = default_scale(scale, q.shape[-1])
    amax = lambda x: jnp.max(jnp.abs(x.astype(dtype)), axis=1)  # (B, ·)
    r = abs(scale) * jnp.sum(amax(q) * amax(k1) * amax(k2), axis=-1)
    eps = r ** (degree + 1) * jnp.exp(r) / math.factorial(degree + 1)
    factor = jnp.where(eps < 1, 2 * eps / jnp.where(eps < 1, 1 - eps, 1.0), jnp.inf)
    return eps, factor[:, None] * amax(v1) * amax(v2)
