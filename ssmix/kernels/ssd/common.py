"""Validation and small helpers shared by the SSD forms.

Shapes as in :func:`ssmix.kernels.ssd.ssd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssmix._checks import check_ndim
from ssmix.kernels.scan._common import segment_starts


def check_ssd_args(x, dt, A, B, C, initial_state=None, *, names=("x", "dt", "B", "C")):
    """Validate shapes; return ``(batch, L, Hh, P, G, N)``. ``names`` label x, dt, B, C."""
    xn, dtn, bn, cn = names
    check_ndim(xn, x, 4, "(B, L, Hh, P)")
    b, L, H, P = x.shape
    if L < 1:
        raise ValueError(f"{xn} must have a positive length (axis 1); got shape {x.shape}")
    check_ndim(dtn, dt, 3, "(B, L, Hh)")
    if dt.shape != (b, L, H):
        raise ValueError(f"{dtn} must have shape (B, L, Hh) = {(b, L, H)}; got {dt.shape}")
    check_ndim("A", A, 1, "(Hh,)")
    if A.shape != (H,):
        raise ValueError(f"A must have shape (Hh,) = ({H},); got {A.shape}")
    check_ndim(bn, B, 4, "(B, L, G, N)")
    check_ndim(cn, C, 4, "(B, L, G, N)")
    if B.shape[:2] != (b, L) or B.shape != C.shape:
        raise ValueError(
            f"{bn} and {cn} must both have shape (B, L, G, N) with (B, L) = {(b, L)}; "
            f"got {bn} {B.shape} and {cn} {C.shape}"
        )
    G, N = B.shape[2], B.shape[3]
    if G < 1 or H % G:
        raise ValueError(
            f"the number of groups G = {G} (axis 2 of {bn}, {cn}) must divide Hh = {H}"
        )
    if initial_state is not None and initial_state.shape != (b, H, P, N):
        raise ValueError(
            f"initial_state must have shape (B, Hh, P, N) = {(b, H, P, N)}; "
            f"got {initial_state.shape}"
        )
    return b, L, H, P, G, N


def check_qs_args(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, initial_states):
    """Validate the quasiseparable arguments; return the initial states ``(h_fw, h_bw)`` or
    ``(None, None)``."""
    b, L, H, P, G, N = check_ssd_args(x, dt_fw, A, B_fw, C_fw, names=("x", "dt_fw", "B_fw", "C_fw"))
    if dt_bw.shape != dt_fw.shape:
        raise ValueError(f"dt_bw must have the shape of dt_fw {dt_fw.shape}; got {dt_bw.shape}")
    if B_bw.shape != B_fw.shape or C_bw.shape != B_fw.shape:
        raise ValueError(
            f"B_bw and C_bw must have the shape of B_fw {B_fw.shape}; "
            f"got {B_bw.shape} and {C_bw.shape}"
        )
    check_ndim("diag", diag, 3, "(B, L, Hh)")
    if diag.shape != (b, L, H):
        raise ValueError(f"diag must have shape (B, L, Hh) = {(b, L, H)}; got {diag.shape}")
    if initial_states is None:
        return None, None
    if not isinstance(initial_states, (tuple, list)) or len(initial_states) != 2:
        raise ValueError("initial_states must be a pair (h_fw, h_bw) of (B, Hh, P, N) arrays")
    h_fw, h_bw = initial_states
    for name, h in (("h_fw", h_fw), ("h_bw", h_bw)):
        if h.shape != (b, H, P, N):
            raise ValueError(
                f"initial_states {name} must have shape (B, Hh, P, N) = {(b, H, P, N)}; "
                f"got {h.shape}"
            )
    return h_fw, h_bw


def compute_dtype(*arrays):
    """``(dtype of the inputs, compute dtype)``: the promoted floating dtype and that dtype
    raised to at least float32 (half precision accumulates in float32)."""
    dtype = jnp.result_type(*[a for a in arrays if a is not None])
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ssd expects real floating-point inputs; got dtype {dtype}")
    return dtype, jnp.promote_types(dtype, jnp.float32)


def pad_to_chunks(x, dt, B, C, chunk_size: int):
    """``(Q, nc, (x, dt, B, C))``: the chunk length ``Q = min(chunk_size, L)``, the chunk count
    and the inputs zero-padded at the end to ``nc·Q`` steps. Zero steps (``dt = 0``) are
    identity steps, so the final state passes through them unchanged."""
    L = x.shape[1]
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    if pad:
        x, dt, B, C = (
            jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2)) for v in (x, dt, B, C)
        )
    return Q, nc, (x, dt, B, C)


def group_heads(v: jax.Array, G: int) -> jax.Array:
    """``(..., Hh)`` -> ``(..., G, Hh // G)``."""
    return v.reshape(*v.shape[:-1], G, v.shape[-1] // G)


def expand_groups(v: jax.Array, H: int) -> jax.Array:
    """``(B, L, G, N)`` -> ``(B, L, Hh, N)``: each head reads its group's vector."""
    return jnp.repeat(v, H // v.shape[2], axis=2)


def segment_sums(a: jax.Array) -> jax.Array:
    """``S[..., i, j] = Σ_{k=j+1}^{i} a[..., k]`` for ``j ≤ i`` (0 elsewhere), exactly.

    Each entry is summed from its own terms (a cumulative sum down a masked copy) instead of
    as a difference of two long cumulative sums, which would cancel catastrophically.
    """
    L = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], (*a.shape, L))  # [i, j] = a_i
    strict = jnp.tril(jnp.ones((L, L), bool), -1)
    return jnp.cumsum(jnp.where(strict, rep, 0), axis=-2)


def shift_later(y: jax.Array) -> jax.Array:
    """Row t takes row t − 1 along axis 1; row 0 becomes zero (Hydra's ``shift``,
    Hwang et al. 2024)."""
    return jnp.pad(y[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (y.ndim - 2))


def shift_earlier(y: jax.Array) -> jax.Array:
    """Row t takes row t + 1 along axis 1; the last row becomes zero (the flipped ``shift``)."""
    return jnp.pad(y[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (y.ndim - 2))


def segment_labels(segment_ids: jax.Array) -> jax.Array:
    """``(B, L)`` int32 labels with ``z_s = z_t`` exactly when no segment boundary lies between
    ``s`` and ``t``: the number of boundaries (id changes between neighbours) up to ``t``.
    Boundaries do not depend on the direction, so one labelling serves both."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1, dtype=jnp.int32)


def chunk_resets(labels: jax.Array, nc: int, Q: int) -> jax.Array:
    """``(B, nc, Q)`` int32: per chunk, the number of segment starts at or before each
    position inside the chunk, for ``labels (B, L)`` (:func:`segment_labels`, or their flip
    for a reversed direction) padded at the end, with the last label, to ``nc·Q`` steps
    (padding starts nothing). Inside a chunk, positions ``i ≥ j`` are connected when their
    counts are equal, a position is reached by the state entering the chunk when its count is
    0, and the state leaves the chunk intact when the last count is 0."""
    pad = nc * Q - labels.shape[1]
    if pad:
        labels = jnp.pad(labels, ((0, 0), (0, pad)), mode="edge")
    starts = segment_starts(labels).astype(jnp.int32)
    return jnp.cumsum(starts.reshape(-1, nc, Q), axis=2, dtype=jnp.int32)


def shift_keeps(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(keep_fw, keep_bw)``, each ``(B, L, 1, 1)`` bool, for segment ``labels (B, L)``
    (:func:`segment_labels`): whether row ``t`` of the quasiseparable mixer may take the
    forward output of ``t − 1`` (same segment as ``t``) and the backward output of ``t + 1``.
    Row 0's forward and row ``L − 1``'s backward term are zero anyway (the shift)."""
    keep_fw = ~segment_starts(labels)
    keep_bw = ~segment_starts(labels, reverse=True)
    return keep_fw[..., None, None], keep_bw[..., None, None]
