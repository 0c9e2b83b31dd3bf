"""HiPPO state matrices, their normal-plus-low-rank forms, diagonal SSM initialisers and PTD.

Conventions follow the S4 line of work (state-spaces/s4, lindermanlab/S5, the PTD authors'
code) so parameters move between ssmix and those projects unchanged; the formulas are collected
in ``REFERENCE.md`` §1, §2 and §6. The continuous-time system is ``x'(t) = A x(t) + B u(t)``
with state size ``N``. Conjugate-symmetric results keep ``N/2`` complex modes, one per
conjugate pair: the one with **non-positive imaginary part** (the S4 code's convention), so a
diagonal kernel is ``2·Re Σ_n C_n B̄_n Ā_n^ℓ`` over those modes.

Everything that defines an initialisation (``transition``, ``rank_correction``, ``nplr``,
``diag_init``) is computed with NumPy in float64 / complex128 and returned as NumPy arrays:
layers cast to their own dtype. ``dt_init`` returns a JAX array because it consumes a PRNG key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssmix._checks import check_choice, check_even, check_positive_int

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
    """HiPPO continuous-time state matrices for ``measure`` (REFERENCE.md §1).

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
    """Normal-plus-low-rank (DPLR in the eigenbasis) form of a HiPPO matrix (REFERENCE.md §1).

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
    """S4D diagonal initialisations (REFERENCE.md §2), ``N/2`` complex modes.

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
    """Step sizes Δ drawn log-uniformly on ``[dt_min, dt_max]`` (REFERENCE.md §2).

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
