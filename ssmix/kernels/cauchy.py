"""DPLR state-space kernels (S4): Cauchy sums with a Woodbury correction, blocked powers, steps.

The S4 system per feature is ``A = diag(Λ) − Σ_r P_r P_r*`` in the HiPPO eigenbasis, over the
full state: the ``N/2`` stored half modes plus their conjugates (``Λ_full = [Λ, Λ̄]``,
``P_full = [P, P̄]``, ``B_full = [B, B̄]``, ``C_full = [C, C̄]``), discretised by the bilinear
rule (S4 and S4D, Gu et al. 2022). Its kernel ``K_ℓ = C_full Ā^ℓ B̄_full`` is real.

Shapes: ``Lambda, B (H, N/2)`` complex; ``P (rank, H, N/2)`` complex (rank 1 may be passed as
``(H, N/2)``); ``C (H, N/2)`` or ``(C, H, N/2)`` complex, the true output matrix; ``dt (H,)``.

- :func:`dplr_ssm_kernel`: the kernel from its generating function at the roots of unity
  ``ω_k = exp(−2πik/L)``. With ``C̃ = C(I − Ā^L)`` the length-``L`` truncation is exact:
  ``Σ_{ℓ<L} K_ℓ ω^ℓ = C̃ (I − ωĀ)⁻¹ B̄ = 2·C̃ [(2/Δ)(1 − ω) I − (1 + ω) A]⁻¹ B``. Written this
  way (the textbook form multiplied through by ``1 + ω``) it has no pole at ``ω = −1``; the
  diagonal part gives Cauchy sums ``Σ_n a_n b_n / ((2/Δ)(1 − ω) − (1 + ω) Λ_n)`` and the
  rank-``r`` term a Woodbury correction. ``C̃`` is formed internally from the true ``C``, so
  any length works: ``C Ā^L`` comes from the real dense ``Ā`` by repeated squaring. The
  ``ω = 1`` term (the kernel's sum ``C Σ_{ℓ<L} Ā^ℓ B̄``) comes from the same powering,
  because a mode with ``Λ_n ≈ 0`` (FouT) puts a near-pole of the Cauchy sums exactly there.
- :func:`dplr_power_kernel`: the same kernel in the time domain, ``K_{iT+j} = (C Ā^{iT})·
  (Ā^j B̄)``, with ``Ā = G − XYᵀ`` (a complex diagonal minus a rank-``r`` real term, closed
  form) kept in that form while doubling, so the powers up to ``Ā^T`` cost ``O(N²·k·r)``
  instead of dense ``O(N³)`` squarings. Exact at any length, no ``C̃`` and no frequency grid;
  the S4 layer's default (3–7× faster than the Cauchy sums on CPU, forward and backward).
  The rows ``C Ā^{iT}`` come by a scan of mat-vecs (CPU rules) or by doubling, with no loop
  (GPU / TPU rules: :func:`ssmix.auto_backend`).
- Step forms, all the same system: the O(N) linear step of the S4 code
  (:func:`dplr_step_setup` / :func:`dplr_step`, ``Ā = A₁A₀``, ``B̄ = 2A₁B``), the dense real
  form :func:`dplr_dense` (state ``[Re x, Im x]``, in closed form; the chunked convolution
  uses :func:`dplr_chunk_operators`), and the diagonal form :func:`dplr_diagonalize` (eigen-
  decomposition of ``Ā``; ill-conditioned for HiPPO matrices, provided for exploration).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.vandermonde import ChunkOps

__all__ = [
    "POWER_METHODS",
    "DPLRStep",
    "cauchy_block",
    "dplr_chunk_operators",
    "dplr_dense",
    "dplr_diagonalize",
    "dplr_power_kernel",
    "dplr_ssm_kernel",
    "dplr_ssm_kernel_naive",
    "dplr_step",
    "dplr_step_setup",
    "power_block",
]

#: How :func:`dplr_power_kernel` forms its rows ``C Ā^{iT}`` (``method=``).
POWER_METHODS = ("auto", "scan", "doubling")

# Frequencies per block of the Cauchy sums under the CPU rules: bounds their memory to
# O(H·N·block).
_FREQ_BLOCK = 256

# Under the accelerator rules a block of the Cauchy sums holds a complex (H, block, N) matrix
# of at most this many bytes: few large blocks (at H = N = 64, L = 16384: 5), each bounded so
# that the backward's same-sized temporaries stay well under a few hundred MiB.
_ACCEL_CAUCHY_BYTES = 64 * 2**20


def _prepare(Lambda, P, B, dt, C=None):
    """Validate shapes and promote dtypes; return complex arrays and ``P (rank, H, N/2)``."""
    check_ndim("Lambda", Lambda, 2, "(H, N/2)")
    check_ndim("P", P, (2, 3), "(H, N/2) or (rank, H, N/2)")
    check_ndim("dt", dt, 1, "(H,)")
    H, N2 = Lambda.shape
    if P.ndim == 2:
        P = P[None]
    if P.shape[1:] != (H, N2):
        raise ValueError(f"P must have shape (rank, {H}, {N2}); got {P.shape}")
    if B.shape != (H, N2):
        raise ValueError(f"B must have shape {(H, N2)}; got {B.shape}")
    if dt.shape != (H,):
        raise ValueError(f"dt must have shape ({H},); got {dt.shape}")
    arrays = [Lambda, P, B, dt] + ([] if C is None else [C])
    cdtype = jnp.promote_types(jnp.result_type(*arrays), jnp.complex64)
    out = [Lambda.astype(cdtype), P.astype(cdtype), B.astype(cdtype)]
    out.append(dt.astype(jnp.finfo(cdtype).dtype))
    if C is not None:
        check_ndim("C", C, (2, 3), "(H, N/2) or (C, H, N/2)")
        if C.shape[-2:] != (H, N2):
            raise ValueError(f"C must have shape (..., {H}, {N2}); got {C.shape}")
        out.append((C if C.ndim == 3 else C[None]).astype(cdtype))
    return out


# --------------------------------------------------------------------------------------------
# Step forms
# --------------------------------------------------------------------------------------------


class DPLRStep(NamedTuple):
    """Parameters of the O(N) bilinear step ``x ← A₁(A₀ x + 2 B u)`` on half states.

    ``A₀ = (2/Δ)I + A`` and ``A₁ = (2/Δ·I − A)⁻¹ = D − D P S⁻¹ P* D`` with
    ``D = diag(1/(2/Δ − Λ))`` and the real ``S = I + P* D P`` (sums over both halves).

    Attributes:
      E: complex ``(H, N/2)``, ``2/Δ + Λ``.
      D: complex ``(H, N/2)``, ``1/(2/Δ − Λ)``.
      P: complex ``(rank, H, N/2)``.
      S_inv: real ``(H, rank, rank)``.
      B: complex ``(H, N/2)``.
    """

    E: jax.Array
    D: jax.Array
    P: jax.Array
    S_inv: jax.Array
    B: jax.Array


def _full_inner(a, x):
    """``a_full* x_full`` for conjugate-symmetric full vectors: ``2·Re Σ_n conj(a_n) x_n``.

    ``a (rank, H, N/2)``, ``x (..., H, N/2)`` → real ``(..., rank, H)``.
    """
    return 2 * jnp.real(jnp.einsum("rhn,...hn->...rh", jnp.conj(a), x))


def dplr_step_setup(Lambda, P, B, dt) -> DPLRStep:
    """Precompute the O(N) bilinear step of the DPLR system (see :class:`DPLRStep`).

    Args:
      Lambda, B: complex ``(H, N/2)``; P: complex ``(rank, H, N/2)`` or ``(H, N/2)``;
      dt: real ``(H,)``.

    Returns:
      :class:`DPLRStep`.
    """
    Lambda, P, B, dt = _prepare(Lambda, P, B, dt)
    two_dt = (2 / dt)[:, None]
    D = 1 / (two_dt - Lambda)
    rank = P.shape[0]
    S = jnp.eye(rank, dtype=dt.dtype) + 2 * jnp.real(
        jnp.einsum("rhn,hn,shn->hrs", jnp.conj(P), D, P)
    )
    return DPLRStep(two_dt + Lambda, D, P, _small_inverse(S), B)


def _small_inverse(S):
    """Inverse of small ``(…, r, r)`` matrices by unrolled Gauss–Jordan elimination.

    ``S = I + P* D P`` has a positive-definite symmetric part (``Re D > 0`` for a stable
    ``Λ``), so elimination without pivoting is stable. Written out instead of calling
    ``jnp.linalg.inv``: a batched LAPACK call inside a jitted layer can deadlock XLA:CPU's
    intra-op thread pool (jaxlib 0.10; see README, Known issues).
    """
    r = S.shape[-1]
    if r == 1:
        return 1 / S
    A = S
    inv = jnp.broadcast_to(jnp.eye(r, dtype=S.dtype), S.shape)
    for i in range(r):
        pivot = A[..., i : i + 1, i : i + 1]
        row_a, row_i = A[..., i : i + 1, :] / pivot, inv[..., i : i + 1, :] / pivot
        factor = A[..., :, i : i + 1]
        not_i = (jnp.arange(r) != i)[:, None]
        A = jnp.where(not_i, A - factor * row_a, row_a)
        inv = jnp.where(not_i, inv - factor * row_i, row_i)
    return inv


def _apply_A1(params: DPLRStep, w):
    """``A₁ w = D (w − P S⁻¹ P* D w)`` on half states ``w (..., H, N/2)``."""
    Dw = params.D * w
    z = jnp.einsum("hrs,...sh->...rh", params.S_inv, _full_inner(params.P, Dw))
    return params.D * (w - jnp.einsum("rhn,...rh->...hn", params.P, z))


def dplr_step(params: DPLRStep, state, u=None):
    """One bilinear step ``x_t = Ā x_{t−1} + B̄ u_t`` in O(N) per feature (half states).

    Args:
      params: from :func:`dplr_step_setup`.
      state: complex ``(..., H, N/2)`` (the half of a conjugate-symmetric full state).
      u: real ``(..., H)`` input, or None for no input (``x ← Ā x``).

    Returns:
      The new state, complex ``(..., H, N/2)``. The output is ``2·Re Σ_n C_n x_n``.
    """
    w = params.E * state - jnp.einsum("rhn,...rh->...hn", params.P, _full_inner(params.P, state))
    if u is not None:
        w = w + 2 * params.B * u[..., None]
    return _apply_A1(params, w)


def dplr_dense(Lambda, P, B, C, dt):
    """The DPLR system as a real dense system on the state ``[Re x, Im x]`` (``S = N``).

    Formed in closed form from :func:`_lowrank_transition`, ``Ā = G − X Yᵀ`` (``O(N²)`` per
    feature, no matmul); the tests check it against the O(N) step applied to every basis state.

    Args:
      Lambda, B: complex ``(H, N/2)``; P: ``(rank, H, N/2)`` or ``(H, N/2)``;
      C: complex ``(H, N/2)`` or ``(C, H, N/2)``; dt: real ``(H,)``.

    Returns:
      ``(dA (H, N, N), dB (H, N), C_r (C, H, N))``, real, with
      ``ξ_t = dA ξ_{t−1} + dB u_t`` and ``y_t = C_r ξ_t`` (``C_r = [2 Re C, −2 Im C]``).
    """
    Lambda, P, B, dt, C = _prepare(Lambda, P, B, dt, C)
    g, X, Y, dB = _lowrank_transition(Lambda, P, B, dt)
    return _dense(g, X, Y), dB, _real_output(C)


class _LowRankPower(NamedTuple):
    """``Ā^k = G_k − Σ_j X_j Y_jᵀ`` on real states ``[Re x, Im x]``.

    ``g`` complex ``(H, N/2)``: ``G_k`` multiplies each half mode by ``g`` (a 2×2 rotation-
    scaling per mode in real coordinates); ``X``, ``Y`` real ``(k·rank, H, N)``.
    """

    g: jax.Array
    X: jax.Array
    Y: jax.Array


def _lowrank_transition(Lambda, P, B, dt):
    """``(g, X, Y, dB)``: the bilinear ``Ā`` as a diagonal plus rank-``r`` real operator.

    With ``A₀ = (2/Δ)I + A`` and ``A₁ = (2/Δ·I − A)⁻¹`` (:class:`DPLRStep`),
    ``Ā = A₁A₀ = G − D P S⁻¹ P*(I + G)`` where ``G = diag(D E)``: expanding
    ``A₁A₀ x = D E x − D P [P*x + S⁻¹(P* D E x − (S − I) P*x)]`` the bracket collapses to
    ``S⁻¹ P*(I + G) x``. ``P*`` is the full-state inner product ``2·Re Σ conj(P)·``, so in real
    coordinates ``X = [Re DP, Im DP] S⁻¹`` and ``Y = [2 Re Q, −2 Im Q]`` with
    ``Q = conj(P)(1 + G)``. ``dB = [Re B̄, Im B̄]``.
    """
    params = dplr_step_setup(Lambda, P, B, dt)
    g = params.D * params.E
    U = _to_real(params.D[None] * params.P)  # (r, H, S)
    X = jnp.einsum("rhs,hrq->qhs", U, params.S_inv)
    Q = jnp.conj(params.P) * (1 + g)[None]
    Y = 2 * _to_real(jnp.conj(Q))
    dB = _to_real(_apply_A1(params, 2 * params.B))
    return g, X, Y, dB


def _to_real(x):
    """Complex half vectors ``(..., N/2)`` → real coordinates ``(..., N)`` = ``[Re x, Im x]``."""
    return jnp.concatenate([x.real, x.imag], axis=-1)


def _diag_apply(g, x):
    """``G x`` for real-coordinate column vectors ``x (..., H, S)`` (``G`` = complex ``g``)."""
    n = g.shape[-1]
    xr, xi = x[..., :n], x[..., n:]
    return jnp.concatenate([g.real * xr - g.imag * xi, g.imag * xr + g.real * xi], axis=-1)


def _diag_apply_rows(g, y):
    """``y G`` for real-coordinate row vectors ``y (..., H, S)``."""
    n = g.shape[-1]
    a, b = y[..., :n], y[..., n:]
    return jnp.concatenate([a * g.real + b * g.imag, b * g.real - a * g.imag], axis=-1)


def _dense(g, X, Y):
    """The real ``(H, S, S)`` matrix ``G − Σ_j X_j Y_jᵀ``."""
    n = g.shape[-1]
    eye = jnp.eye(n, dtype=X.dtype)
    gr, gi = g.real[..., None] * eye, g.imag[..., None] * eye  # (H, n, n)
    G = jnp.concatenate(
        [jnp.concatenate([gr, -gi], axis=-1), jnp.concatenate([gi, gr], axis=-1)], axis=-2
    )
    return G - jnp.einsum("jhs,jht->hst", X, Y)


def _lowrank_apply(power: _LowRankPower, cols):
    """``Ā^k cols`` for real-coordinate column vectors ``cols (..., H, S)``."""
    coef = jnp.einsum("jhs,...hs->...jh", power.Y, cols)
    return _diag_apply(power.g, cols) - jnp.einsum("jhs,...jh->...hs", power.X, coef)


def _lowrank_square(power: _LowRankPower) -> _LowRankPower:
    """``Ā^{2k}`` from ``Ā^k = G − XYᵀ``: ``G² − [GX, X][Yᵀ; YᵀG − (YᵀX)Yᵀ]`` (rank doubles)."""
    YX = jnp.einsum("jhs,mhs->hjm", power.Y, power.X)
    X = jnp.concatenate([_diag_apply(power.g, power.X), power.X], axis=0)
    Y2 = _diag_apply_rows(power.g, power.Y) - jnp.einsum("hjm,mhs->jhs", YX, power.Y)
    return _LowRankPower(power.g * power.g, X, jnp.concatenate([power.Y, Y2], axis=0))


def _doubling(power: _LowRankPower, T: int, cols, *, final: bool = False):
    """Powers by doubling: ``cols (1, H, S) → [Ā^j c]_{j<T} (T, H, S)``.

    ``Ā^k`` stays in the low-rank form while its rank ``k·r`` is at most ``S/4`` (``O(S·k·r)``
    per product instead of ``O(S²)``, ``O(S·(k·r)²)`` per squaring instead of ``O(S³)``), then
    switches to dense squarings. Returns ``(cols, Ā^K)``, ``K`` the power of two ≥ ``T``, the
    latter as a dense ``(H, S, S)`` matrix when ``final`` (else None).
    """
    dense = None
    k = 1
    while k < T:
        if dense is None:
            new = _lowrank_apply(power, cols)
        else:
            new = jnp.einsum("hst,...ht->...hs", dense, cols)
        cols = jnp.concatenate([cols, new], axis=0)
        k *= 2
        if k >= T and not final:
            break
        if dense is None and 4 * power.X.shape[0] <= power.X.shape[-1]:
            power = _lowrank_square(power)
        else:
            dense = _dense(*power) if dense is None else dense
            dense = dense @ dense
    if final and dense is None:
        dense = _dense(*power)
    return cols[:T], dense


def _real_output(C):
    """Output row on ``[Re x, Im x]`` equal to ``2·Re(C x)``."""
    return 2 * _to_real(jnp.conj(C))


def dplr_diagonalize(Lambda, P, B, C, dt):
    """Diagonal form of the discrete DPLR system by an eigendecomposition of the dense ``Ā``.

    ``Ā = V diag(λ) V⁻¹`` on the real state ``[Re x, Im x]``; the diagonal system
    ``z_t = λ z_{t−1} + b u_t``, ``y_t = Re(c z_t)`` has the same kernel ``Re Σ c b λ^ℓ``.
    For HiPPO matrices ``V`` is badly conditioned (PTD, Yu et al. 2024), so this form loses
    accuracy as N grows; it runs on the host (``jnp.linalg.eig`` is CPU-only) and is not
    differentiable with respect to the eigenvectors.

    Returns:
      ``(lam (H, N), b (H, N), c (C, H, N))``, complex.
    """
    dA, dB, C_r = dplr_dense(Lambda, P, B, C, dt)
    lam, V = jnp.linalg.eig(dA)
    b = jnp.linalg.solve(V, dB.astype(V.dtype)[..., None])[..., 0]
    c = jnp.einsum("chs,hsn->chn", C_r.astype(V.dtype), V)
    return lam, b, c


def dplr_chunk_operators(Lambda, P, B, C, dt, T: int, *, strict: bool = False) -> ChunkOps:
    """:class:`~ssmix.kernels.vandermonde.ChunkOps` of the DPLR system (dense, ``S = N``).

    Powers ``Ā^j B̄`` and ``C Ā^j`` for ``j < T`` come from the dense real form by doubling
    (``log₂ T`` batched ``N × N`` matmuls).

    Args:
      Lambda, P, B, C, dt: as :func:`dplr_ssm_kernel`.
      T: chunk length.
      strict: strictly causal system ``y_t = C x_{t−1}`` (backward direction of a
        bidirectional layer).
    """
    check_positive_int("T", T)
    dA, dB, C_r = dplr_dense(Lambda, P, B, C, dt)
    cols = dB[..., None]  # (H, S, j): Ā^j B̄
    rows = C_r[..., None, :] if strict else jnp.einsum("chs,hst->cht", C_r, dA)[..., None, :]
    power = dA
    while cols.shape[-1] < T:
        cols = jnp.concatenate([cols, power @ cols], axis=-1)
        rows = jnp.concatenate([rows, rows @ power], axis=-2)
        power = power @ power
    cols, rows = cols[..., :T], rows[..., :T, :]
    taps = jnp.einsum("chs,hsj->chj", C_r, cols)
    if strict:
        taps = jnp.pad(taps[..., : T - 1], ((0, 0), (0, 0), (1, 0)))
    return ChunkOps(taps, cols[..., ::-1], jnp.swapaxes(rows, -1, -2), None, dA)


# --------------------------------------------------------------------------------------------
# Kernel by powers (time domain)
# --------------------------------------------------------------------------------------------


def power_block(L: int, backend: str | None = None) -> int:
    """Block ``T`` of :func:`dplr_power_kernel` for length ``L`` under ``backend``'s rules.

    ``backend`` is ``"cpu"``, ``"gpu"``, ``"tpu"`` or None for :func:`ssmix.auto_backend`.

    - ``"cpu"`` (measured): ``2^⌈log₂L/2 − 1⌉`` up to L = 2048 (16 at 1024), 64 up to 8192,
      128 beyond. The doubling's cost grows with T (the low-rank factor has ``T·r``
      columns), the row scan's with ``L/T`` sequential steps. Swept on CPU (H = 128, N = 64,
      kernel forward + backward, T = 8…256): fastest T = 16 at L = 1024 (17.5 ms; 23 at 32),
      64 at 4096 (34.6 ms; 44 at 32, 59 at 128), 128 at 16384 (81 ms; 94 at 64, 104 at 256).
    - ``"gpu"`` / ``"tpu"`` (not measured on a device): ``2^⌈log₂L/2⌉``, so that ``T`` and
      the ``L/T`` rows are both about ``√L``. There the rows come by doubling
      (``method="doubling"``), so neither side is a loop: this balances the two doubling
      depths (``log₂T`` and ``log₂(L/T)``) and keeps both factors at ``O(H·N·√L)`` memory.
    """
    check_positive_int("L", L)
    if resolve_backend(backend) != "cpu":
        return 1 << math.ceil(math.log2(L) / 2)
    if L > 8192:
        return 128
    if L > 2048:
        return 64
    return 1 << max(0, math.ceil(math.log2(L) / 2 - 1))


def _rows_by_scan(C_r, power, q: int):
    """``[C Ā^{iT}]_{i<q}`` ``(q, C, H, S)`` from ``C_r (C, H, S)`` and ``power = Ā^T``:
    a ``lax.scan`` of ``q`` dense matrix-vector products."""

    def advance(v, _):
        return jnp.einsum("chs,hst->cht", v, power), v

    return jax.lax.scan(advance, C_r, None, length=q)[1]


def _rows_by_doubling(C_r, power, q: int):
    """The same rows as :func:`_rows_by_scan` in ``⌈log₂q⌉`` unrolled steps, no loop.

    Step ``k`` multiplies the ``m = 2^k`` rows found so far by ``Ā^{mT}`` (one batched
    ``(m·C × S)·(S × S)`` matmul per feature) and appends them; ``Ā^{mT}`` comes from the
    previous one by one dense squaring. Rows past ``q`` are never formed.
    """
    rows = C_r[None]
    while rows.shape[0] < q:
        m = rows.shape[0]
        new = jnp.einsum("ichs,hst->icht", rows[: q - m], power)
        rows = jnp.concatenate([rows, new], axis=0)
        if rows.shape[0] < q:
            power = power @ power
    return rows


def dplr_power_kernel(
    Lambda, P, B, C, dt, L: int, *, block: int | None = None, method: str = "auto"
):
    """The same kernel as :func:`dplr_ssm_kernel`, ``K_ℓ = C Ā^ℓ B̄``, in the time domain.

    With a block ``T`` (a power of two) and ``ℓ = iT + j``: ``K_ℓ = (C Ā^{iT})·(Ā^j B̄)``.
    The ``T`` columns ``Ā^j B̄`` come by doubling with ``Ā^k`` kept in the diagonal-plus-low-
    rank form ``G − XYᵀ`` (:func:`_doubling`), which also yields ``Ā^T``; the ``⌈L/T⌉`` rows
    ``C Ā^{iT}`` come by ``method``; the kernel is one batched ``(L/T × N)·(N × T)`` product
    per feature. No frequency grid, no ``C̃`` and no near-pole at ``ω = 1`` (exact for
    FouT's zero eigenvalue), any ``L``; memory ``O(H·(N·(T + L/T) + L))``. On CPU it is
    3–7× faster than the Cauchy sums (forward and backward; ``benchmarks/s4.py``), and in
    float32 as accurate (tests/test_cauchy.py).

    Methods (:data:`POWER_METHODS`), the same function to rounding:

    - ``"scan"``: a ``lax.scan`` of ``⌈L/T⌉`` dense ``N × N`` matrix-vector products (the
      fastest on CPU, where a loop step is cheap).
    - ``"doubling"``: ``⌈log₂(L/T)⌉`` unrolled batched matmuls that double the rows found so
      far, with ``Ā^{2^k T}`` by squaring (:func:`_rows_by_doubling`): no loop at all, the
      form for accelerators, where every loop step is a round of kernel launches. In
      float32 as accurate as the scan (checked once at N = 64, L = 4096 against float64:
      relative errors 3e-6 LegS, 4e-6 LegT, 5e-5 LagT, 2e-5 FouT for both forms).
    - ``"auto"``: ``"scan"`` under the CPU rules, ``"doubling"`` under the GPU / TPU rules
      (:func:`ssmix.auto_backend`, decided when traced).

    Args:
      Lambda, P, B, C, dt: as :func:`dplr_ssm_kernel` (``C`` the true output matrix).
      L: kernel length, any positive integer.
      block: ``T``, a power of two (default :func:`power_block` under the same rules).
      method: one of :data:`POWER_METHODS`, how the rows ``C Ā^{iT}`` are formed.

    Returns:
      Real ``(H, L)``, or ``(C, H, L)`` when ``C`` has channels.
    """
    check_positive_int("L", L)
    check_choice("method", method, POWER_METHODS)
    if method == "auto":
        method = "scan" if resolve_backend(None) == "cpu" else "doubling"
    if block is None:
        block = power_block(L)
    check_positive_int("block", block)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two; got {block}")
    has_channels = C.ndim == 3
    Lambda, P, B, dt, C = _prepare(Lambda, P, B, dt, C)
    T = min(block, 1 << (L - 1).bit_length())
    q = -(-L // T)
    g, X, Y, dB = _lowrank_transition(Lambda, P, B, dt)
    cols, power = _doubling(_LowRankPower(g, X, Y), T, dB[None], final=q > 1)
    C_r = _real_output(C)
    if q == 1:
        rows = C_r[None]
    elif method == "scan":
        rows = _rows_by_scan(C_r, power, q)
    else:
        rows = _rows_by_doubling(C_r, power, q)
    nch, H = C_r.shape[:2]
    K = jnp.einsum("qchs,jhs->chqj", rows, cols).reshape(nch, H, q * T)[..., :L]
    return K if has_channels else K[0]


# --------------------------------------------------------------------------------------------
# Kernel by Cauchy sums
# --------------------------------------------------------------------------------------------


def _woodbury(r_cb, r_cp, r_pb, r_pp, beta):
    """``r_CB − β r_CP (I + β r_PP)⁻¹ r_PB`` per frequency; rank-1 in closed form."""
    rank = r_pp.shape[-1]
    if rank == 1:
        z = r_pb[..., 0] / (1 + beta * r_pp[..., 0, 0])
        return r_cb - beta * r_cp[..., 0] * z
    M = jnp.eye(rank, dtype=r_pp.dtype) + beta[..., None, None] * r_pp
    if rank == 2:  # Cramer's rule: no batched LAPACK call (README, Known issues)
        det = M[..., 0, 0] * M[..., 1, 1] - M[..., 0, 1] * M[..., 1, 0]
        z0 = (M[..., 1, 1] * r_pb[..., 0] - M[..., 0, 1] * r_pb[..., 1]) / det
        z1 = (M[..., 0, 0] * r_pb[..., 1] - M[..., 1, 0] * r_pb[..., 0]) / det
        z = jnp.stack([z0, z1], axis=-1)
    else:
        z = jnp.linalg.solve(M, r_pb[..., None])[..., 0]  # (H, F, rank)
    return r_cb - beta * jnp.sum(r_cp * z, axis=-1)


def cauchy_block(L: int, H: int, N: int, itemsize: int = 8, backend: str | None = None) -> int:
    """Frequencies per block of :func:`dplr_ssm_kernel`'s Cauchy sums under ``backend``'s rules.

    ``N`` is the full state size, ``itemsize`` the bytes of one complex number, ``backend``
    ``"cpu"``, ``"gpu"``, ``"tpu"`` or None for :func:`ssmix.auto_backend`. Each block forms
    a complex ``(H, block, N)`` Cauchy matrix, and the blocks run as a loop.

    - ``"cpu"``: 256 (memory ``O(H·N·256)``; 33 loop steps each way at L = 16384).
    - ``"gpu"`` / ``"tpu"``: as few blocks as keep that matrix within 64 MiB, balanced (all
      ``L//2 + 1`` frequencies at once when they fit; 5 blocks of 1639 at H = N = 64,
      L = 16384, complex64), so the loop has a handful of large steps.
    """
    for name, value in (("L", L), ("H", H), ("N", N), ("itemsize", itemsize)):
        check_positive_int(name, value)
    if resolve_backend(backend) == "cpu":
        return _FREQ_BLOCK
    F = L // 2 + 1
    nb = -(-F // max(1, _ACCEL_CAUCHY_BYTES // (H * N * itemsize)))
    return -(-F // nb)


def dplr_ssm_kernel(Lambda, P, B, C, dt, L: int, *, freq_block: int | None = None):
    """Convolution kernel of the bilinear DPLR system, ``K_ℓ = C Ā^ℓ B̄`` for ``ℓ < L``.

    Evaluates the generating function at the ``L//2 + 1`` non-negative roots of unity with
    Cauchy sums and a Woodbury correction (module docstring), then one inverse real FFT.
    The Cauchy sums run over blocks of frequencies (a loop over blocks, each rematerialised
    in the backward pass; no loop when one block holds them all), so memory is
    ``O(H·(N·block + L))``.

    Args:
      Lambda: complex ``(H, N/2)`` diagonal part (half of each conjugate pair).
      P: complex ``(rank, H, N/2)`` or ``(H, N/2)`` low-rank term.
      B: complex ``(H, N/2)``.
      C: complex ``(H, N/2)`` or ``(C, H, N/2)``, the true output matrix (``C̃`` is internal).
      dt: real ``(H,)`` step sizes.
      L: kernel length, any positive integer.
      freq_block: frequencies per block (default :func:`cauchy_block`, by backend).

    Returns:
      Real ``(H, L)``, or ``(C, H, L)`` when ``C`` has channels.
    """
    check_positive_int("L", L)
    if freq_block is not None:
        check_positive_int("freq_block", freq_block)
    has_channels = C.ndim == 3
    Lambda, P, B, dt, C = _prepare(Lambda, P, B, dt, C)
    nch, H, N2 = C.shape
    rank = P.shape[0]
    # C̃ = C (I − Ā^L): C Ā^L from the real dense Ā, read back as a half-mode row.
    dA, dB, C_r = dplr_dense(Lambda, P, B, C, dt)
    power, total = _power_and_sum(dA, dB, L)  # Ā^L and Σ_{ℓ<L} Ā^ℓ B̄
    v = jnp.einsum("chs,hst->cht", C_r, power)
    C_t = C - (v[..., :N2] - 1j * v[..., N2:]) / 2

    # Weights of the Cauchy sums over the full state, stored as half products w (the second
    # half of each full vector is conj(w), paired with the conjugate poles).
    Pc = jnp.conj(P)
    w = jnp.concatenate(
        [
            (C_t * B[None]).reshape(nch, H, N2),  # r(C̃, B)
            (C_t[:, None] * P[None]).reshape(nch * rank, H, N2),  # r(C̃, P_j)
            Pc * B[None],  # r(P_i*, B)
            (Pc[:, None] * P[None]).reshape(rank * rank, H, N2),  # r(P_i*, P_j)
        ],
        axis=0,
    )
    w = jnp.moveaxis(w, 0, -1)  # (H, N2, m)
    weights = jnp.concatenate([w, jnp.conj(w)], axis=1)  # (H, N, m)
    poles = jnp.concatenate([Lambda, jnp.conj(Lambda)], axis=1)  # (H, N)

    F = L // 2 + 1
    if freq_block is None:
        freq_block = cauchy_block(L, H, 2 * N2, jnp.dtype(Lambda.dtype).itemsize)
    nb = -(-F // freq_block)
    Fb = min(F, freq_block)
    k = np.arange(nb * Fb)
    omega = jnp.asarray(np.exp(-2j * np.pi * k / L), Lambda.dtype).reshape(nb, Fb)
    two_dt = (2 / dt).astype(Lambda.dtype)

    @jax.checkpoint
    def block(om):
        # R[h, k, n] = 1 / ((2/Δ)(1 − ω) − (1 + ω) Λ_n): no pole at ω = −1.
        alpha = two_dt[:, None, None] * (1 - om)[None, :, None]
        R = 1 / (alpha - (1 + om)[None, :, None] * poles[:, None, :])
        return jnp.einsum("hkn,hnm->hkm", R, weights)

    sums = jax.lax.map(block, omega) if nb > 1 else block(omega[0])[None]  # (nb, H, Fb, m)
    sums = jnp.moveaxis(sums, 0, 1).reshape(H, nb * Fb, -1)[:, :F]
    beta = jnp.asarray(1 + np.exp(-2j * np.pi * np.arange(F) / L), Lambda.dtype)
    i = 0
    r_cb = jnp.moveaxis(sums[..., i : i + nch], -1, 0)  # (C, H, F)
    i += nch
    r_cp = jnp.moveaxis(sums[..., i : i + nch * rank].reshape(H, F, nch, rank), 2, 0)
    i += nch * rank
    r_pb = sums[..., i : i + rank]  # (H, F, rank)
    i += rank
    r_pp = sums[..., i:].reshape(H, F, rank, rank)
    k_hat = 2 * _woodbury(r_cb, r_cp, r_pb[None], r_pp[None], beta)
    # At ω = 1 a mode with Λ_n ≈ 0 (FouT) makes the two Woodbury terms huge and nearly
    # cancelling; Σ_ℓ K_ℓ = C̃ (I − Ā)⁻¹ B̄ = C Σ_{ℓ<L} Ā^ℓ B̄ is exact from the dense powers.
    dc = jnp.einsum("chs,hs->ch", C_r, total)
    k_hat = k_hat.at[..., 0].set(dc.astype(k_hat.dtype))
    K = jnp.fft.irfft(k_hat, n=L, axis=-1)
    return K if has_channels else K[0]


def _power_and_sum(M, b, n: int):
    """``(M^n, Σ_{ℓ<n} M^ℓ b)`` for a static ``n ≥ 1`` by binary powering (no solve).

    ``M (…, S, S)``, ``b (…, S)``. Uses ``(M^r, s_r) ∘ (M^m, s_m) = (M^r M^m, s_r + M^r s_m)``.
    """
    result = None
    base = (M, b)
    while n:
        if n & 1:
            if result is None:
                result = base
            else:
                result = (result[0] @ base[0], result[1] + _matvec(result[0], base[1]))
        n >>= 1
        if n:
            base = (base[0] @ base[0], base[1] + _matvec(base[0], base[1]))
    return result


def _matvec(M, v):
    return jnp.einsum("...st,...t->...s", M, v)


def dplr_ssm_kernel_naive(Lambda, P, B, C, dt, L: int):
    """Reference for :func:`dplr_ssm_kernel`: dense full-state bilinear ``Ā``, ``B̄``, loop.

    Builds ``A = diag(Λ_full) − Σ_r P_full,r P_full,r*`` (``N × N`` complex),
    ``Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A)``, ``B̄ = (I − Δ/2·A)⁻¹ Δ B_full`` and evaluates
    ``Re(C_full Ā^ℓ B̄)`` by repeated multiplication (a ``lax.scan`` over ℓ).
    """
    has_channels = C.ndim == 3
    Lambda, P, B, dt, C = _prepare(Lambda, P, B, dt, C)
    full = lambda x: jnp.concatenate([x, jnp.conj(x)], axis=-1)
    Pf = full(P)  # (rank, H, N)
    A = jax.vmap(jnp.diag)(full(Lambda)) - jnp.einsum("rhn,rhm->hnm", Pf, jnp.conj(Pf))
    N = A.shape[-1]
    eye = jnp.eye(N, dtype=A.dtype)
    half = (dt / 2)[:, None, None] * A
    dA = jnp.linalg.solve(eye - half, eye + half)
    dB = jnp.linalg.solve(eye - half, (dt[:, None] * full(B))[..., None])[..., 0]
    Cf = full(C)

    def tap(x, _):
        return jnp.einsum("hnm,hm->hn", dA, x), jnp.real(jnp.einsum("chn,hn->ch", Cf, x))

    _, K = jax.lax.scan(tap, dB, None, length=L)  # x runs through Ā^ℓ B̄
    K = jnp.moveaxis(K, 0, -1)
    return K if has_channels else K[0]
