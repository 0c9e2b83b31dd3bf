"""Kronecker attention (KAO) on 2-D ``(B, h, w, c)`` and 3-D ``(B, t, h, w, c)`` grids.

:func:`kao` attends to per-mode means (h + w, or t + h + w summary vectors) instead of all N
grid positions; :func:`kao_mixing_matrix` builds the same operator as an explicit ``N × N``
matrix (the reference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.attention._common import (
    check_float,
    check_mask,
    compute_dtype,
    default_scale,
    isolate,
    masked_softmax,
    normalise,
    softmax_parts,
)

__all__ = ["kao", "kao_mixing_matrix", "KAO_VARIANTS"]

KAO_VARIANTS = ("kv", "qkv")


def _kao_grid(name: str, x: jax.Array) -> tuple[int, ...]:
    check_ndim(name, x, (4, 5), "(B, h, w, c) or (B, t, h, w, c)")
    check_float(name, x)
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
    check_mask(mask, x.shape[:-1], "(B, *grid)")
    dtype = compute_dtype(x, keys, values)
    x, keys, values = isolate(mask, x.astype(dtype), keys.astype(dtype), values.astype(dtype))
    for name, y in (("x", x), ("values", values)):
        if y.shape[-1] % num_heads:
            raise ValueError(
                f"{name} channels ({y.shape[-1]}) must be divisible by num_heads ({num_heads})"
            )
    weights = None if mask is None else mask.astype(dtype)
    ck, valid = _modal_means(keys, weights)
    x = x * default_scale(scale, x.shape[-1] // num_heads)
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
    """Kronecker attention operator (KAO; Gao & Ji 2020) on an image or
    video grid.

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
    without a valid position are dropped as keys, and masked positions output 0. Masked
    queries, keys and values are replaced by zeros (``jnp.where``) before use, so no value
    stored there, NaN or inf included, reaches a valid output or a gradient.
    """
    out_dtype = jnp.result_type(x, x if keys is None else keys, x if values is None else values)
    grid, _, weights, values, s, valid = _kao_prepare(
        x, variant, num_heads, scale, keys, values, mask
    )
    cv, _ = _modal_means(values, weights)
    vh = _split_heads(cv, num_heads)  # (B, H, S, dvh)
    e, z = softmax_parts(s, valid)
    o = normalise(jnp.einsum("bhqk,bhkc->bhqc", e, vh), z)
    if variant == "kv":
        o = o.reshape(o.shape[:2] + grid + o.shape[-1:])
    else:
        o = _kao_spread(o, grid)
    o = jnp.moveaxis(o, 1, -2).reshape(x.shape[:-1] + (values.shape[-1],))
    (o,) = isolate(mask, o)
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
    w = masked_softmax(s, valid)
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
    if mask is not None:
        m = jnp.where(mask.reshape(b, 1, n, 1), m, jnp.zeros((), m.dtype))
    return m.astype(out_dtype)
