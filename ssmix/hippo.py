"""HiPPO state matrices, their normal-plus-low-rank forms, diagonal SSM initialisers and PTD.

Conventions follow the S4 line of work (state-spaces/s4, lindermanlab/S5, the PTD authors'
code) so parameters move between ssmix and those projects unchanged; the formulas are collected
in the HiPPO (Gu et al. 2020), S4 / S4D (Gu et al. 2022) and PTD (Yu et al. 2024) papers.
The continuous-time system is ``x'(t) = A x(t) + B u(t)``
with state size ``N``. Conjugate-symmetric results keep ``N/2`` complex modes, one per
conjugate pair: the one with **non-positive imaginary part** (the S4 code's convention), so a
diagonal kernel is ``2·Re Σ_n C_n B̄_n Ā_n^ℓ`` over those modes.

Everything that defines an initialisation (``transition``, ``rank_correction``, ``nplr``,
``diag_init``) is computed with NumPy in float64 / complex128 and returned as NumPy arrays:
layers cast to their own dtype. ``dt_init`` returns a JAX array because it consumes a PRNG key.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import logging
from importlib import resources
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssmix._checks import check_choice, check_even, check_positive_int

logger = logging.getLogger(__name__)

MEASURES = ("legs", "legt", "lagt", "lmu", "fout", "foud", "legsd")
"""Measures understood by :func:`transition`."""

NPLR_MEASURES = ("legs", "legt", "lagt", "fout", "foud", "legsd")
"""Measures with a normal-plus-low-rank form (:func:`rank_correction`, :func:`nplr`)."""

DIAG_KINDS = ("lin", "inv", "legs", "real", "random")
"""Kinds understood by :func:`diag_init` (S4D-Lin, S4D-Inv, S4D-LegS, S4D-Real, random)."""

# Smallest rank of the correction that makes A + Σ P_r P_rᵀ normal, per measure.
_MIN_RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1, "foud": 1, "legsd": 1}

# Default clip of Im(B̃) used by the S4 code for the HiPPO B in the eigenbasis.
S4_B_CLIP = 2.0


def _fourier_b(N: int) -> np.ndarray:
    """b = [1, 0, √2, 0, √2, 0, …] truncated to N: the Fourier measures' B (and P for FouT)."""
    b = np.zeros(N)
    b[0::2] = np.sqrt(2.0)
    b[0] = 1.0
    return b


def _fourier_skew(N: int, scale: float) -> np.ndarray:
    """Block rotation in the [c₀, s₀, c₁, s₁, …] layout: A[c_k, s_k] = −scale·k = −A[s_k, c_k]."""
    k = np.arange(N) // 2
    A = np.zeros((N, N))
    c = np.arange(0, N - 1, 2)  # cosine rows that have a sine partner inside the truncation
    A[c, c + 1] = -scale * k[c]
    A[c + 1, c] = scale * k[c]
    return A


def transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO continuous-time state matrices for ``measure`` (HiPPO, Gu et al.
    2020; S4, Gu et al. 2022).

    Args:
      measure: one of ``"legs"`` (scaled Legendre), ``"legt"`` (translated Legendre, halved as
        in the S4 code), ``"lagt"`` (translated Laguerre), ``"lmu"`` (LMU's LegT
        normalisation), ``"fout"`` (translated Fourier), ``"foud"`` (decaying Fourier),
        ``"legsd"`` (the normal part of LegS used by diagonal models).
      N: state size, a positive integer (odd sizes are allowed here; the Fourier layout
        [c₀, s₀, c₁, s₁, …] is simply truncated).

    Returns:
      ``(A, B)``: float64 NumPy arrays, ``A (N, N)`` and ``B (N,)``.

    Example:
      >>> A, B = transition("legs", 4)
      >>> A[1, 0], A[1, 1], B[1]   # −√3·√1, −2, √3
    """
    check_choice("measure", measure, MEASURES)
    check_positive_int("N", N)
    n = np.arange(N, dtype=np.float64)
    row, col = np.meshgrid(n, n, indexing="ij")
    r = np.sqrt(2 * n + 1)
    if measure in ("legs", "legsd"):
        A = -np.outer(r, r) * (row > col) - np.diag(n + 1)
        B = r.copy()
        if measure == "legsd":
            A = A + 0.5 * np.outer(B, B)
            B = B / 2
    elif measure == "legt":
        sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
        A = -0.5 * np.outer(r, r) * sign
        B = 0.5 * r
    elif measure == "lmu":
        sign = np.where(row < col, -1.0, (-1.0) ** (row - col + 1))
        A = (2 * n + 1)[:, None] * sign
        B = (2 * n + 1) * (-1.0) ** n
    elif measure == "lagt":
        A = 0.5 * np.eye(N) - np.tril(np.ones((N, N)))
        B = np.ones(N)
    elif measure == "fout":
        B = _fourier_b(N)
        A = _fourier_skew(N, np.pi) - np.outer(B, B)
    else:  # foud
        B = _fourier_b(N)
        A = _fourier_skew(N, 2 * np.pi) - 0.5 * np.eye(N)
    return A, B


def rank_correction(measure: str, N: int, rank: int = 1) -> np.ndarray:
    """Low-rank term ``P (rank, N)`` such that ``A + Σ_r P_r P_rᵀ = −c·I + skew`` is normal.

    Zero rows pad the result to ``rank``. LegS: ``P = √(n + ½)``; LegT (rank 2):
    ``√(2n+1)/√2`` on odd n, then on even n; LagT: ``√½·1``; FouT: ``b = [1, 0, √2, 0, …]``;
    FouD and LegSD are already normal, so ``P = 0``.

    Args:
      measure: one of :data:`NPLR_MEASURES` (``"lmu"`` has no such form).
      N: state size, a positive integer.
      rank: number of rows to return, at least the measure's minimum (2 for LegT, else 1).

    Returns:
      float64 NumPy array ``P (rank, N)``.

    Raises:
      ValueError: unknown measure, a measure without a normal-plus-low-rank form, ``N`` or
        ``rank`` not a positive integer, or ``rank`` below the measure's minimum.
    """
    check_choice("measure", measure, NPLR_MEASURES)
    check_positive_int("N", N)
    check_positive_int("rank", rank)
    if rank < _MIN_RANK[measure]:
        raise ValueError(
            f"rank must be at least {_MIN_RANK[measure]} for measure {measure!r}; got {rank}"
        )
    n = np.arange(N, dtype=np.float64)
    if measure == "legs":
        rows = [np.sqrt(n + 0.5)]
    elif measure == "legt":
        p = np.sqrt(2 * n + 1) / np.sqrt(2.0)
        odd = n % 2 == 1
        rows = [np.where(odd, p, 0.0), np.where(odd, 0.0, p)]
    elif measure == "lagt":
        rows = [np.full(N, np.sqrt(0.5))]
    elif measure == "fout":
        rows = [_fourier_b(N)]
    else:  # foud, legsd: A itself is normal
        rows = []
    P = np.zeros((rank, N))
    if rows:
        P[: len(rows)] = np.stack(rows)
    return P


class NPLR(NamedTuple):
    """Normal-plus-low-rank form of a HiPPO matrix, in the eigenbasis, half of each pair.

    With ``V_full = [V, conj(V)]`` (unitary), ``Λ_full = [Λ, conj(Λ)]`` and
    ``P̃_full = [P, conj(P)]``, the HiPPO matrix is
    ``A = V_full (diag(Λ_full) − P̃_full P̃_full*) V_full*``.

    Attributes:
      Lambda: ``(N/2,)`` complex128 eigenvalues of the normal part, ``Im ≤ 0``, sorted by
        imaginary part (most negative first).
      P: ``(rank, N/2)`` complex128 low-rank term in the eigenbasis, ``V* P_r``.
      B: ``(N/2,)`` complex128 HiPPO ``B`` in the eigenbasis, ``V* B`` (optionally with its
        imaginary part clipped, see :func:`nplr`).
      V: ``(N, N/2)`` complex128 eigenvectors, orthonormal columns, with ``2·Re(V V*) = I``.
    """

    Lambda: np.ndarray
    P: np.ndarray
    B: np.ndarray
    V: np.ndarray


def _canonical_phase(V: np.ndarray) -> np.ndarray:
    """Rotate each column of ``V (N, M)`` so its first non-negligible entry is real and positive.

    Eigenvectors are defined up to a phase; fixing it makes results independent of the LAPACK
    build (LAPACK's ``eigh`` already returns a real first entry, so this only fixes its sign).
    """
    mag = np.abs(V)
    pivot = np.argmax(mag > 1e-6 * mag.max(axis=0, keepdims=True), axis=0)
    ref = V[pivot, np.arange(V.shape[1])]
    return V * (np.abs(ref) / ref)[None, :]


def _half_eigh(AP: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of ``AP = −c·I + S`` (S skew) keeping one mode per conjugate pair.

    Returns ``(Lambda (N/2,), V (N, N/2))`` with ``Im Lambda ≤ 0`` ascending. Eigenvalues with
    zero imaginary part (Fourier measures: the c₀/s₀ block) come as a real null space of S of
    even dimension; an orthonormal real basis ``u₁, u₂, …`` of it is paired into
    ``(u₁ + i·u₂)/√2`` so that the kept vectors and their conjugates stay orthonormal.
    """
    N = AP.shape[0]
    re = np.mean(np.diag(AP))
    w_im, V = np.linalg.eigh(-1j * AP)  # Hermitian because AP − re·I is real skew
    order = np.argsort(w_im, kind="stable")
    w_im, V = w_im[order], V[:, order]
    tol = 1e-9 * max(1.0, float(np.max(np.abs(w_im))))
    zero = np.abs(w_im) <= tol
    n_zero = int(np.sum(zero))
    n_neg = int(np.sum(w_im < -tol))
    if n_neg + n_zero // 2 != N // 2 or n_zero % 2:
        raise ValueError(
            "the normal part's spectrum is not conjugate-paired with an even null space; "
            f"got {n_neg} negative and {n_zero} zero imaginary parts for N = {N}"
        )
    V_half = V[:, :n_neg]
    lam_im = w_im[:n_neg]
    if n_zero:
        Z = V[:, zero]
        U, s, _ = np.linalg.svd(np.concatenate([Z.real, Z.imag], axis=1), full_matrices=False)
        U = U[:, :n_zero]  # span(Z) is closed under conjugation: its real basis has n_zero vectors
        paired = (U[:, 0::2] + 1j * U[:, 1::2]) / np.sqrt(2.0)
        V_half = np.concatenate([V_half, paired], axis=1)
        lam_im = np.concatenate([lam_im, np.zeros(n_zero // 2)])
    return re + 1j * lam_im, _canonical_phase(V_half)


def nplr(measure: str, N: int, rank: int = 1, *, b_clip: float | None = None) -> NPLR:
    """Normal-plus-low-rank (DPLR in the eigenbasis) form of a HiPPO matrix (S4,
    Gu et al. 2022).

    ``AP = A + Σ_r P_r P_rᵀ`` equals ``−c·I + S`` with ``S`` skew; its eigenvalues have real part
    ``−c`` (the mean of ``diag(AP)``) and the imaginary parts and unitary eigenvectors come from
    the Hermitian problem ``−i·AP``, solved in float64; each eigenvector's phase is fixed so its
    first non-negligible entry is real positive (platform-independent output). Modes are sorted
    by imaginary part and the ``N/2`` with non-positive imaginary part are kept (the Fourier
    measures' zero-frequency pair is handled explicitly). ``B̃ = V*B`` and ``P̃ = V*P``; the SSM
    matrix in the eigenbasis is ``diag(Λ) − P̃ P̃*`` over both halves of each pair
    (see :class:`NPLR`).

    Args:
      measure: one of :data:`NPLR_MEASURES`.
      N: full state size, a positive even integer.
      rank: rank of the correction (LegT needs 2).
      b_clip: if given, clip ``Im(B̃)`` to ``[−b_clip, b_clip]``. The default ``None`` returns
        the exact ``V*B``; the S4 code uses ``2.0`` (:data:`S4_B_CLIP`), which S4/S4D layers
        should pass to reproduce its initialisation (for LegS most entries sit at the clip).

    Returns:
      :class:`NPLR` ``(Lambda (N/2,), P (rank, N/2), B (N/2,), V (N, N/2))``, complex128.

    Example:
      >>> Lambda, P, B, V = nplr("legs", 16, b_clip=S4_B_CLIP)
      >>> Lambda.real   # all −0.5
    """
    check_choice("measure", measure, NPLR_MEASURES)
    check_even("N", N)
    if b_clip is not None and not b_clip > 0:
        raise ValueError(f"b_clip must be a positive number or None; got {b_clip!r}")
    A, B = transition(measure, N)
    P = rank_correction(measure, N, rank)
    AP = A + P.T @ P
    Lambda, V = _half_eigh(AP)
    Vh = V.conj().T
    B_t = Vh @ B
    if b_clip is not None:
        B_t = B_t.real + 1j * np.clip(B_t.imag, -b_clip, b_clip)
    return NPLR(Lambda, (Vh @ P.T).T, B_t, V)


class DiagInit(NamedTuple):
    """Diagonal SSM initialisation, one mode per conjugate pair.

    Attributes:
      A: ``(N/2,)`` complex128 modes with ``Re ≤ 0`` and ``Im ≤ 0`` (S4 code convention;
        ``(conj A, conj B, conj C)`` gives the same kernel ``2·Re Σ C B̄ Ā^ℓ``).
      B: ``(N/2,)`` complex128 input vector: the HiPPO ``B̃`` for ``"legs"``, ones otherwise
        (the S4D default).
    """

    A: np.ndarray
    B: np.ndarray


def diag_init(
    kind: str, N: int, *, key: jax.Array | None = None, b_clip: float | None = S4_B_CLIP
) -> DiagInit:
    """S4D diagonal initialisations (S4D, Gu et al. 2022), ``N/2`` complex modes.

    With ``n = 0 … N/2−1``: ``"lin"`` (S4D-Lin) ``A_n = −½ − iπn``; ``"inv"`` (S4D-Inv)
    ``A_n = −½ − i(N/π)(N/(2n+1) − 1)``; ``"legs"`` (S4D-LegS) the eigenvalues of the LegS
    normal part, ``−½ + i·Im Λ_n`` from :func:`nplr`, with ``B = B̃``; ``"real"`` (S4D-Real)
    ``A_n = −(n+1)``; ``"random"`` ``A_n = −½ − i·exp(z_n)``, ``z_n ~ N(0, 1)`` (needs ``key``).
    Imaginary parts are non-positive as in the S4 code (see :class:`DiagInit`).

    Args:
      kind: one of :data:`DIAG_KINDS`.
      N: full state size, a positive even integer.
      key: JAX PRNG key, required for ``"random"`` only.
      b_clip: clip of ``Im(B̃)`` for ``"legs"``; defaults to the S4 code's 2.0 (``None``: exact).

    Returns:
      :class:`DiagInit` ``(A (N/2,), B (N/2,))``, complex128 NumPy arrays.
    """
    check_choice("kind", kind, DIAG_KINDS)
    check_even("N", N)
    n = np.arange(N // 2, dtype=np.float64)
    B = np.ones(N // 2, dtype=np.complex128)
    if kind == "lin":
        A = -0.5 - 1j * np.pi * n
    elif kind == "inv":
        A = -0.5 - 1j * (N / np.pi) * (N / (2 * n + 1) - 1)
    elif kind == "legs":
        A, _, B, _ = nplr("legs", N, b_clip=b_clip)
    elif kind == "real":
        A = -(n + 1) + 0j
    else:  # random
        if key is None:
            raise ValueError("diag_init('random', ...) needs a PRNG key: pass key=")
        z = np.asarray(jax.random.normal(key, (N // 2,)), dtype=np.float64)
        A = -0.5 - 1j * np.exp(z)
    return DiagInit(np.asarray(A, dtype=np.complex128), B)


def dt_init(
    key: jax.Array,
    shape: int | tuple[int, ...],
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dtype=jnp.float32,
) -> jax.Array:
    """Step sizes Δ drawn log-uniformly on ``[dt_min, dt_max]`` (S4D, Gu et al. 2022).

    Args:
      key: JAX PRNG key.
      shape: output shape, e.g. ``(H,)`` per feature (S4/S4D) or ``(P,)`` per state (S5).
      dt_min, dt_max: positive bounds with ``dt_min ≤ dt_max`` (Path-X uses ``dt_min = 1e-4``).
      dtype: floating dtype of the result.

    Returns:
      Δ of ``shape`` (not its logarithm; layers store ``log Δ`` themselves).
    """
    if not (np.isfinite(dt_min) and np.isfinite(dt_max) and 0 < dt_min <= dt_max):
        raise ValueError(
            f"need 0 < dt_min <= dt_max (finite); got dt_min={dt_min}, dt_max={dt_max}"
        )
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    u = jax.random.uniform(key, shape, dtype=dtype)
    return jnp.exp(u * (np.log(dt_max) - np.log(dt_min)) + np.log(dt_min)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Transfer functions


def transfer_function(
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    omega: jax.Array,
    *,
    conj_symmetric: bool = False,
) -> jax.Array:
    """Frequency response ``H(iω) = C (iωI − A)⁻¹ B`` of a continuous system, vectorised over ω.

    ``A`` is either dense ``(N, N)`` or the diagonal ``(N,)`` of a diagonal system. Single-input
    single-output systems pass ``B (N,)`` and ``C (N,)``; multi-input ``B (N, I)`` and
    multi-output ``C (O, N)`` add those axes to the result. Computed in JAX in the inputs'
    precision: enable float64 (``jax.enable_x64``) for HiPPO matrices, whose resolvent is badly
    conditioned.

    Args:
      A: ``(N, N)`` dense or ``(N,)`` diagonal state matrix, real or complex.
      B: ``(N,)`` or ``(N, I)``.
      C: ``(N,)`` or ``(O, N)``.
      omega: real frequencies of any shape ``W``.
      conj_symmetric: for a diagonal system stored as one mode per conjugate pair (S4D, the
        :func:`nplr` half), also add the conjugate modes, i.e. return the response of the real
        ``2N``-state system (``A``, ``B``, ``C`` with their conjugates).

    Returns:
      complex array of shape ``W + (O,)? + (I,)?``.

    Example:
      >>> A, B = transition("legs", 8); C = np.ones(8)
      >>> H = transfer_function(A, B, C, np.linspace(-50, 50, 201))   # (201,)
    """
    A, B, C = jnp.asarray(A), jnp.asarray(B), jnp.asarray(C)
    omega = jnp.asarray(omega)
    if A.ndim not in (1, 2) or (A.ndim == 2 and A.shape[0] != A.shape[1]):
        raise ValueError(f"A must have shape (N, N) or (N,); got {A.shape}")
    N = A.shape[0]
    if B.ndim not in (1, 2) or B.shape[0] != N:
        raise ValueError(f"B must have shape (N,) or (N, I) with N = {N}; got {B.shape}")
    if C.ndim not in (1, 2) or C.shape[-1] != N:
        raise ValueError(f"C must have shape (N,) or (O, N) with N = {N}; got {C.shape}")
    if jnp.iscomplexobj(omega):
        raise ValueError("omega must be real (frequencies)")
    if conj_symmetric and A.ndim != 1:
        raise ValueError("conj_symmetric applies to diagonal systems (A of shape (N,)) only")
    dtype = jnp.result_type(A, B, C, omega, jnp.complex64)
    A, B, C = A.astype(dtype), B.astype(dtype), C.astype(dtype)
    B2 = B if B.ndim == 2 else B[:, None]
    C2 = C if C.ndim == 2 else C[None, :]
    s = 1j * omega.reshape(-1).astype(dtype)
    if A.ndim == 1:
        # Σ_n C_on B_ni / (s − A_n); the conjugate half adds conj(C) conj(B) / (s − conj A).
        H = jnp.einsum("on,wn,ni->woi", C2, 1.0 / (s[:, None] - A[None, :]), B2)
        if conj_symmetric:
            H = H + jnp.einsum(
                "on,wn,ni->woi", C2.conj(), 1.0 / (s[:, None] - A.conj()[None, :]), B2.conj()
            )
    else:
        eye = jnp.eye(N, dtype=dtype)
        X = jax.vmap(lambda z: jnp.linalg.solve(z * eye - A, B2))(s)  # (W, N, I)
        H = jnp.einsum("on,wni->woi", C2, X)
    if C.ndim == 1:
        H = H[:, 0]
    if B.ndim == 1:
        H = H[..., 0]
    return H.reshape(omega.shape + H.shape[1:])


# ---------------------------------------------------------------------------------------------
# Online function approximation (HiPPO projection and reconstruction)

PROJECT_MEASURES = ("legs", "legt", "lmu", "lagt", "fout")
"""Measures understood by :func:`project` and :func:`reconstruct`."""

# Window length, in ODE time units, of the translated measures as defined by `transition`:
# the S4 code's halved LegT and its FouT are the window-2 systems, the LMU the window-1 one.
_WINDOW = {"legt": 2.0, "fout": 2.0, "lmu": 1.0}


def project(u, measure: str, N: int, dt: float) -> np.ndarray:
    """Run the HiPPO ODE over a sampled signal and return the coefficient trajectory.

    Sample ``u[k]`` is taken at time ``(k+1)·dt`` and the ODE is discretised with the bilinear
    (Tustin) rule with the input averaged over each step (a piecewise-linear input, zero before
    the first sample), so the memory does not lag by half a sample. ``"legs"`` is
    time-varying, ``x' = (A x + B u)/t``, and summarises the whole history ``[0, t]`` (its
    coefficients do not depend on ``dt``); the others are time invariant, ``x' = A x + B u``:
    ``"legt"`` and ``"fout"`` summarise a sliding window of 2 time units (``2/dt`` samples),
    ``"lmu"`` a window of 1, and ``"lagt"`` the whole past with Laguerre functions of unit time
    scale. Computed in float64 with a ``lax.scan``.

    Args:
      u: signal, ``(L,)`` or batched ``(B, L)``.
      measure: one of :data:`PROJECT_MEASURES`.
      N: number of coefficients, a positive integer.
      dt: positive step between samples, in ODE time units.

    Returns:
      float64 coefficients ``(L, N)`` or ``(B, L, N)``; row ``k`` summarises ``u[: k + 1]``.

    Example (rebuild the last window of a LegT memory)::

      dt = 2 / 500                                # window = 500 samples
      u = np.sin(np.linspace(0, 20, 2000))
      c = project(u, "legt", 64, dt)              # (2000, 64)
      delays = dt * np.arange(500)                # 0 = newest sample
      u_hat = reconstruct(c[-1], "legt", delays)  # (500,) ≈ u[-1:-501:-1]
    """
    check_choice("measure", measure, PROJECT_MEASURES)
    check_positive_int("N", N)
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number; got {dt!r}")
    u = np.asarray(u, dtype=np.float64)
    if u.ndim not in (1, 2) or u.shape[-1] == 0:
        raise ValueError(f"u must have shape (L,) or (B, L) with L >= 1; got {u.shape}")
    A, B = transition(measure, N)
    with jax.enable_x64(True):
        us = jnp.asarray(np.moveaxis(np.atleast_2d(u), -1, 0))  # (L, B)
        if measure == "legs":
            coeffs = _project_legs(jnp.asarray(A), jnp.asarray(B), us)
        else:
            eye = np.eye(N)
            lhs = eye - 0.5 * dt * A
            Ad = np.linalg.solve(lhs, eye + 0.5 * dt * A)
            Bd = np.linalg.solve(lhs, dt * B)
            coeffs = _project_lti(jnp.asarray(Ad), jnp.asarray(Bd), us)
        coeffs = np.asarray(jnp.moveaxis(coeffs, 0, 1))  # (B, L, N)
    return coeffs[0] if u.ndim == 1 else coeffs


@jax.jit
def _project_lti(Ad: jax.Array, Bd: jax.Array, us: jax.Array) -> jax.Array:
    """x_k = Ā x_{k−1} + B̄ (u_k + u_{k−1})/2 over ``us (L, B)`` (u_{−1} = 0): ``(L, B, N)``."""

    # Tustin with the input averaged over the step (exact for a piecewise-linear input):
    # feeding u_k alone would make the memory lag the signal by half a sample.
    u_prev = jnp.concatenate([jnp.zeros_like(us[:1]), us[:-1]], axis=0)

    def step(x, u_k):
        x = x @ Ad.T + u_k[:, None] * Bd[None, :]
        return x, x

    x0 = jnp.zeros((us.shape[1], Ad.shape[0]), Ad.dtype)
    return jax.lax.scan(step, x0, 0.5 * (us + u_prev))[1]


@jax.jit
def _project_legs(A: jax.Array, B: jax.Array, us: jax.Array) -> jax.Array:
    """LegS Tustin step over ``[k−1, k]`` with ``1/t`` frozen at the midpoint ``τ = k − ½``.

    ``(I − A/2τ) x_k = (I + A/2τ) x_{k−1} + (B/τ)(u_k + u_{k−1})/2``; freezing at the midpoint
    and averaging the input (rather than the HiPPO code's ``A/k``, ``u_k``) halves the
    reconstruction error. ``us (L, B)``; returns ``(L, B, N)``.
    """
    N = A.shape[0]
    eye = jnp.eye(N, dtype=A.dtype)
    u_prev = jnp.concatenate([jnp.zeros_like(us[:1]), us[:-1]], axis=0)

    def step(x, inp):
        tau, u_k = inp
        rhs = x @ (eye + A / (2 * tau)).T + u_k[:, None] * (B / tau)[None, :]
        # I − A/2τ is lower triangular (LegS A is), so each step is one triangular solve.
        x = jax.scipy.linalg.solve_triangular(eye - A / (2 * tau), rhs.T, lower=True).T
        return x, x

    taus = jnp.arange(1, us.shape[0] + 1, dtype=A.dtype) - 0.5
    x0 = jnp.zeros((us.shape[1], N), A.dtype)
    return jax.lax.scan(step, x0, (taus, 0.5 * (us + u_prev)))[1]


def _legendre(n_max: int, x: np.ndarray) -> np.ndarray:
    """Legendre polynomials ``P_0 … P_{n_max−1}`` at ``x``: shape ``(n_max,) + x.shape``."""
    out = np.empty((n_max,) + x.shape)
    out[0] = 1.0
    if n_max > 1:
        out[1] = x
    for n in range(1, n_max - 1):  # Bonnet: (n+1) P_{n+1} = (2n+1) x P_n − n P_{n−1}
        out[n + 1] = ((2 * n + 1) * x * out[n] - n * out[n - 1]) / (n + 1)
    return out


def _laguerre_functions(n_max: int, r: np.ndarray) -> np.ndarray:
    """Laguerre functions ``L_n(r)·e^{−r/2}`` (orthonormal on [0, ∞)): ``(n_max,) + r.shape``."""
    out = np.empty((n_max,) + r.shape)
    out[0] = np.exp(-r / 2)
    if n_max > 1:
        out[1] = (1 - r) * out[0]
    # The recurrence is linear, so running it on the damped functions avoids overflow of L_n.
    for n in range(1, n_max - 1):
        out[n + 1] = ((2 * n + 1 - r) * out[n] - n * out[n - 1]) / (n + 1)
    return out


def basis(measure: str, N: int, t, *, elapsed: float | None = None) -> np.ndarray:
    """The functions that :func:`reconstruct` combines: ``G (N,) + t.shape`` at delays ``t``.

    ``u(now − t) ≈ Σ_n c_n G_n(t)``. LegS: ``√(2n+1)·P_n(1 − 2t/elapsed)`` on
    ``[0, elapsed]``; LegT: ``√(2n+1)·P_n(1 − t)`` on ``[0, 2]``; LMU: ``P_n(2t − 1)`` on
    ``[0, 1]``; LagT: ``L_n(t)·e^{−t/2}`` on ``[0, ∞)``; FouT in the layout
    ``[c₀, s₀, c₁, s₁, …]``: ``1``, ``0``, ``√2·cos(πk t)``, ``√2·sin(πk t)`` on ``[0, 2]``.
    Outside the measure's support the entries are NaN (there is no approximation there).

    Args:
      measure: one of :data:`PROJECT_MEASURES`.
      N: number of coefficients.
      t: delays (time before the coefficients' time, ODE units), any shape, ``≥ 0``.
      elapsed: LegS only (required): the time the coefficients summarise, ``k·dt`` after
        ``k`` samples. Scalar, or an array broadcasting against ``t``.

    Returns:
      float64 ``(N,) + broadcast(t, elapsed).shape``.
    """
    check_choice("measure", measure, PROJECT_MEASURES)
    check_positive_int("N", N)
    t = np.asarray(t, dtype=np.float64)
    n = np.arange(N)
    if measure == "legs":
        if elapsed is None:
            raise ValueError("measure 'legs' needs elapsed= (the time the coefficients cover)")
        elapsed = np.asarray(elapsed, dtype=np.float64)
        if np.any(~(elapsed > 0)):
            raise ValueError("elapsed must be positive")
        t, elapsed = np.broadcast_arrays(t, elapsed)
        support = elapsed
        x = 1 - 2 * t / elapsed
        G = np.sqrt(2 * n + 1).reshape((N,) + (1,) * t.ndim) * _legendre(N, x)
    elif measure in ("legt", "lmu"):
        support = _WINDOW[measure]
        if measure == "legt":
            G = np.sqrt(2 * n + 1).reshape((N,) + (1,) * t.ndim) * _legendre(N, 1 - t)
        else:
            G = _legendre(N, 2 * t - 1)
    elif measure == "lagt":
        support = np.inf
        G = _laguerre_functions(N, np.maximum(t, 0.0))
    else:  # fout
        support = _WINDOW[measure]
        k = (n // 2).reshape((N,) + (1,) * t.ndim)
        phase = np.pi * k * t
        G = np.where(
            (n % 2 == 0).reshape(k.shape), np.sqrt(2) * np.cos(phase), np.sqrt(2) * np.sin(phase)
        )
        G[0] = 1.0
        if N > 1:
            G[1] = 0.0
    outside = (t < 0) | (t > support)
    return np.where(outside, np.nan, G)


def reconstruct(coeffs, measure: str, t, *, elapsed: float | None = None) -> np.ndarray:
    """Rebuild the signal history from HiPPO coefficients: ``u(now − t) ≈ Σ_n c_n G_n(t)``.

    The inverse of :func:`project` on the measure's support (see :func:`basis` for the
    functions): ``t`` are delays back from the coefficients' time, in ODE units, so sample
    ``u[k − j]`` sits at delay ``j·dt`` from ``coeffs[k]``. Delays outside the support (beyond
    the window for LegT/LMU/FouT, beyond ``elapsed`` for LegS) give NaN, which plots as a gap.

    Args:
      coeffs: ``(..., N)``, e.g. one row ``(N,)`` or a whole trajectory ``(L, N)``.
      measure: one of :data:`PROJECT_MEASURES`.
      t: delays ``(T,)`` (any shape; one-dimensional is the common case).
      elapsed: LegS only: time covered by the coefficients, a scalar or an array broadcasting
        against ``coeffs.shape[:-1]`` (``(k+1)·dt`` for ``coeffs[k]``).

    Returns:
      float64 ``coeffs.shape[:-1] + t.shape``.

    Example::

      c = project(u, "legs", 32, dt=1.0)                              # (L, 32)
      L = len(u)
      u_hat = reconstruct(c[-1], "legs", np.arange(L), elapsed=L)[::-1]  # ≈ u, oldest first
      plt.plot(u); plt.plot(u_hat)
    """
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if coeffs.ndim < 1:
        raise ValueError(f"coeffs must have shape (..., N); got {coeffs.shape}")
    N = coeffs.shape[-1]
    t = np.asarray(t, dtype=np.float64)
    lead = coeffs.shape[:-1]
    if measure == "legs" and elapsed is not None:
        # Give every coefficient row its own window: elapsed aligned with the leading axes.
        elapsed = np.broadcast_to(np.asarray(elapsed, dtype=np.float64), lead)
        G = basis(measure, N, t, elapsed=elapsed.reshape(lead + (1,) * t.ndim))
        G = np.moveaxis(G, 0, -1)  # lead + t.shape + (N,)
        return np.sum(coeffs.reshape(lead + (1,) * t.ndim + (N,)) * G, axis=-1)
    G = basis(measure, N, t, elapsed=elapsed)  # (N,) + t.shape
    return np.tensordot(coeffs, G, axes=([-1], [0]))


# ---------------------------------------------------------------------------------------------
# PTD: perturb-then-diagonalize (PTD, Yu et al. 2024)

PTD_CACHE_FILE = "ptd_cache.npz"
"""File in ``ssmix/data`` holding the precomputed PTD tables (``scripts/build_ptd_cache.py``)."""

PTD_CACHE_SIZES = (8, 16, 32, 64, 128, 256)
"""State sizes whose default-argument LegS PTD tables ship with the package."""

# Bump when the optimisation changes, so stale cache entries are ignored rather than misused.
_PTD_VERSION = 1
_PTD_INIT_SCALE = 0.1
_PTD_TOL = 0.05  # the quality criteria: ‖E‖₂/‖A‖₂ and ‖VΛV⁻¹ − A‖₂/‖A‖₂ at most 5 %
_PTD_STABILITY_WEIGHT = 1.0


class PTD(NamedTuple):
    """Perturb-then-diagonalize result: ``A ≈ V diag(Lambda) Vinv`` with ``V`` well conditioned.

    ``A + E = V diag(Λ̃) V⁻¹`` exactly for the optimised perturbation ``E``; ``Lambda`` is ``Λ̃``
    after the sign fix ``Re Λ ← −|Re Λ|``. The spectrum of a complex ``E`` is not
    conjugate-paired, so all ``N`` modes are kept (no factor 2 in kernels). To move a system
    ``(A, B, C)`` into the modes: ``B̃ = Vinv @ B`` (:meth:`input_to_modes`) and ``C̃ = C @ V``
    (:meth:`output_to_modes`). S4-PTD uses ``Lambda`` with ``B̃ = Vinv @ b`` (``b`` the HiPPO
    ``B``) and any ``C̃``; S5-PTD uses ``Lambda``, ``V`` and ``Vinv`` with its random ``B``, ``C``.

    Attributes:
      Lambda: ``(N,)`` complex128 eigenvalues, ``Re ≤ 0``, sorted by (imaginary, real) part.
      V: ``(N, N)`` complex128 eigenvectors, unit-norm columns, phase fixed so each column's
        entries sum to a positive real number.
      Vinv: ``(N, N)`` complex128 inverse of ``V``.
    """

    Lambda: np.ndarray
    V: np.ndarray
    Vinv: np.ndarray

    def input_to_modes(self, B) -> np.ndarray:
        """``B̃ = V⁻¹ B`` for ``B (N,)`` or ``(N, H)``."""
        return self.Vinv @ np.asarray(B)

    def output_to_modes(self, C) -> np.ndarray:
        """``C̃ = C V`` for ``C (N,)`` or ``(H, N)``."""
        return np.asarray(C) @ self.V


class PTDInfo(NamedTuple):
    """Quality figures of a :func:`ptd` result (all relative to ``‖A‖₂``, spectral norms).

    Attributes:
      kappa: condition number ``κ(V)`` of the returned ``V``.
      perturbation: ``‖E‖₂ / ‖A‖₂`` with ``E = V Λ̃ V⁻¹ − A`` (before the sign fix).
      error: ``‖V diag(Lambda) V⁻¹ − A‖₂ / ‖A‖₂`` after the sign fix, against the unperturbed A.
      max_real_before_fix: largest ``Re Λ̃`` before the sign fix (> 0 means the fix acted).
      max_real: largest ``Re Lambda`` returned (``≤ 0``).
      step: optimisation step of the returned iterate.
      cached: whether the result was read from the packaged cache.
    """

    kappa: float
    perturbation: float
    error: float
    max_real_before_fix: float
    max_real: float
    step: int
    cached: bool


def ptd_default_steps(N: int) -> int:
    """Default number of Adam steps of :func:`ptd` for state size ``N`` (fewer when N is large,
    where each step's O(N³) eigendecomposition dominates the build time)."""
    return 2000 if N <= 128 else 1500


def ptd_default_lr(N: int) -> float:
    """Default Adam learning rate of :func:`ptd`: 0.1 up to N = 64, then growing like N (the
    entries of LegS grow like N, so the same relative progress per step needs a larger step)."""
    return 0.1 * max(1.0, N / 64)


def _ptd_default_margin(measure: str, N: int) -> float:
    """Distance of the spectrum of ``A`` from the imaginary axis (1 for LegS), at least 0."""
    A = transition(measure, N)[0]
    return float(max(0.0, -np.linalg.eigvals(A).real.max()))


def _ptd_args(measure, N, lam, steps, seed, lr, max_perturbation, margin) -> dict:
    """Validate :func:`ptd`'s arguments, fill the defaults; the dict keys the cache."""
    check_choice("measure", measure, MEASURES)
    check_positive_int("N", N)
    steps = ptd_default_steps(N) if steps is None else check_positive_int("steps", steps)
    lr = ptd_default_lr(N) if lr is None else lr
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a non-negative number; got {lam!r}")
    if not 0 < max_perturbation <= _PTD_TOL:
        raise ValueError(f"max_perturbation must be in (0, {_PTD_TOL}]; got {max_perturbation!r}")
    margin = _ptd_default_margin(measure, N) if margin is None else margin
    if not (np.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number or None; got {margin!r}")
    return {
        "measure": measure,
        "N": int(N),
        "lam": float(lam),
        "steps": int(steps),
        "seed": int(seed),
        "lr": float(lr),
        "max_perturbation": float(max_perturbation),
        "margin": round(float(margin), 12),
        "stability_weight": _PTD_STABILITY_WEIGHT,
        "init_scale": _PTD_INIT_SCALE,
        "version": _PTD_VERSION,
    }


def ptd(
    measure: str = "legs",
    N: int = 64,
    *,
    lam: float = 3e-3,
    steps: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    max_perturbation: float = 0.04,
    margin: float | None = None,
    use_cache: bool = True,
    return_info: bool = False,
) -> PTD | tuple[PTD, PTDInfo]:
    """Perturb-then-diagonalize the HiPPO matrix ``A``: a well-conditioned diagonalization of
    ``A + E`` for a small complex perturbation ``E`` (PTD, Yu et al. 2024).

    For ``"legs"`` the perturbed matrix is the full (non-normal) HiPPO-LegS ``A`` of
    :func:`transition`, as in the PTD paper, not its normal part. ``E`` starts uniform in
    ``[0, 0.1)`` (real and imaginary parts, seeded) and Adam trains it in float64 on

        ``log κ(Ṽ)² + lam·‖E‖_F + Σ_n relu(Re λ_n + margin)²``,

    with ``λ_n``, ``Ṽ`` the eigenvalues and unit-column eigenvectors of ``A + E`` from
    ``jax.lax.linalg.eig(..., enable_eigvec_derivs=True)``; after each step ``E`` is projected
    onto ``‖E‖₂ ≤ max_perturbation·‖A‖₂``. The whole loop is one jitted ``lax.scan``. Three
    choices differ from a plain Adam on ``κ² + λ‖E‖_F``; each was measured at N = 32–64:

    - the logarithm keeps the gradient scale steady; with ``κ²`` the first steps' gradients,
      10⁵ times larger, freeze Adam's second-moment estimate and κ stalls near 30 (N = 32);
    - the projection enforces the size budget directly, so the optimisation spends it on κ
      instead of trading it against a penalty;
    - the stability term keeps the spectrum at least ``margin`` left of the imaginary axis
      (default: as far as ``A``'s own spectrum, 1 for LegS). Without it the optimiser parks
      eigenvalues on or across the axis; the quality criteria still pass, but the diagonal
      system's transfer function then misses HiPPO's by up to 9× its peak (0.65× with it, at
      N = 64, against about 5× for S4D-LegS).

    The returned iterate is, among those with ``‖E‖₂/‖A‖₂ ≤ 0.05`` and error after the sign
    fix ``≤ 0.05``, the one with the smallest ``κ(Ṽ)`` (if none qualifies, the least violating
    one, with a logged warning). Finally ``Re Λ ← −|Re Λ|`` so the diagonal system is stable
    (with the stability term this rarely changes anything).

    Results for ``measure="legs"``, ``N`` in :data:`PTD_CACHE_SIZES` and default arguments are
    read from the packaged cache (``ssmix/data/ptd_cache.npz``, built by
    ``scripts/build_ptd_cache.py``); any other arguments compute afresh. Measured cost of
    the default 2000 steps on the 2-core CPU (busy with other work): about 1.5 s at N = 24,
    6 s at N = 48 and 13 s at N = 64, plus 1-3 s of compilation per (N, steps); minutes
    for N ≥ 128 (each step is O(N³)). The computation runs the loaded OpenBLAS libraries on
    one thread (restored afterwards): with two threads the same runs took 12, 44 and 23 s,
    and the result at N = 64 depended on the thread count in the 6th digit of κ; one thread
    makes fresh results reproducible (and equal to the cache, built that way).

    Args:
      measure: one of :data:`MEASURES` whose ``A`` is perturbed.
      N: state size, a positive integer.
      lam: weight of ``‖E‖_F`` in the loss.
      steps: Adam steps; default :func:`ptd_default_steps`.
      seed: seed of the initial ``E``.
      lr: Adam learning rate; default :func:`ptd_default_lr` (0.1 up to N = 64).
      max_perturbation: radius of the spectral-norm ball ``E`` is kept in, relative to ``‖A‖₂``
        (below 0.05 to leave room for the sign fix).
      margin: wanted distance of the perturbed spectrum from the imaginary axis; default the
        distance of ``A``'s spectrum. The stability term is then zero once achieved.
      use_cache: read the packaged table when the arguments match.
      return_info: also return :class:`PTDInfo`.

    Returns:
      :class:`PTD` ``(Lambda (N,), V (N, N), Vinv (N, N))``, complex128; with
      ``return_info=True`` the pair ``(PTD, PTDInfo)``.

    Example (S4-PTD initialisation)::

      res = ptd("legs", 64)
      A_modes = res.Lambda                                      # (64,)
      B_modes = res.input_to_modes(transition("legs", 64)[1])   # (64,)
    """
    args = _ptd_args(measure, N, lam, steps, seed, lr, max_perturbation, margin)
    cached = _ptd_cache_lookup(args) if use_cache else None
    if cached is not None:
        lam_raw, V, step = cached
    else:
        lam_raw, V, step = _ptd_compute(transition(measure, N)[0], args)
    result, info = ptd_from_table(measure, N, lam_raw, V, step, cached=cached is not None)
    return (result, info) if return_info else result


def ptd_from_table(
    measure: str, N: int, lambda_raw, V, step: int = -1, *, cached: bool = False
) -> tuple[PTD, PTDInfo]:
    """Turn a PTD table ``(Λ̃ (N,), V (N, N))`` of ``A + E = V Λ̃ V⁻¹`` into :class:`PTD`.

    Applies the sign fix ``Re Λ ← −|Re Λ|`` and measures the quality figures against the
    unperturbed ``A = transition(measure, N)[0]`` (see :class:`PTDInfo`); ``step`` and
    ``cached`` are only recorded.
    """
    check_choice("measure", measure, MEASURES)
    check_positive_int("N", N)
    A = transition(measure, N)[0]
    lam_raw = np.asarray(lambda_raw, dtype=np.complex128)
    V = np.asarray(V, dtype=np.complex128)
    if lam_raw.shape != (N,) or V.shape != (N, N):
        raise ValueError(
            f"need lambda_raw (N,) and V (N, N) with N = {N}; got {lam_raw.shape}, {V.shape}"
        )
    Vinv = np.linalg.inv(V)
    Lambda = -np.abs(lam_raw.real) + 1j * lam_raw.imag
    nA = np.linalg.norm(A, 2)
    info = PTDInfo(
        kappa=float(np.linalg.cond(V)),
        perturbation=float(np.linalg.norm((V * lam_raw) @ Vinv - A, 2) / nA),
        error=float(np.linalg.norm((V * Lambda) @ Vinv - A, 2) / nA),
        max_real_before_fix=float(lam_raw.real.max()),
        max_real=float(Lambda.real.max()),
        step=int(step),
        cached=bool(cached),
    )
    return PTD(Lambda, V, Vinv), info


def _canonical_eig(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition with a canonical order and phase (cache and fresh runs compare)."""
    w, V = np.linalg.eig(M)
    order = np.lexsort((w.real, w.imag))
    w, V = w[order], V[:, order]
    V = V / np.linalg.norm(V, axis=0, keepdims=True)
    total = V.sum(axis=0)
    return w, V * (np.abs(total) / total)[None, :]


# (get, set) thread-count functions of the OpenBLAS builds numpy, scipy (whose LAPACK jax's
# CPU eig / svd call) and a system OpenBLAS export.
_OPENBLAS_THREAD_FUNCS = (
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


@contextlib.contextmanager
def _one_blas_thread():
    """Run the body with every loaded OpenBLAS on one thread, restoring the counts after.

    The PTD loop makes ~10⁴ LAPACK calls on N ≤ 256 matrices (eig, SVD, their derivatives):
    far too small to gain from threads, and with threads on a busy machine OpenBLAS's
    synchronisation dominates (2000 steps at N = 24: 3 s on one thread; 40-50 s with two
    threads on two cores shared with other work). One thread also makes fresh results
    reproducible (the cache is built that way). Setting the count is process-wide, so BLAS
    calls of other Python threads meanwhile run on one thread too. Where the libraries or
    their symbols cannot be found this does nothing (``OPENBLAS_NUM_THREADS=1`` then helps).
    """
    with contextlib.suppress(ImportError):
        importlib.import_module("scipy.linalg.cython_lapack")  # the LAPACK jax's CPU eig uses
    restore = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_THREAD_FUNCS:
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is None or put is None:
                continue
            get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
            count = int(get())
            if count != 1:
                put(1)
                restore.append((put, count))
            break
    try:
        yield
    finally:
        for put, count in restore:
            put(count)


def _ptd_compute(A: np.ndarray, args: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the optimisation; return the canonical ``(Λ̃, V, step)`` of the best iterate."""
    with _one_blas_thread():
        return _ptd_compute_pinned(A, args)


def _ptd_compute_pinned(A: np.ndarray, args: dict) -> tuple[np.ndarray, np.ndarray, int]:
    N = args["N"]
    with jax.enable_x64(True):
        k_re, k_im = jax.random.split(jax.random.key(args["seed"]))
        E0 = args["init_scale"] * (
            jax.random.uniform(k_re, (N, N), jnp.float64)
            + 1j * jax.random.uniform(k_im, (N, N), jnp.float64)
        )
        nA = float(np.linalg.norm(A, 2))
        best = _ptd_scan(
            jnp.asarray(A),
            E0,
            jnp.float64(nA),
            jnp.float64(args["lam"]),
            jnp.float64(args["max_perturbation"] * nA),
            jnp.float64(args["margin"]),
            jnp.float64(args["stability_weight"]),
            steps=args["steps"],
            lr=args["lr"],
        )
        E_best, kappa, step, feasible, e_rel, err = (np.asarray(x) for x in best)
    if not feasible:
        logger.warning(
            "ptd(%s, N=%d): no iterate met ‖E‖/‖A‖ ≤ %.2f and error ≤ %.2f; returning the least "
            "violating one (‖E‖/‖A‖ = %.3g, error = %.3g)",
            args["measure"],
            N,
            _PTD_TOL,
            _PTD_TOL,
            e_rel,
            err,
        )
    lam_raw, V = _canonical_eig(A + E_best)
    return lam_raw, V, int(step)


@functools.partial(jax.jit, static_argnames=("steps", "lr"))
def _ptd_scan(A, E0, nA, lam, radius, margin, mu, *, steps: int, lr: float):
    """Projected Adam on E, tracking the best iterate; float64 (called under ``enable_x64``)."""
    opt = optax.adam(lr)

    def project(E):
        U, s, Vh = jnp.linalg.svd(E, full_matrices=False)
        return (U * jnp.minimum(s, radius)) @ Vh, jnp.minimum(s[0], radius)

    def objective(E):
        w, V = jax.lax.linalg.eig(
            A + E,
            compute_left_eigenvectors=False,
            compute_right_eigenvectors=True,
            enable_eigvec_derivs=True,
        )
        s = jnp.linalg.svd(V, compute_uv=False)
        kappa = s[0] / s[-1]
        stability = mu * jnp.sum(jax.nn.relu(w.real + margin) ** 2)
        return 2 * jnp.log(kappa) + lam * jnp.linalg.norm(E) + stability, (w, V, kappa)

    def error_after_fix(w, V, e_norm):
        # Without positive real parts the fix is the identity and V Λ̃ V⁻¹ − A = E.
        def flipped():
            w_fix = -jnp.abs(w.real) + 1j * w.imag
            R = (V * w_fix) @ jnp.linalg.inv(V) - A
            return jnp.linalg.svd(R, compute_uv=False)[0]

        return jax.lax.cond(jnp.any(w.real > 0), flipped, lambda: e_norm) / nA

    def step(carry, i):
        E, e_norm, state, best = carry
        (_, (w, V, kappa)), g = jax.value_and_grad(objective, has_aux=True)(E)
        e_rel = e_norm / nA
        err = error_after_fix(w, V, e_norm)
        feasible = (e_rel <= _PTD_TOL) & (err <= _PTD_TOL) & jnp.isfinite(kappa)
        # Feasible iterates rank by κ; otherwise by how far they overshoot the criteria.
        score = jnp.where(feasible, kappa, jnp.maximum(e_rel, err))
        b_feasible, b_score = best[3], best[6]
        better = (feasible & ~b_feasible) | ((feasible == b_feasible) & (score < b_score))
        new = (E, kappa, i, feasible, e_rel, err, score)
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best)
        # JAX's gradient of a real loss in a complex variable is the conjugate of the ascent
        # direction; a non-finite gradient (eigenvalue collision) skips the step.
        g = jnp.conj(g)
        ok = jnp.all(jnp.isfinite(g))
        updates, new_state = opt.update(jnp.where(ok, g, 0), state, E)
        E_new, e_norm_new = project(optax.apply_updates(E, updates))
        carry = jax.tree.map(
            lambda a, b: jnp.where(ok, a, b), (E_new, e_norm_new, new_state), (E, e_norm, state)
        )
        return (*carry, best), None

    E0, e0 = project(E0)
    init_best = (E0, jnp.inf, 0, False, jnp.inf, jnp.inf, jnp.inf)
    init_best = jax.tree.map(jnp.asarray, init_best)
    carry = (E0, e0, opt.init(E0), init_best)
    (_, _, _, best), _ = jax.lax.scan(step, carry, jnp.arange(steps))
    return best[:6]


def _ptd_cache_lookup(args: dict) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The cached ``(Λ̃, V, step)`` for exactly these arguments, or None."""
    prefix = f"{args['measure']}_{args['N']}"
    try:
        with resources.files("ssmix").joinpath("data", PTD_CACHE_FILE).open("rb") as f:
            with np.load(f) as data:
                if f"{prefix}_args" not in data.files:
                    return None
                if json.loads(str(data[f"{prefix}_args"])) != args:
                    return None
                return data[f"{prefix}_Lambda"], data[f"{prefix}_V"], int(data[f"{prefix}_step"])
    except FileNotFoundError:
        return None


def ptd_cache_entry(
    measure: str = "legs",
    N: int = 64,
    *,
    lam: float = 3e-3,
    steps: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    max_perturbation: float = 0.04,
    margin: float | None = None,
) -> dict[str, np.ndarray]:
    """Compute one PTD table in the cache's format (used by ``scripts/build_ptd_cache.py``).

    Arguments are those of :func:`ptd`. Returns arrays keyed ``{measure}_{N}_args`` (JSON of
    the resolved arguments, compared on lookup), ``_Lambda`` (``Λ̃`` before the sign fix,
    complex128, so ``E = V Λ̃ V⁻¹ − A`` can be recovered), ``_V`` (complex64, canonical order
    and phase) and ``_step`` (the optimisation step of the kept iterate).
    """
    args = _ptd_args(measure, N, lam, steps, seed, lr, max_perturbation, margin)
    lam_raw, V, step = _ptd_compute(transition(measure, N)[0], args)
    prefix = f"{measure}_{N}"
    return {
        f"{prefix}_args": np.array(json.dumps(args, sort_keys=True)),
        f"{prefix}_Lambda": lam_raw.astype(np.complex128),
        f"{prefix}_V": V.astype(np.complex64),
        f"{prefix}_step": np.array(step),
    }
