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
