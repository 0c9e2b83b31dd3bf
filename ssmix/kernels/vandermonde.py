"""Diagonal state-space kernels (S4D): discretisation, Vandermonde kernel, state forwarding.

A diagonal SSM with ``N/2`` complex modes per feature (one mode of each conjugate pair) maps
``u (B, L, H)`` to ``y_ℓ = Σ_{s≤ℓ} K_{ℓ−s} u_s`` with the kernel (S4D, Gu et al. 2022)

    K_ℓ = 2·Re Σ_n C_n B̄_n Ā_n^ℓ,     ℓ = 0 … L−1,

a Vandermonde product. Shapes use H (features), N2 = N/2 (half modes), L (length), B (batch),
C (output channels). Everything here is a pure function of jax arrays.

- :func:`discretize_diag`: ``(A, B, Δ) → (log Ā, B̄)`` for ``"zoh"``, ``"bilinear"`` and
  ``"dss"``. Powers are taken as ``Ā^ℓ = exp(ℓ·log Ā)``, so any power costs one ``exp``.
- :func:`vandermonde_kernel` / :func:`diag_ssm_kernel`: the kernel in O(H·(N + L)) memory:
  ``ℓ = q·T + r`` with ``T ≈ √L`` factorises ``Ā^ℓ = Ā^{qT}·Ā^r``, so the kernel is one small
  batched matmul ``(nq × N) @ (N × T)`` per feature and no ``(H, N, L)`` tensor is formed.
- :func:`diag_state_forward`, :func:`diag_state_output`: state forwarding. A state ``x``
  before the sequence contributes ``2·Re Σ_n C_n Ā_n^{ℓ+1} x_n`` to output ℓ, and the state
  after the sequence is ``Ā^L x + Σ_ℓ Ā^{L−1−ℓ} B̄ u_ℓ`` (a transposed Vandermonde product).
- :func:`chunked_ssm_conv`: the chunked form of any LTI SSM convolution (used by S4D and by
  the DPLR kernel of S4): inside chunks of ``T`` steps the output is a Toeplitz matmul with
  the kernel's first ``T`` taps; a real state of size ``S`` carries across chunks.
  :func:`diag_chunk_operators` builds its operators for a diagonal SSM;
  :func:`chunked_ssm_conv_packed` is its packed-sequence form (state reset where a segment
  starts).

Each fast form has a naive reference next to it (``*_naive``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.attention._common import tile_fits

__all__ = [
    "DISCS",
    "ChunkOps",
    "chunked_ssm_conv",
    "chunked_ssm_conv_bidirectional",
    "chunked_ssm_conv_naive",
    "chunked_ssm_conv_packed",
    "chunked_state_forward",
    "chunked_state_output",
    "diag_chunk_operators",
    "diag_ssm_kernel",
    "diag_ssm_kernel_naive",
    "diag_state_forward",
    "diag_state_forward_naive",
    "diag_state_output",
    "diag_state_output_naive",
    "discretize_diag",
    "vandermonde_kernel",
]

#: Discretisations of a diagonal system (S4D, Gu et al. 2022; "dss" is the DSS-softmax
#: kernel).
DISCS = ("zoh", "bilinear", "dss")


# --------------------------------------------------------------------------------------------
# Discretisation
# --------------------------------------------------------------------------------------------


def _check_modes(A, B, dt):
    check_ndim("A", A, 2, "(H, N/2)")
    if B.shape != A.shape:
        raise ValueError(f"B must have the shape of A {A.shape}; got {B.shape}")
    check_ndim("dt", dt, (1, 2), "(H,) or (H, N/2)")
    if dt.shape not in ((A.shape[0],), A.shape):
        raise ValueError(f"dt must have shape ({A.shape[0]},) or {A.shape}; got {dt.shape}")


def _complex_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    return jnp.promote_types(dtype, jnp.complex64)


def discretize_diag(A, B, dt, disc: str = "zoh", *, l_norm: int | None = None):
    """Discretise a diagonal SSM per mode; return ``(log Ā, B̄)``, both complex ``(H, N/2)``.

    - ``"zoh"``: ``Ā = exp(ΔA)``, ``B̄ = (exp(ΔA) − 1)/A · B``.
    - ``"bilinear"``: ``Ā = (1 + ΔA/2)/(1 − ΔA/2)``, ``B̄ = Δ·B/(1 − ΔA/2)``.
    - ``"dss"`` (the DSS-softmax kernel of the S4 code): ``Ā = exp(ΔA)``,
      ``B̄ = B·(exp(ΔA) − 1)/(A·(exp(l_norm·ΔA) − 1))``: the kernel is normalised over a
      fixed length ``l_norm``, which keeps the system time-invariant (one ``Ā``, ``B̄``
      whatever the sequence length) so that stepping and state carry stay exact. It assumes
      ``Re A < 0`` (all ssmix initialisations), where ``exp(l_norm·ΔA) ≠ 1``.

    ``log Ā`` is returned instead of ``Ā`` because every consumer needs many powers
    ``Ā^ℓ = exp(ℓ·log Ā)``; for ZOH it is exactly ``ΔA``.

    Args:
      A: complex ``(H, N/2)`` continuous-time modes.
      B: complex ``(H, N/2)`` input vector.
      dt: real step ``(H,)`` or ``(H, N/2)``, positive.
      disc: one of :data:`DISCS`.
      l_norm: normalisation length, required for ``"dss"`` and ignored otherwise.

    Returns:
      ``(log_dA, dB)``, complex ``(H, N/2)``.
    """
    check_choice("disc", disc, DISCS)
    _check_modes(A, B, dt)
    cdtype = _complex_dtype(A, B, dt)
    A, B = A.astype(cdtype), B.astype(cdtype)
    dt = dt if dt.ndim == 2 else dt[:, None]
    dtA = dt.astype(cdtype) * A
    if disc == "zoh":
        return dtA, B * jnp.expm1(dtA) / A
    if disc == "bilinear":
        half = dtA / 2
        return jnp.log1p(half) - jnp.log1p(-half), dt * B / (1 - half)
    if l_norm is None:
        raise ValueError("disc='dss' normalises the kernel over a fixed length: pass l_norm")
    check_positive_int("l_norm", l_norm)
    return dtA, B * jnp.expm1(dtA) / (A * jnp.expm1(l_norm * dtA))


def _discretize_naive(A, B, dt, disc, l_norm):
    """Ā and B̄ straight from the discretisation formulas (no logarithms)."""
    dt = dt if dt.ndim == 2 else dt[:, None]
    dtA = dt * A
    if disc == "zoh":
        dA = jnp.exp(dtA)
        return dA, (dA - 1) / A * B
    if disc == "bilinear":
        return (1 + dtA / 2) / (1 - dtA / 2), dt * B / (1 - dtA / 2)
    dA = jnp.exp(dtA)
    return dA, B * (dA - 1) / (A * (jnp.exp(dtA * l_norm) - 1))


# --------------------------------------------------------------------------------------------
# Vandermonde kernel
# --------------------------------------------------------------------------------------------


def _block(L: int) -> int:
    """Block length ``T ≈ √L`` of the factorisation ``ℓ = q·T + r``."""
    return max(1, math.isqrt(L - 1) + 1) if L > 1 else 1


def _real_dtype(x):
    return jnp.finfo(x.dtype).dtype


def vandermonde_kernel(log_dA, W, L: int):
    """``K[..., h, ℓ] = 2·Re Σ_n W[..., h, n]·exp(ℓ·log_dA[h, n])`` for ``ℓ < L``.

    Computed as ``Ā^{qT+r} = Ā^{qT}·Ā^r`` with ``T = ⌈√L⌉``: a batched real matmul of
    ``(…, H, L/T, N)`` by ``(H, N, T)``; memory ``O(H·N·√L + H·L)``, i.e. ``O(H·L)`` once
    ``L ≥ (N/2)²`` and never the ``(H, N, L)`` tensor of the naive form.

    Args:
      log_dA: complex ``(H, N/2)``, the logarithm of the discrete modes.
      W: complex ``(..., H, N/2)`` weights (``C·B̄`` for the kernel; leading axes, e.g.
        channels or batch, are kept).
      L: number of taps, a positive integer.

    Returns:
      Real ``(..., H, L)``.
    """
    check_positive_int("L", L)
    check_ndim("log_dA", log_dA, 2, "(H, N/2)")
    if W.shape[-2:] != log_dA.shape:
        raise ValueError(f"W must have shape (..., {log_dA.shape}); got {W.shape}")
    T = _block(L)
    nq = -(-L // T)
    rdtype = _real_dtype(log_dA)
    r = jnp.arange(T, dtype=rdtype)
    q = jnp.arange(nq, dtype=rdtype) * T
    V = jnp.exp(log_dA[:, :, None] * r)  # (H, N2, T): Ā^r
    Z = W[..., None, :] * jnp.exp(log_dA[:, None, :] * q[:, None])  # (..., H, nq, N2)
    # 2·Re(Z V) = 2·(Re Z Re V − Im Z Im V): one real matmul over the stacked [re, im] axis.
    Zr = jnp.concatenate([Z.real, -Z.imag], axis=-1)
    Vr = jnp.concatenate([V.real, V.imag], axis=-2)
    K = 2 * jnp.einsum("...hqn,hnt->...hqt", Zr, Vr)
    return K.reshape(*K.shape[:-2], nq * T)[..., :L]


def _check_output(C, A):
    check_ndim("C", C, (2, 3), "(H, N/2) or (C, H, N/2)")
    if C.shape[-2:] != A.shape:
        raise ValueError(f"C must have shape (..., {A.shape[0]}, {A.shape[1]}); got {C.shape}")


def diag_ssm_kernel(A, B, C, dt, L: int, disc: str = "zoh", *, l_norm: int | None = None):
    """Convolution kernel of a diagonal SSM: ``K_ℓ = 2·Re Σ_n C_n B̄_n Ā_n^ℓ``, ``ℓ < L``.

    Args:
      A, B: complex ``(H, N/2)`` modes and input vector (half of each conjugate pair).
      C: complex ``(H, N/2)``, or ``(C, H, N/2)`` for ``C`` output channels.
      dt: real ``(H,)`` or ``(H, N/2)``.
      L: kernel length.
      disc: ``"zoh"``, ``"bilinear"`` or ``"dss"`` (see :func:`discretize_diag`).
      l_norm: the DSS normalisation length (``disc="dss"`` only).

    Returns:
      Real ``(H, L)``, or ``(C, H, L)`` with channels. Memory ``O(H·(N + L))`` for long L.
    """
    _check_output(C, A)
    log_dA, dB = discretize_diag(A, B, dt, disc, l_norm=l_norm)
    return vandermonde_kernel(log_dA, C.astype(dB.dtype) * dB, L)


def diag_ssm_kernel_naive(A, B, C, dt, L: int, disc: str = "zoh", *, l_norm: int | None = None):
    """Reference for :func:`diag_ssm_kernel`: the ``(H, N/2, L)`` Vandermonde tensor ``Ā^ℓ``."""
    check_choice("disc", disc, DISCS)
    _check_modes(A, B, dt)
    _check_output(C, A)
    dA, dB = _discretize_naive(A, B, dt, disc, l_norm)
    powers = dA[:, :, None] ** jnp.arange(L)
    return 2 * jnp.real(jnp.einsum("...hn,hnl->...hl", C * dB, powers))


# --------------------------------------------------------------------------------------------
# State forwarding
# --------------------------------------------------------------------------------------------


def _check_state(name, state, B, H, N2):
    if state.shape != (B, H, N2):
        raise ValueError(f"{name} must have shape (B, H, N/2) = {(B, H, N2)}; got {state.shape}")


def diag_state_output(log_dA, C, state, L: int):
    """Output contribution of a state before the sequence: ``y_ℓ = 2·Re Σ_n C_n Ā_n^{ℓ+1} x_n``.

    Args:
      log_dA: complex ``(H, N/2)``.
      C: complex ``(H, N/2)`` or ``(C, H, N/2)``.
      state: complex ``(B, H, N/2)``.
      L: number of outputs.

    Returns:
      Real ``(B, L, H)``, or ``(B, L, C, H)`` with channels.
    """
    _check_output(C, log_dA)
    check_ndim("state", state, 3, "(B, H, N/2)")
    _check_state("state", state, state.shape[0], *log_dA.shape)
    W = jnp.exp(log_dA) * state  # (B, H, N2)
    if C.ndim == 3:
        W = W[:, None] * C  # (B, C, H, N2)
    else:
        W = W * C
    y = vandermonde_kernel(log_dA, W, L)  # (B, [C,] H, L)
    return jnp.moveaxis(y, -1, 1)


def diag_state_output_naive(log_dA, C, state, L: int):
    """Reference for :func:`diag_state_output`: an explicit ``(H, N/2, L)`` power table."""
    powers = jnp.exp(log_dA[:, :, None] * jnp.arange(1, L + 1))
    if C.ndim == 3:
        y = jnp.einsum("chn,bhn,hnl->blch", C, state, powers)
    else:
        y = jnp.einsum("hn,bhn,hnl->blh", C, state, powers)
    return 2 * jnp.real(y)


def diag_state_forward(log_dA, dB, u, state=None):
    """State after the sequence: ``x_L = Ā^L x_0 + Σ_ℓ Ā^{L−1−ℓ} B̄ u_ℓ``.

    The sum is a transposed Vandermonde product, factorised like :func:`vandermonde_kernel`
    (blocks of ``T ≈ √L`` steps: one contraction inside blocks, one across them), so no
    ``(H, N, L)`` tensor is formed.

    Args:
      log_dA, dB: complex ``(H, N/2)``.
      u: real input ``(B, L, H)``.
      state: complex ``(B, H, N/2)`` state before the sequence (zero when None).

    Returns:
      Complex ``(B, H, N/2)``.
    """
    check_ndim("u", u, 3, "(B, L, H)")
    Bsz, L, H = u.shape
    if log_dA.shape[0] != H or dB.shape != log_dA.shape:
        raise ValueError(
            f"log_dA and dB must have shape (H, N/2) with H = {H}; got {log_dA.shape}, {dB.shape}"
        )
    T = _block(L)
    nq = -(-L // T)
    # Zeros in front leave the sum unchanged and make the length a multiple of T.
    u = jnp.pad(u, ((0, 0), (nq * T - L, 0), (0, 0))).reshape(Bsz, nq, T, H)
    rdtype = _real_dtype(log_dA)
    inner = jnp.exp(log_dA[:, :, None] * jnp.arange(T - 1, -1, -1, dtype=rdtype)) * dB[..., None]
    inner = jnp.concatenate([inner.real, inner.imag], axis=1)  # (H, 2·N2, T)
    s = jnp.einsum("bqth,hnt->bqhn", u.astype(rdtype), inner)
    N2 = log_dA.shape[1]
    s = s[..., :N2] + 1j * s[..., N2:]  # (B, nq, H, N2)
    outer = jnp.exp(log_dA * (T * jnp.arange(nq - 1, -1, -1, dtype=rdtype))[:, None, None])
    x = jnp.sum(outer[None] * s, axis=1)
    if state is not None:
        _check_state("state", state, Bsz, H, N2)
        x = x + jnp.exp(L * log_dA) * state
    return x


def diag_state_forward_naive(log_dA, dB, u, state=None):
    """Reference for :func:`diag_state_forward`: a Python loop of ``x ← Ā x + B̄ u_ℓ``."""
    dA = jnp.exp(log_dA)
    x = jnp.zeros((u.shape[0], *dA.shape), dA.dtype) if state is None else state
    for ell in range(u.shape[1]):
        x = dA * x + dB * u[:, ell, :, None]
    return x


# --------------------------------------------------------------------------------------------
# Chunked state-space convolution (shared with the DPLR kernel)
# --------------------------------------------------------------------------------------------


class ChunkOps(NamedTuple):
    """Operators of the chunked convolution for chunks of ``T`` steps, real state size ``S``.

    The state lives in real coordinates ``(B, H, S)``; for conjugate-pair systems these are
    ``[Re x, Im x]`` of the ``N/2`` half modes (``S = N``).

    Attributes:
      taps: ``(C, H, T)`` the kernel's first ``T`` taps.
      w_in: ``(H, S, T)`` column ``r``: the state at a chunk's end produced by a unit input
        at chunk position ``r``.
      w_out: ``(C, H, S, T)`` column ``t``: the output at chunk position ``t`` produced by a
        unit state just before the chunk.
      log_dA: complex ``(H, S/2)`` for a diagonal system (the transition is ``exp(·)`` on
        ``[Re x, Im x]`` pairs), else None.
      dA: real ``(H, S, S)`` dense one-step transition, else None.
    """

    taps: jax.Array
    w_in: jax.Array
    w_out: jax.Array
    log_dA: jax.Array | None
    dA: jax.Array | None


def diag_chunk_operators(log_dA, dB, C, T: int, *, strict: bool = False) -> ChunkOps:
    """:class:`ChunkOps` of a diagonal SSM (``S = N``, state ``[Re x, Im x]``).

    Args:
      log_dA, dB: complex ``(H, N/2)``.
      C: complex ``(C, H, N/2)``.
      T: chunk length.
      strict: build the strictly causal system ``y_t = 2·Re(C x_{t−1})`` (taps shifted by one,
        tap 0 zero) used for the backward direction of a bidirectional layer.

    Returns:
      :class:`ChunkOps`.
    """
    check_positive_int("T", T)
    rdtype = _real_dtype(log_dA)
    r = jnp.arange(T, dtype=rdtype)
    V = jnp.exp(log_dA[:, :, None] * r)  # (H, N2, T): Ā^r
    w_in = dB[..., None] * V[..., ::-1]  # Ā^{T−1−r} B̄
    w_in = jnp.concatenate([w_in.real, w_in.imag], axis=1)
    # Output at position t from the state before the chunk: 2·Re(C Ā^{t+1} x), or C Ā^t x.
    out = C[..., None] * (V if strict else V * jnp.exp(log_dA)[..., None])  # (C, H, N2, T)
    w_out = jnp.concatenate([2 * out.real, -2 * out.imag], axis=-2)
    taps = 2 * jnp.real(jnp.einsum("chn,hnt->cht", C * dB, V))
    if strict:
        taps = jnp.pad(taps[..., : T - 1], ((0, 0), (0, 0), (1, 0)))
    return ChunkOps(taps, w_in, w_out, log_dA, None)


def _matrix_power(M, n: int):
    """``M^n`` for a static integer ``n ≥ 0`` by repeated squaring, batched over leading axes."""
    result = None
    base = M
    while n:
        if n & 1:
            result = base if result is None else result @ base
        n >>= 1
        if n:
            base = base @ base
    if result is None:
        eye = jnp.eye(M.shape[-1], dtype=M.dtype)
        return jnp.broadcast_to(eye, M.shape)
    return result


def _power(ops: ChunkOps, steps: int):
    """``Ā^steps``: complex ``(H, S/2)`` for a diagonal system, real ``(H, S, S)`` if dense."""
    if ops.log_dA is not None:
        return jnp.exp(steps * ops.log_dA)
    return _matrix_power(ops.dA, steps)


def _apply(power, x):
    """Apply a :func:`_power` result to real states ``x (..., H, B, S)`` laid out
    feature-major (any leading axes, e.g. chunks)."""
    if jnp.iscomplexobj(power):
        g = power[:, None, :]
        half = g.shape[-1]
        xr, xi = x[..., :half], x[..., half:]
        return jnp.concatenate([g.real * xr - g.imag * xi, g.real * xi + g.imag * xr], axis=-1)
    return jnp.einsum("hij,...hbj->...hbi", power, x)


def _pass_states(ops: ChunkOps, T: int, x0, s=None, reset=None, length: int | None = None):
    """The states between chunks: ``x_{k+1} = A_k x_k + s_k`` with ``A_k = Ā^T``, or zero
    where ``reset[k]`` (the chunk holds a segment start).

    Args:
      ops: :class:`ChunkOps` (its transition).
      T: chunk length.
      x0: real ``(H, B, S)`` state before chunk 0.
      s: real ``(nc, H, B, S)`` every chunk's own contribution to the state at its end
        (zero when None; then ``length`` gives ``nc``).
      reset: bool ``(nc, H|1, B)`` or None (no resets).

    Returns:
      ``(x_prev (nc, H, B, S), x_last (H, B, S))``: the states before every chunk and after
      the last.

    Under the CPU rule (:func:`ssmix.auto_backend`) a ``lax.scan`` walks the chunks, the
    cheapest form there. Under the GPU / TPU rules a scan of ``nc`` tiny steps is a round of
    kernel launches per step, so the affine maps ``x ↦ A_k x + s_k`` are composed by a
    doubling (Kogge–Stone) prefix scan, unrolled in Python over ``⌈log2 nc⌉`` levels with no
    loop: at level ``d = 1, 2, 4, …`` every element ``k ≥ d`` adds ``A·b_{k−d}`` where the
    composed transition ``A`` of its ``d`` chunks is ``Ā^{dT}`` (one matrix per feature,
    shared by the batch and the chunks: one batched matmul per level for a dense system,
    elementwise for a diagonal one) or zero when a chunk among them resets. Each map's
    transition is ``Ā^T`` or zero, so it is carried as a flag rather than as its own
    ``(S, S)`` matrix, which ``lax.associative_scan`` would need (``nc·H·B·S²`` numbers per
    level for a dense system: gigabytes at S4's sizes).
    """
    G = _power(ops, T)
    if resolve_backend(None) == "cpu":
        if s is None:
            x_last, x_prev = jax.lax.scan(lambda x, _: (_apply(G, x), x), x0, None, length=length)
            return x_prev, x_last
        if reset is None:
            x_last, x_prev = jax.lax.scan(lambda x, s_k: (_apply(G, x) + s_k, x), x0, s)
            return x_prev, x_last

        def body(x, inp):
            s_k, r_k = inp
            return jnp.where(r_k[..., None], 0, _apply(G, x)) + s_k, x

        x_last, x_prev = jax.lax.scan(body, x0, (s, reset))
        return x_prev, x_last
    if s is None:
        s = jnp.zeros((length, *x0.shape), x0.dtype)
    nc = s.shape[0]
    first = _apply(G, x0)
    if reset is not None:
        first = jnp.where(reset[0][..., None], 0, first)
        alive = ~reset
    b = jnp.concatenate([(s[0] + first)[None], s[1:]])  # b_k: the prefix map applied to x0
    d, P = 1, G
    while d < nc:
        add = _apply(P, b[:-d])
        if reset is not None:
            add = jnp.where(alive[d:][..., None], add, 0)
            alive = jnp.concatenate([alive[:d], alive[d:] & alive[:-d]])
        b = jnp.concatenate([b[:d], b[d:] + add])
        d *= 2
        if d < nc:
            P = P * P if jnp.iscomplexobj(P) else P @ P
    return jnp.concatenate([x0[None], b[:-1]]), b[-1]


def _check_ops(u, ops: ChunkOps):
    check_ndim("u", u, 3, "(B, L, H)")
    H = u.shape[2]
    C, Hk, T = ops.taps.shape
    S = ops.w_in.shape[1]
    if Hk != H or ops.w_in.shape != (H, S, T) or ops.w_out.shape != (C, H, S, T):
        raise ValueError(
            "chunk operators must have shapes taps (C, H, T), w_in (H, S, T), "
            f"w_out (C, H, S, T) with H = {H}; got {ops.taps.shape}, {ops.w_in.shape}, "
            f"{ops.w_out.shape}"
        )


def _chunk_states(ut, ops: ChunkOps, x0):
    """States of the chunked recurrence on feature-major input ``ut (H, B, Lp)``.

    Returns the states before every chunk ``(nc, H, B, S)`` and after the last ``(H, B, S)``.
    """
    H, Bsz, Lp = ut.shape
    T = ops.taps.shape[-1]
    S = ops.w_in.shape[1]
    nc = Lp // T
    # Every chunk's own contribution to the state at its end.
    s = jnp.einsum("hmt,hst->hms", ut.reshape(H, Bsz * nc, T), ops.w_in).reshape(H, Bsz, nc, S)
    return _pass_states(ops, T, x0, jnp.moveaxis(s, 2, 0))


def _chunk_outputs(ut, x_prev, ops: ChunkOps):
    """Outputs ``(H, B, nc, C, T)`` from the input ``(H, B, Lp)`` and incoming chunk states."""
    H, Bsz, Lp = ut.shape
    C, _, T = ops.taps.shape
    nc = Lp // T
    # Toeplitz matrices of the first T taps: Tm[c, h, t, s] = taps[c, h, t − s] for t ≥ s.
    lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    Tm = jnp.where(lag >= 0, jnp.take(ops.taps, jnp.clip(lag, 0, T - 1), axis=-1), 0)
    xp = jnp.moveaxis(x_prev, 0, 2).reshape(H, Bsz * nc, -1)
    y = jnp.einsum("hms,chts->hmct", ut.reshape(H, Bsz * nc, T), Tm)
    y = y + jnp.einsum("hmn,chnt->hmct", xp, ops.w_out)
    return y.reshape(H, Bsz, nc, C, T)


def _to_hmajor(u, T: int, dtype, state, S: int):
    """``u (B, L, H)`` → zero-padded feature-major ``(H, B, nc·T)``; state → ``(H, B, S)``."""
    Bsz, L, H = u.shape
    nc = -(-L // T)
    ut = jnp.pad(jnp.transpose(u.astype(dtype), (2, 0, 1)), ((0, 0), (0, 0), (0, nc * T - L)))
    if state is None:
        return ut, jnp.zeros((H, Bsz, S), dtype)
    if state.shape != (Bsz, H, S):
        raise ValueError(f"state must have shape (B, H, S) = {(Bsz, H, S)}; got {state.shape}")
    return ut, jnp.transpose(state.astype(dtype), (1, 0, 2))


def _final_state(ut, L: int, ops: ChunkOps, x_prev, x_last):
    """State after position ``L − 1`` when the last chunk holds only ``r ≤ T`` valid steps."""
    T = ops.taps.shape[-1]
    nc = x_prev.shape[0]
    r = L - (nc - 1) * T
    if r == T:
        return x_last
    tail = ut[:, :, (nc - 1) * T : L]
    return _apply(_power(ops, r), x_prev[-1]) + jnp.einsum(
        "hbt,hst->hbs", tail, ops.w_in[..., T - r :]
    )


def chunked_ssm_conv(u, ops: ChunkOps, state=None, *, return_state: bool = False):
    """Causal SSM convolution in chunks: Toeplitz matmuls inside, a state across chunks.

    With chunks of ``T`` steps (``T = ops.taps.shape[-1]``), the output of chunk ``c`` is
    ``Toeplitz(taps) @ u_c + w_out @ x_c`` where ``x_c`` is the real state before the chunk,
    and ``x_{c+1} = Ā^T x_c + w_in @ u_c``. The work is three matmuls with contraction
    ``T`` or ``S`` per step and feature, done feature-major (one transpose in, one out); no
    FFT and no padding beyond the last chunk.

    Args:
      u: real input ``(B, L, H)``, any ``L ≥ 1`` (the last chunk may be partial).
      ops: :class:`ChunkOps` from :func:`diag_chunk_operators` or the DPLR equivalent.
      state: real ``(B, H, S)`` state before the sequence (zero when None).
      return_state: also return the state after the last position.

    Returns:
      ``y (B, L, C, H)``; with ``return_state`` the pair ``(y, state (B, H, S))``.
    """
    _check_ops(u, ops)
    Bsz, L, H = u.shape
    C, _, T = ops.taps.shape
    ut, x0 = _to_hmajor(u, T, ops.w_in.dtype, state, ops.w_in.shape[1])
    x_prev, x_last = _chunk_states(ut, ops, x0)
    y = _chunk_outputs(ut, x_prev, ops)
    nc = x_prev.shape[0]
    y = jnp.transpose(y, (1, 2, 4, 3, 0)).reshape(Bsz, nc * T, C, H)[:, :L]
    if not return_state:
        return y
    return y, jnp.transpose(_final_state(ut, L, ops, x_prev, x_last), (1, 0, 2))


def chunked_state_forward(u, ops: ChunkOps, state=None):
    """State after the sequence, ``Ā^L x_0 + Σ_ℓ Ā^{L−1−ℓ} B̄ u_ℓ``, by the chunked recurrence.

    Args:
      u: real ``(B, L, H)``.
      ops: :class:`ChunkOps`.
      state: real ``(B, H, S)`` before the sequence (zero when None).

    Returns:
      Real ``(B, H, S)``.
    """
    _check_ops(u, ops)
    ut, x0 = _to_hmajor(u, ops.taps.shape[-1], ops.w_in.dtype, state, ops.w_in.shape[1])
    x_prev, x_last = _chunk_states(ut, ops, x0)
    return jnp.transpose(_final_state(ut, u.shape[1], ops, x_prev, x_last), (1, 0, 2))


def chunked_state_output(ops: ChunkOps, state, L: int):
    """Output contribution ``C Ā^{ℓ+1} x_0`` (ℓ < L) of a real state ``(B, H, S)``.

    Returns:
      Real ``(B, L, C, H)``.
    """
    check_positive_int("L", L)
    check_ndim("state", state, 3, "(B, H, S)")
    C, H, T = ops.taps.shape
    Bsz = state.shape[0]
    nc = -(-L // T)
    x0 = jnp.transpose(state.astype(ops.w_in.dtype), (1, 0, 2))
    x_prev, _ = _pass_states(ops, T, x0, length=nc)
    y = jnp.einsum("khbs,chst->bktch", x_prev, ops.w_out)
    return y.reshape(Bsz, nc * T, C, H)[:, :L]


def chunked_ssm_conv_bidirectional(u, ops_fwd: ChunkOps, ops_bwd: ChunkOps):
    """Bidirectional chunked convolution: a causal pass plus a strictly anti-causal pass.

    ``y_t = Σ_{s≤t} k_fwd[t−s] u_s + Σ_{s>t} k_bwd[s−t−1] u_s``: the backward direction is a
    causal pass over the reversed sequence with ``ops_bwd`` built with ``strict=True``. Both
    directions run as one batch of ``2H`` feature-major rows.

    Args:
      u: real ``(B, L, H)``.
      ops_fwd, ops_bwd: :class:`ChunkOps` with the same chunk length and state size, both
        diagonal or both dense.

    Returns:
      ``(B, L, C, H)``.
    """
    _check_ops(u, ops_fwd)
    _check_ops(u, ops_bwd)
    if ops_fwd.taps.shape != ops_bwd.taps.shape or ops_fwd.w_in.shape != ops_bwd.w_in.shape:
        raise ValueError("ops_fwd and ops_bwd must have the same shapes")
    Bsz, L, H = u.shape
    C, _, T = ops_fwd.taps.shape
    S = ops_fwd.w_in.shape[1]
    dtype = ops_fwd.w_in.dtype
    nc = -(-L // T)
    if (ops_fwd.dA is None) != (ops_bwd.dA is None):
        raise ValueError("ops_fwd and ops_bwd must both be diagonal or both dense")
    both = _stack_ops(ops_fwd, ops_bwd)
    ut = jnp.transpose(u.astype(dtype), (2, 0, 1))
    ut = jnp.pad(jnp.concatenate([ut, ut[..., ::-1]], axis=0), ((0, 0), (0, 0), (0, nc * T - L)))
    x_prev, _ = _chunk_states(ut, both, jnp.zeros((2 * H, Bsz, S), dtype))
    y = jnp.swapaxes(_chunk_outputs(ut, x_prev, both), 3, 4)
    y = y.reshape(2 * H, Bsz, nc * T, C)[:, :, :L]
    y = y[:H] + y[H:, :, ::-1]
    return jnp.transpose(y, (1, 2, 3, 0))


def _stack_ops(ops_fwd: ChunkOps, ops_bwd: ChunkOps) -> ChunkOps:
    """Both directions' operators stacked along the feature axis (axis 1 of taps / w_out, 0
    otherwise): one batch of ``2H`` feature-major rows."""
    return ChunkOps(
        taps=jnp.concatenate([ops_fwd.taps, ops_bwd.taps], axis=1),
        w_in=jnp.concatenate([ops_fwd.w_in, ops_bwd.w_in], axis=0),
        w_out=jnp.concatenate([ops_fwd.w_out, ops_bwd.w_out], axis=1),
        log_dA=None
        if ops_fwd.log_dA is None
        else jnp.concatenate([ops_fwd.log_dA, ops_bwd.log_dA], axis=0),
        dA=None if ops_fwd.dA is None else jnp.concatenate([ops_fwd.dA, ops_bwd.dA], axis=0),
    )


def _packed_chunks(ut, ops: ChunkOps, x0, st):
    """Chunked recurrence with state resets: ``ut (H, B, Lp)`` feature-major input, ``x0
    (H, B, S)``, ``st (H|1, B, Lp)`` bool, True where a segment starts. Returns the outputs
    ``(H, B, nc, C, T)`` of :func:`_chunk_outputs`' layout.

    Inside a chunk the Toeplitz block only pairs positions of the same segment; the state
    entering a chunk reaches only the positions before the chunk's first start; the state
    leaving it is the chunk's last segment's alone when the chunk holds a start (the
    incoming state is dropped, ``Ā^T x`` replaced by zero).
    """
    H, Bsz, Lp = ut.shape
    C, _, T = ops.taps.shape
    nc = Lp // T
    lab = jnp.cumsum(st.reshape(st.shape[0], Bsz, nc, T), axis=-1)  # segment within chunk
    head = lab == 0  # before the chunk's first start: reads the incoming state
    tail = lab == lab[..., -1:]  # the chunk's last segment: feeds the outgoing state
    reset = lab[..., -1] > 0  # (H|1, B, nc): the chunk holds a start
    uc = ut.reshape(H, Bsz, nc, T)
    s = jnp.einsum("hbkt,hst->hbks", jnp.where(tail, uc, 0), ops.w_in)
    x_prev, _ = _pass_states(ops, T, x0, jnp.moveaxis(s, 2, 0), jnp.moveaxis(reset, 2, 0))
    lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    Tm = jnp.where(lag >= 0, jnp.take(ops.taps, jnp.clip(lag, 0, T - 1), axis=-1), 0)
    y = _same_segment_toeplitz(uc, Tm, lab)
    y_state = jnp.einsum("khbs,chst->hbkct", x_prev, ops.w_out)
    return y + jnp.where(head[:, :, :, None, :], y_state, 0)


#: Segment pieces per chunk that :func:`_same_segment_toeplitz` handles with as few
#: shared-matrix passes as needed; a chunk with more (documents much shorter than the chunk)
#: switches the call to one pass per chunk position.
PACKED_PASSES = 8


def _same_segment_toeplitz(uc, Tm, lab):
    """In-chunk Toeplitz products restricted to same-segment pairs.

    ``uc (H, B, nc, T)``, ``Tm (C, H, T, T)`` (lower triangular), ``lab (H|1, B, nc, T)`` the
    segment piece of each position within its chunk (0, 1, … nondecreasing). Returns ``(H,
    B, nc, C, T)`` with ``y[t] = Σ_s Tm[t, s]·[lab_t = lab_s]·u_s``.

    Masking ``Tm`` per chunk makes every chunk's matrix its own: a batched matrix-vector
    product over a ``(H, B, nc, T, T)`` tensor, memory-bound (27× slower than the unpacked
    chunked form at B = 4, L = 1024, H = 64, T = 64 on CPU, forward and backward). Instead
    piece ``j`` runs ``Tm`` (shared by the batch and the chunks: one matmul per feature) on
    the inputs of piece ``j`` and keeps the outputs of piece ``j``; ``lab`` is nondecreasing,
    so the pieces partition the pairs exactly. ``lax.switch`` runs 1, 2, 4, … up to
    :data:`PACKED_PASSES` passes, as few as the most fragmented chunk needs. When some chunk
    holds more pieces (documents much shorter than the chunk), the CPU rule
    (:func:`ssmix.auto_backend`) masks the full ``(H, B, nc, T, T)`` product (0.06 s against
    0.022 s for typical packing at B = 4, L = 1024, H = 64, T = 64, forward and backward)
    while it fits in 256 MiB; beyond that, and under the GPU / TPU rules, ``T`` passes run
    instead (one per possible piece): the masked product would take 2 GiB at B = 2,
    L = 16384, H = 128 bidirectional in float32, and as a branch of the switch its buffers
    count toward the peak memory whichever branch runs.
    """
    T = uc.shape[3]
    lab = lab - lab[..., :1]  # each chunk's first piece is 0, so pieces ≤ T

    def by_pieces(n):
        def run(uc, Tm):
            y = jnp.zeros(uc.shape[:3] + (Tm.shape[0], T), uc.dtype)
            for j in range(n):
                m = lab == j
                piece = jnp.einsum("hbks,chts->hbkct", jnp.where(m, uc, 0), Tm)
                y = jnp.where(m[:, :, :, None], piece, y)
            return y

        return run

    def masked(uc, Tm):
        same = lab[..., :, None] == lab[..., None, :]  # (H|1, B, nc, T, T)
        return jnp.einsum("hbkts,chts->hbkct", jnp.where(same, uc[..., None, :], 0), Tm)

    # As few passes as the most fragmented chunk needs: 1, 2, 4, … PACKED_PASSES, else the
    # fallback.
    counts = [1 << i for i in range(PACKED_PASSES.bit_length()) if 1 << i <= min(PACKED_PASSES, T)]
    small = tile_fits(uc.size * T * Tm.shape[0] * uc.dtype.itemsize)
    fallback = masked if resolve_backend(None) == "cpu" and small else by_pieces(T)
    pieces = jnp.max(lab) + 1
    branch = jnp.sum(pieces > jnp.asarray(counts))  # len(counts): the fallback
    # Each branch rematerialised: lax.switch's backward keeps the union of every branch's
    # residuals, zero-filled for the branches not taken (the masked branch's made a packed
    # S4D layer's backward pass 2.5× slower: 0.048 s against 0.019 s).
    branches = [jax.checkpoint(f) for f in [by_pieces(n) for n in counts] + [fallback]]
    return jax.lax.switch(branch, branches, uc, Tm)


def chunked_ssm_conv_packed(u, ops: ChunkOps, starts, state=None, *, ops_bwd=None, starts_bwd=None):
    """Chunked SSM convolution of packed sequences: the state is reset where a segment starts.

    Equal to running each segment alone through :func:`chunked_ssm_conv` (or
    :func:`chunked_ssm_conv_bidirectional`) and concatenating: inside a chunk the Toeplitz
    block is masked to same-segment pairs, and the state passed between chunks is reset
    where a segment starts. ``state`` enters only the first segment.

    Args:
      u: real ``(B, L, H)``.
      ops: :class:`ChunkOps` of the causal direction.
      starts: bool ``(B, L)``, True where a segment starts in the causal direction
        (:func:`ssmix.kernels.scan._common.segment_starts`).
      state: real ``(B, H, S)`` before the sequence (zero when None; causal only).
      ops_bwd: :class:`ChunkOps` of the strictly anti-causal direction (``strict=True``),
        for a bidirectional convolution; None: causal.
      starts_bwd: with ``ops_bwd``: bool ``(B, L)`` in the original time order, True where
        the backward recurrence starts a segment (``segment_starts(ids, reverse=True)``).

    Returns:
      ``(B, L, C, H)``.
    """
    _check_ops(u, ops)
    Bsz, L, H = u.shape
    C, _, T = ops.taps.shape
    S = ops.w_in.shape[1]
    dtype = ops.w_in.dtype
    nc = -(-L // T)
    for name, st in (("starts", starts), ("starts_bwd", starts_bwd)):
        if st is not None and tuple(st.shape) != (Bsz, L):
            raise ValueError(f"{name} must have shape (B, L) = {(Bsz, L)}; got {st.shape}")

    def pad(a):
        return jnp.pad(a, ((0, 0), (0, 0), (0, nc * T - L)))

    st = jnp.asarray(starts, bool)[None]
    if ops_bwd is None:
        ut, x0 = _to_hmajor(u, T, dtype, state, S)
        y = _packed_chunks(ut, ops, x0, pad(st))
        return jnp.transpose(y, (1, 2, 4, 3, 0)).reshape(Bsz, nc * T, C, H)[:, :L]
    if state is not None:
        raise ValueError("a bidirectional convolution takes no state")
    if starts_bwd is None:
        raise ValueError("ops_bwd needs starts_bwd")
    _check_ops(u, ops_bwd)
    if ops.taps.shape != ops_bwd.taps.shape or ops.w_in.shape != ops_bwd.w_in.shape:
        raise ValueError("ops and ops_bwd must have the same shapes")
    if (ops.dA is None) != (ops_bwd.dA is None):
        raise ValueError("ops and ops_bwd must both be diagonal or both dense")
    ut = jnp.transpose(u.astype(dtype), (2, 0, 1))
    ut = pad(jnp.concatenate([ut, ut[..., ::-1]], axis=0))
    sb = jnp.asarray(starts_bwd, bool)[None, :, ::-1]
    st2 = pad(
        jnp.concatenate([jnp.broadcast_to(st, (H, Bsz, L)), jnp.broadcast_to(sb, (H, Bsz, L))])
    )
    y = _packed_chunks(ut, _stack_ops(ops, ops_bwd), jnp.zeros((2 * H, Bsz, S), dtype), st2)
    y = jnp.swapaxes(y, 3, 4).reshape(2 * H, Bsz, nc * T, C)[:, :, :L]
    y = y[:H] + y[H:, :, ::-1]
    return jnp.transpose(y, (1, 2, 3, 0))


def chunked_ssm_conv_naive(u, ops: ChunkOps, state=None):
    """Reference for :func:`chunked_ssm_conv`: a Python loop over time with the dense state.

    Reconstructs ``Ā``, ``B̄`` and ``C`` in real coordinates from the operators (``B̄`` is
    ``w_in``'s last column, ``C`` the first column of ``w_out`` times ``Ā⁻¹`` is avoided by
    using the output map ``y_t = taps_0 u_t + w_out[:, :, :, 0]·x_{t−1}``).

    Returns:
      ``(y (B, L, C, H), state (B, H, S))``.
    """
    Bsz, L, H = u.shape
    S = ops.w_in.shape[1]
    if ops.dA is not None:
        dA = ops.dA
    else:
        half = S // 2
        g = jnp.exp(ops.log_dA)
        dA = jnp.zeros((H, S, S), ops.w_in.dtype)
        idx = jnp.arange(half)
        dA = dA.at[:, idx, idx].set(g.real).at[:, idx, idx + half].set(-g.imag)
        dA = dA.at[:, idx + half, idx].set(g.imag).at[:, idx + half, idx + half].set(g.real)
    dB = ops.w_in[..., -1]  # (H, S)
    c_out = ops.w_out[..., 0]  # (C, H, S): output from the state one step back
    x = jnp.zeros((Bsz, H, S), dA.dtype) if state is None else state
    ys = []
    for ell in range(L):
        y = jnp.einsum("chs,bhs->bch", c_out, x) + ops.taps[..., 0] * u[:, ell, None, :]
        ys.append(y)
        x = jnp.einsum("hij,bhj->bhi", dA, x) + dB * u[:, ell, :, None]
    return jnp.stack(ys, axis=1), x
