"""Semiseparable (SSD, Mamba-2) sequence mixing and the quasiseparable (Hydra) mixer.

Shapes: ``x (B, L, Hh, P)`` (batch, length, heads, head dim), ``dt (B, L, Hh)`` positive steps,
``A (Hh,)`` negative decay rates, ``B, C (B, L, G, N)`` with ``G`` groups dividing ``Hh`` (head
``h`` reads group ``h // (Hh // G)``), states ``(B, Hh, P, N)``. Per head the recurrence is

    h_t = exp(dt_t·A)·h_{t−1} + dt_t·x_t B_tᵀ,      y_t = h_t C_t,

i.e. ``y = M x`` with the lower-triangular (semiseparable) matrix

    M[t, s] = C_t·B_s · exp(A·(cum_t − cum_s)) · dt_s   (s ≤ t),   cum_t = Σ_{r≤t} dt_r.

``reverse=True`` runs it from the end (``h_t = exp(dt_t·A)·h_{t+1} + dt_t·x_t B_tᵀ``), which is
the same as flipping every input along the length, running forward and flipping ``y`` back.

Three methods compute the same thing:

- ``"chunked"``: the length is cut into chunks of ``Q`` steps. Inside a chunk the output is
  the quadratic (attention-like) form ``(C Bᵀ ⊙ decay) · (dt·x)``; between chunks only the
  ``(P, N)`` states travel. One ``lax.fori_loop`` walks the chunks reading and writing them
  in place in the caller's ``(B, L, Hh, P)`` layout, so the activations are never transposed
  (a transpose of a large activation costs as much as the whole mixing on XLA:CPU) and each
  step works on a cache-sized slab. The gradient is a hand-written reverse loop over the
  chunks (``custom_vjp``) that recomputes the chunk-local terms from the inputs and the saved
  chunk-entry states. Segment sums of the decay are differences of chunk-local cumulative
  sums, masked before the exponential, so every exponent is ≤ 0 and nothing overflows.
  Cost O(L·Q·(N + P) + L·N·P) per head.
- ``"sequential"``: one step per position (``lax.scan``); from L = 256 on it is
  rematerialised in blocks of about √L steps under differentiation, so that memory stays
  O(√L) states.
- ``"materialized"``: build ``M`` explicitly (:func:`ssd_matrix`), O(L²); the oracle.

The quasiseparable mixer of Hydra (REFERENCE §7) adds a backward SSD and a diagonal:

    QS(x) = shift(SS_fw(x)) + flip(shift(SS_bw(flip(x)))) + diag·x,

where ``shift`` moves outputs one step later (row 0 becomes zero). Explicitly, with ``cf``
and ``cb`` the cumulative sums of ``dt_fw`` and ``dt_bw``,

    M[t, s] = C_fw[t−1]·B_fw[s]·exp(A·(cf[t−1] − cf[s]))·dt_fw[s]     (s < t)
    M[t, s] = C_bw[t+1]·B_bw[s]·exp(A·(cb[s−1] − cb[t]))·dt_bw[s]     (s > t)
    M[t, t] = diag[t].

Forward-mode differentiation (``jax.jvp``) of the chunked method is not supported (it has a
custom reverse-mode rule); the sequential and materialized methods support both.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ssmix._checks import check_choice, check_ndim, check_positive_int

__all__ = [
    "METHODS",
    "ssd",
    "ssd_matrix",
    "quasiseparable",
    "quasiseparable_matrix",
]

METHODS = ("chunked", "sequential", "materialized")


# --------------------------------------------------------------------------------------
# Validation


def _check_ssd_args(x, dt, A, B, C, initial_state=None, *, names=("x", "dt", "B", "C")):
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


def _compute_dtype(*arrays):
    """The promoted floating dtype of the inputs, at least float32 (half precision accumulates
    in float32)."""
    dtype = jnp.result_type(*[a for a in arrays if a is not None])
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ssd expects real floating-point inputs; got dtype {dtype}")
    return dtype, jnp.promote_types(dtype, jnp.float32)


def _group_heads(v, G):
    """``(..., Hh)`` -> ``(..., G, Hh // G)``."""
    return v.reshape(*v.shape[:-1], G, v.shape[-1] // G)


def _expand_groups(v, H):
    """``(B, L, G, N)`` -> ``(B, L, Hh, N)``: each head reads its group's vector."""
    return jnp.repeat(v, H // v.shape[2], axis=2)


# --------------------------------------------------------------------------------------
# Public API


@functools.partial(jax.jit, static_argnames=("chunk_size", "reverse", "method"))
def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    reverse: bool = False,
    method: str = "chunked",
) -> tuple[jax.Array, jax.Array]:
    """Run the SSD (Mamba-2 scalar-decay) recurrence over axis 1.

    Args:
      x: inputs ``(B, L, Hh, P)``.
      dt: positive steps ``(B, L, Hh)`` (a zero step is an identity step: no decay, no input).
      A: negative decay rates ``(Hh,)``.
      B, C: input and output projections ``(B, L, G, N)``, ``G`` dividing ``Hh``.
      chunk_size: chunk length ``Q`` of the chunked method; any positive integer (``L`` is
        padded internally to a multiple of ``min(Q, L)``).
      initial_state: ``(B, Hh, P, N)`` state before the first step (after the last one when
        ``reverse``); zeros when omitted.
      reverse: run from ``t = L − 1`` down to 0.
      method: ``"chunked"``, ``"sequential"`` or ``"materialized"`` (module docstring).

    Returns:
      ``(y (B, L, Hh, P), final_state (B, Hh, P, N))``: ``y`` in the dtype of ``x``, the
      state in the promoted compute dtype (at least float32). The final state is the one
      after the last step processed (``t = L − 1``, or ``t = 0`` when ``reverse``).

    Raises:
      ValueError: wrong ranks or shapes, ``G`` not dividing ``Hh``, a non-positive
        ``chunk_size``, an unknown ``method``.
      TypeError: non-floating inputs.
    """
    check_choice("method", method, METHODS)
    check_positive_int("chunk_size", chunk_size)
    _check_ssd_args(x, dt, A, B, C, initial_state)
    out_dtype, dtype = _compute_dtype(x, dt, A, B, C, initial_state)
    x, dt, A, B, C = (v.astype(dtype) for v in (x, dt, A, B, C))
    if initial_state is not None:
        initial_state = initial_state.astype(dtype)
    if method == "materialized":
        y, final = _ssd_materialized(x, dt, A, B, C, initial_state, reverse)
    elif method == "sequential":
        y, final = _ssd_sequential(x, dt, A, B, C, initial_state, reverse)
    else:
        if reverse:
            x, dt, B, C = (jnp.flip(v, axis=1) for v in (x, dt, B, C))
        y, final = _ssd_chunked(x, dt, A, B, C, initial_state, chunk_size)
        if reverse:
            y = jnp.flip(y, axis=1)
    return y.astype(out_dtype), final


@functools.partial(jax.jit, static_argnames=("reverse",))
def ssd_matrix(
    dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, reverse: bool = False
) -> jax.Array:
    """The SSD mixing matrix ``M (B, Hh, L, L)`` with ``y[:, t, h] = Σ_s M[:, h, t, s] x[:, s, h]``.

    Forward: ``M[t, s] = C_t·B_s·exp(A·Σ_{r=s+1}^{t} dt_r)·dt_s`` for ``s ≤ t``, else 0.
    Reverse: ``M[t, s] = C_t·B_s·exp(A·Σ_{r=t}^{s−1} dt_r)·dt_s`` for ``s ≥ t``, else 0.
    Shapes as in :func:`ssd` (``dt (B, L, Hh)``, ``A (Hh,)``, ``B, C (B, L, G, N)``). O(L²).
    """
    check_ndim("dt", dt, 3, "(B, L, Hh)")
    b, L, H = dt.shape
    x_like = jax.ShapeDtypeStruct((b, L, H, 1), dt.dtype)
    _check_ssd_args(x_like, dt, A, B, C)
    _, dtype = _compute_dtype(dt, A, B, C)
    dt, A, B, C = (v.astype(dtype) for v in (dt, A, B, C))
    return _ssd_matrix(dt, A, B, C, reverse)


@functools.partial(jax.jit, static_argnames=("chunk_size", "method"))
def quasiseparable(
    x: jax.Array,
    dt_fw: jax.Array,
    dt_bw: jax.Array,
    A: jax.Array,
    B_fw: jax.Array,
    C_fw: jax.Array,
    B_bw: jax.Array,
    C_bw: jax.Array,
    diag: jax.Array,
    *,
    chunk_size: int = 64,
    initial_states: tuple[jax.Array, jax.Array] | None = None,
    method: str = "chunked",
) -> jax.Array:
    """Hydra's quasiseparable mixer: ``shift(SS_fw(x)) + flip(shift(SS_bw(flip x))) + diag·x``.

    Both directions share ``A``. The chunked method runs them in one batched call of the
    chunked SSD (the backward inputs flipped and stacked behind the forward ones along the
    batch axis). Running the two directions instead as two lanes of one loop walking the
    chunks in opposite orders, without the flipped copy, measured 1.5× slower at L = 4k and
    2.4× at 16k on CPU and scaled super-linearly (``benchmarks/hydra.py``). The sequential
    method runs a forward and a reverse scan; the materialized method applies
    :func:`quasiseparable_matrix`.

    Args:
      x: inputs ``(B, L, Hh, P)``.
      dt_fw, dt_bw: positive steps ``(B, L, Hh)`` of the two directions, aligned with ``x``.
      A: negative decay rates ``(Hh,)``, shared by both directions.
      B_fw, C_fw, B_bw, C_bw: projections ``(B, L, G, N)``, aligned with ``x``.
      diag: the diagonal ``(B, L, Hh)`` (Hydra: ``D_h + (W_D x_t)_h``).
      chunk_size: chunk length of the chunked method.
      initial_states: optional ``(h_fw, h_bw)``, each ``(B, Hh, P, N)``: the forward state
        before position 0 and the backward state after position ``L − 1``. Because of the
        shift, ``h_fw`` reaches rows 1 … L−1 and ``h_bw`` rows 0 … L−2.
      method: ``"chunked"``, ``"sequential"`` or ``"materialized"``.

    Returns:
      ``y (B, L, Hh, P)`` in the dtype of ``x``.

    Raises:
      ValueError: inconsistent shapes, ``G`` not dividing ``Hh``, a non-positive
        ``chunk_size``, an unknown ``method``.
    """
    check_choice("method", method, METHODS)
    check_positive_int("chunk_size", chunk_size)
    h_fw, h_bw = _check_qs_args(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, initial_states)
    out_dtype, dtype = _compute_dtype(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, h_fw)
    x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag = (
        v.astype(dtype) for v in (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    )
    if h_fw is not None:
        h_fw, h_bw = h_fw.astype(dtype), h_bw.astype(dtype)
    skip = diag[..., None] * x
    if method == "materialized":
        M = _qs_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
        y = jnp.einsum("bhts,bshp->bthp", M, x)
        if h_fw is not None:
            y = y + _shift_later(_initial_state_output(h_fw, dt_fw, A, C_fw, reverse=False))
            y = y + _shift_earlier(_initial_state_output(h_bw, dt_bw, A, C_bw, reverse=True))
        return y.astype(out_dtype)
    if method == "sequential":
        y_fw, _ = _ssd_sequential(x, dt_fw, A, B_fw, C_fw, h_fw, False)
        y_bw, _ = _ssd_sequential(x, dt_bw, A, B_bw, C_bw, h_bw, True)
        return (_shift_later(y_fw) + _shift_earlier(y_bw) + skip).astype(out_dtype)
    b = x.shape[0]
    flip = functools.partial(jnp.flip, axis=1)
    stack = lambda fw, bw: jnp.concatenate([fw, flip(bw)], axis=0)  # noqa: E731
    h0 = None if h_fw is None else jnp.concatenate([h_fw, h_bw], axis=0)
    y2, _ = _ssd_chunked(
        stack(x, x), stack(dt_fw, dt_bw), A, stack(B_fw, B_bw), stack(C_fw, C_bw), h0, chunk_size
    )
    # Row t takes the forward output of t−1 and the backward output of t+1, which sits at
    # flipped index L−2−t: both are the first L−1 rows of their halves, one of them flipped.
    y_fw = _shift_later(y2[:b])
    y_bw = jnp.pad(flip(y2[b:, :-1]), ((0, 0), (0, 1), (0, 0), (0, 0)))
    return (y_fw + y_bw + skip).astype(out_dtype)


@jax.jit
def quasiseparable_matrix(
    dt_fw: jax.Array,
    dt_bw: jax.Array,
    A: jax.Array,
    B_fw: jax.Array,
    C_fw: jax.Array,
    B_bw: jax.Array,
    C_bw: jax.Array,
    diag: jax.Array,
) -> jax.Array:
    """The quasiseparable matrix ``M (B, Hh, L, L)`` of :func:`quasiseparable`, O(L²).

    Built entry by entry from the explicit formula in the module docstring (not from shifted
    and flipped SSD matrices), so comparing the two checks the shift / flip convention.
    Arguments as in :func:`quasiseparable` without ``x``.
    """
    check_ndim("dt_fw", dt_fw, 3, "(B, L, Hh)")
    x_like = jax.ShapeDtypeStruct((*dt_fw.shape, 1), dt_fw.dtype)
    _check_qs_args(x_like, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, None)
    _, dtype = _compute_dtype(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    args = (v.astype(dtype) for v in (dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag))
    return _qs_matrix(*args)


def _check_qs_args(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, initial_states):
    b, L, H, P, G, N = _check_ssd_args(
        x, dt_fw, A, B_fw, C_fw, names=("x", "dt_fw", "B_fw", "C_fw")
    )
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


# --------------------------------------------------------------------------------------
# Materialized forms


def _segment_sums(a):
    """``S[..., i, j] = Σ_{k=j+1}^{i} a[..., k]`` for ``j ≤ i`` (0 elsewhere), exactly.

    Each entry is summed from its own terms (a cumulative sum down a masked copy) instead of
    as a difference of two long cumulative sums, which would cancel catastrophically.
    """
    L = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], (*a.shape, L))  # [i, j] = a_i
    strict = jnp.tril(jnp.ones((L, L), bool), -1)
    return jnp.cumsum(jnp.where(strict, rep, 0), axis=-2)


def _decay(A, seg, mask):
    """``exp(A·seg)`` where ``mask``, exactly 0 elsewhere (masked before the exponential)."""
    return jnp.exp(jnp.where(mask, A[:, None, None] * seg, -jnp.inf))


def _ssd_matrix(dt, A, B, C, reverse):
    b, L, H = dt.shape
    dth = jnp.moveaxis(dt, 1, 2)  # (B, Hh, L)
    CB = jnp.einsum("btgn,bsgn->bgts", C, B)
    CB = jnp.repeat(CB, H // B.shape[2], axis=1)  # (B, Hh, L, L)
    if reverse:
        # Σ_{r=t}^{s−1} dt_r = segment sum of dt shifted one step later, read at [s, t].
        shifted = jnp.pad(dth[..., :-1], ((0, 0), (0, 0), (1, 0)))
        seg = jnp.swapaxes(_segment_sums(shifted), -1, -2)
        mask = jnp.triu(jnp.ones((L, L), bool))
    else:
        seg = _segment_sums(dth)
        mask = jnp.tril(jnp.ones((L, L), bool))
    return CB * _decay(A, seg, mask) * dth[:, :, None, :]


def _initial_state_output(h0, dt, A, C, reverse):
    """Contribution ``exp(A·Σ dt)·h0 C_t`` of an initial state to every output ``(B, L, Hh, P)``;
    the sum runs over ``r ≤ t`` (forward) or ``r ≥ t`` (reverse)."""
    H = dt.shape[2]
    cum = jnp.cumsum(jnp.flip(dt, 1), 1)[:, ::-1] if reverse else jnp.cumsum(dt, 1)
    return jnp.einsum("bthn,bhpn->bthp", _expand_groups(C, H), h0) * jnp.exp(A * cum)[..., None]


def _ssd_materialized(x, dt, A, B, C, h0, reverse):
    H = x.shape[2]
    M = _ssd_matrix(dt, A, B, C, reverse)
    y = jnp.einsum("bhts,bshp->bthp", M, x)
    # The final state is the state after the last step: a weighted sum of dt_s·x_s B_sᵀ.
    dth = jnp.moveaxis(dt, 1, 2)
    if reverse:  # Σ_{r<s} dt_r
        to_end = jnp.pad(jnp.cumsum(dth, -1)[..., :-1], ((0, 0), (0, 0), (1, 0)))
    else:  # Σ_{r>s} dt_r
        to_end = jnp.flip(jnp.cumsum(jnp.flip(dth[..., 1:], -1), -1), -1)
        to_end = jnp.pad(to_end, ((0, 0), (0, 0), (0, 1)))
    w = jnp.exp(A[:, None] * to_end) * dth  # (B, Hh, L)
    final = jnp.einsum("bhs,bshp,bshn->bhpn", w, x, _expand_groups(B, H))
    if h0 is not None:
        y = y + _initial_state_output(h0, dt, A, C, reverse)
        final = final + jnp.exp(A * jnp.sum(dt, 1))[..., None, None] * h0
    return y, final


def _shift_later(y):
    """Row t takes row t − 1; row 0 becomes zero (``shift`` in REFERENCE §7)."""
    return jnp.pad(y[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (y.ndim - 2))


def _shift_earlier(y):
    """Row t takes row t + 1; the last row becomes zero (the flipped ``shift``)."""
    return jnp.pad(y[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (y.ndim - 2))


def _qs_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag):
    b, L, H = dt_fw.shape
    rep = H // B_fw.shape[2]
    eye = jnp.eye(L, dtype=bool)
    lower = jnp.tril(jnp.ones((L, L), bool), -1)
    # s < t: C_fw[t−1]·B_fw[s]·exp(A·Σ_{r=s+1}^{t−1} dt_fw[r])·dt_fw[s]; the segment sum is
    # row t−1 of the forward segment sums.
    seg_fw = _segment_sums(jnp.moveaxis(dt_fw, 1, 2))
    seg_fw = jnp.pad(seg_fw[..., :-1, :], ((0, 0), (0, 0), (1, 0), (0, 0)))
    C_prev = jnp.pad(C_fw[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    CB_fw = jnp.repeat(jnp.einsum("btgn,bsgn->bgts", C_prev, B_fw), rep, axis=1)
    M_fw = CB_fw * _decay(A, seg_fw, lower) * jnp.moveaxis(dt_fw, 1, 2)[:, :, None, :]
    # s > t: C_bw[t+1]·B_bw[s]·exp(A·Σ_{r=t+1}^{s−1} dt_bw[r])·dt_bw[s]; the segment sum is
    # entry [s−1, t] of the backward segment sums.
    seg_bw = jnp.swapaxes(_segment_sums(jnp.moveaxis(dt_bw, 1, 2)), -1, -2)  # [t, s']
    seg_bw = jnp.pad(seg_bw[..., :, :-1], ((0, 0), (0, 0), (0, 0), (1, 0)))
    C_next = jnp.pad(C_bw[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))
    CB_bw = jnp.repeat(jnp.einsum("btgn,bsgn->bgts", C_next, B_bw), rep, axis=1)
    M_bw = CB_bw * _decay(A, seg_bw, lower.T) * jnp.moveaxis(dt_bw, 1, 2)[:, :, None, :]
    M_diag = jnp.where(eye, jnp.moveaxis(diag, 1, 2)[..., None], 0)
    return M_fw + M_bw + M_diag


# --------------------------------------------------------------------------------------
# Sequential form


_REMAT_MIN_LENGTH = 256


def _ssd_sequential(x, dt, A, B, C, h0, reverse):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    tm = lambda v: jnp.moveaxis(v, 1, 0)  # noqa: E731  time-major for lax.scan
    xs = (tm(x.reshape(b, L, G, R, P)), tm(_group_heads(dt, G)), tm(B), tm(C))
    Ag = _group_heads(A, G)

    def step(h, inp):
        x_t, dt_t, B_t, C_t = inp  # (b, G, R, P), (b, G, R), (b, G, N), (b, G, N)
        decay = jnp.exp(dt_t * Ag)[..., None, None]
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, None, :]
        return h, jnp.einsum("bgrpn,bgn->bgrp", h, C_t)

    h = jnp.zeros((b, G, R, P, N), x.dtype) if h0 is None else h0.reshape(b, G, R, P, N)
    if L < _REMAT_MIN_LENGTH:
        h, ys = lax.scan(step, h, xs, reverse=reverse)
        return jnp.moveaxis(ys.reshape(L, b, H, P), 0, 1), h.reshape(b, H, P, N)
    # Long sequences: blocks of ~√L steps, rematerialised under differentiation, so only the
    # block-boundary states (not all L states) are stored for the backward pass.
    K = math.isqrt(L)
    nb = -(-L // K)
    pad = nb * K - L
    if pad:
        # Zero steps are identity steps; they go where the scan ends so the states before
        # them are untouched.
        width = ((pad, 0) if reverse else (0, pad),)
        xs = tuple(jnp.pad(v, width + ((0, 0),) * (v.ndim - 1)) for v in xs)
    xs = tuple(v.reshape(nb, K, *v.shape[1:]) for v in xs)

    @jax.checkpoint
    def block(h, inp):
        return lax.scan(step, h, inp, reverse=reverse)

    h, ys = lax.scan(block, h, xs, reverse=reverse)
    ys = ys.reshape(nb * K, b, H, P)
    ys = ys[pad:] if reverse else ys[:L]
    return jnp.moveaxis(ys, 0, 1), h.reshape(b, H, P, N)


# --------------------------------------------------------------------------------------
# Chunked form: a loop over chunks in the caller's layout, with a hand-written gradient.
#
# Inside the loop, chunk arrays are ``xk (b, Q, G, R, P)``, ``dtk (b, Q, G, R)``,
# ``Bk, Ck (b, Q, G, N)``; the state is kept as ``(b, G, N, R, P)`` so that both the output
# contraction ``C_i · state`` and the state update ``Bᵀ · (decay·dt·x)`` are plain matmuls
# over the native ``(Q, Hh·P)`` slab of the chunk.


def _ssd_chunked(x, dt, A, B, C, h0, chunk_size):
    """Chunked SSD forward direction; promoted inputs as in :func:`ssd`."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    if pad:
        # Zero steps at the end are identity steps: the final state passes through them.
        x, dt, B, C = (
            jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2)) for v in (x, dt, B, C)
        )
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
    y, s_final = _chunked_core(xc, dtc, _group_heads(A, G), Bc, Cc, s0)
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    return y, jnp.moveaxis(s_final, 2, 4).reshape(b, H, P, N)


def _chunk(v, k):
    return lax.dynamic_index_in_dim(v, k, axis=1, keepdims=False)


def _put(buf, v, k):
    return lax.dynamic_update_index_in_dim(buf, v.reshape(buf.shape[:1] + buf.shape[2:]), k, axis=1)


def _split(v, *shape):
    """A chunk ``(b, Q, features)`` viewed as ``(b, Q, *shape)``."""
    return v.reshape(*v.shape[:2], *shape)


def _chunk_terms(xk, dtk, A, Bk, Ck):
    """Chunk-local quantities shared by the forward and the backward pass.

    Returns ``cs (b, Q, G, R)`` (cumulative ``dt·A`` inside the chunk, ≤ 0 and decreasing),
    ``Lm (b, G, R, Q, Q)`` (``exp(cs_i − cs_j)`` for ``j ≤ i``, else 0), ``CB (b, G, Q, Q)``,
    ``u (b, Q, G, R, P)`` (``dt·x``) and ``e (b, Q, G, R)`` (``exp(cs_end − cs_j)``).
    """
    Q = xk.shape[1]
    cs = jnp.cumsum(dtk * A, axis=1)
    cs_t = jnp.moveaxis(cs, 1, 3)  # (b, G, R, Q)
    mask = jnp.tril(jnp.ones((Q, Q), bool))
    Lm = jnp.exp(jnp.where(mask, cs_t[..., :, None] - cs_t[..., None, :], -jnp.inf))
    CB = jnp.einsum("bign,bjgn->bgij", Ck, Bk)
    u = xk * dtk[..., None]
    e = jnp.exp(cs[:, -1:] - cs)
    return cs, Lm, CB, u, e


def _chunk_forward(xk, dtk, A, Bk, Ck, s):
    """One chunk: outputs ``(b, Q, G, R, P)`` and the state after the chunk."""
    cs, Lm, CB, u, e = _chunk_terms(xk, dtk, A, Bk, Ck)
    W = CB[:, :, None] * Lm
    y = jnp.einsum("bgrij,bjgrp->bigrp", W, u)
    y = y + jnp.exp(cs)[..., None] * jnp.einsum("bign,bgnrp->bigrp", Ck, s)
    s_next = jnp.exp(cs[:, -1])[:, :, None, :, None] * s
    s_next = s_next + jnp.einsum("bjgn,bjgrp->bgnrp", Bk, u * e[..., None])
    return y, s_next


def _chunked_loop(xc, dtc, A, Bc, Cc, s0, save_states):
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
        )
        return s, _put(y, yk, k), states

    states = jnp.zeros((s0.shape[0], nc, s0[0].size), s0.dtype) if save_states else None
    s, y, states = lax.fori_loop(0, nc, body, (s0, jnp.zeros_like(xc), states))
    return y, s, states


@jax.custom_vjp
def _chunked_core(xc, dtc, A, Bc, Cc, s0):
    y, s, _ = _chunked_loop(xc, dtc, A, Bc, Cc, s0, save_states=False)
    return y, s


def _chunked_core_fwd(xc, dtc, A, Bc, Cc, s0):
    y, s, states = _chunked_loop(xc, dtc, A, Bc, Cc, s0, save_states=True)
    return (y, s), (xc, dtc, A, Bc, Cc, states)


def _chunk_backward(xk, dtk, A, Bk, Ck, s, gy, gs):
    """Gradients of one chunk given the entry state ``s``, the output cotangent ``gy`` and the
    cotangent ``gs`` of the state after the chunk."""
    cs, Lm, CB, u, e = _chunk_terms(xk, dtk, A, Bk, Ck)
    W = CB[:, :, None] * Lm
    ecs = jnp.exp(cs)
    gy_e = gy * ecs[..., None]
    # Inputs: through the quadratic form and through the state handed on.
    v = jnp.einsum("bjgn,bgnrp->bjgrp", Bk, gs)  # gs·B_j
    gu = jnp.einsum("bgrij,bigrp->bjgrp", W, gy) + e[..., None] * v
    # State before the chunk: decayed through the chunk, and read by every output.
    gs_prev = jnp.exp(cs[:, -1])[:, :, None, :, None] * gs
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
    g_end = jnp.sum(g_e, axis=1) + jnp.exp(cs[:, -1]) * jnp.einsum("bgnrp,bgnrp->bgr", gs, s)
    g_cs = (g_cs - g_e).at[:, -1].add(g_end)
    # cs_i = Σ_{j≤i} dt_j·A, so each step's exponent gradient is a reverse cumulative sum.
    g_a = jnp.flip(jnp.cumsum(jnp.flip(g_cs, 1), 1), 1)
    gx = gu * dtk[..., None]
    gdt = jnp.sum(gu * xk, axis=-1) + g_a * A
    gA = jnp.sum(g_a * dtk, axis=(0, 1))
    return gx, gdt, gA, gB, gC, gs_prev


def _chunked_core_bwd(residuals, cotangents):
    xc, dtc, A, Bc, Cc, states = residuals
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
    return gx, gdt, gA, gB, gC, gs0


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)
