"""Tests for ssmix.hippo: HiPPO matrices, NPLR forms, diagonal initialisers."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssmix import hippo
from ssmix.hippo import (
    MEASURES,
    NPLR_MEASURES,
    diag_init,
    dt_init,
    nplr,
    rank_correction,
    transition,
)

RANK = {"legt": 2}
even_N = st.integers(1, 128).map(lambda k: 2 * k)


def _full_dplr(measure, N):
    """Rebuild A from the half NPLR form: V_full (diag Λ_full − P̃_full P̃_full*) V_full*."""
    Lambda, P, _, V = nplr(measure, N, RANK.get(measure, 1))
    Vf = np.concatenate([V, V.conj()], axis=1)
    Lf = np.concatenate([Lambda, Lambda.conj()])
    Pf = np.concatenate([P, P.conj()], axis=1)
    return Vf @ (np.diag(Lf) - Pf.T @ Pf.conj()) @ Vf.conj().T


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- transition


def test_legs_entries():
    A, B = transition("legs", 3)
    s = np.sqrt
    expected = np.array([[-1.0, 0.0, 0.0], [-s(3) * 1, -2.0, 0.0], [-s(5) * 1, -s(5) * s(3), -3.0]])
    np.testing.assert_allclose(A, expected, rtol=1e-15)
    np.testing.assert_allclose(B, [1.0, s(3), s(5)], rtol=1e-15)
    assert A.dtype == np.float64 and B.dtype == np.float64


def test_legt_lmu_lagt_entries():
    A, B = transition("legt", 2)
    h = np.sqrt(3) / 2
    np.testing.assert_allclose(A, [[-0.5, h], [-h, -1.5]], rtol=1e-15)
    np.testing.assert_allclose(B, [0.5, h], rtol=1e-15)
    A, B = transition("lmu", 3)
    np.testing.assert_allclose(A, [[-1, -1, -1], [3, -3, -3], [-5, 5, -5]], rtol=1e-15)
    np.testing.assert_allclose(B, [1, -3, 5], rtol=1e-15)
    A, B = transition("lagt", 3)
    np.testing.assert_allclose(A, [[-0.5, 0, 0], [-1, -0.5, 0], [-1, -1, -0.5]], rtol=1e-15)
    np.testing.assert_allclose(B, np.ones(3))


def test_fourier_entries():
    r2, pi = np.sqrt(2), np.pi
    b = np.array([1, 0, r2, 0, r2])
    A, B = transition("fout", 5)
    skew = np.zeros((5, 5))
    skew[2, 3], skew[3, 2] = -pi, pi
    np.testing.assert_allclose(A, skew - np.outer(b, b), rtol=1e-15)
    np.testing.assert_allclose(B, b)
    A, B = transition("foud", 4)
    skew = np.zeros((4, 4))
    skew[2, 3], skew[3, 2] = -2 * pi, 2 * pi
    np.testing.assert_allclose(A, skew - 0.5 * np.eye(4), rtol=1e-15)
    np.testing.assert_allclose(B, b[:4])


def test_legsd_is_normal_part_of_legs():
    A, B = transition("legs", 10)
    Ad, Bd = transition("legsd", 10)
    np.testing.assert_allclose(Ad, A + 0.5 * np.outer(B, B), rtol=1e-14)
    np.testing.assert_allclose(Bd, B / 2)


def test_legs_plus_ppt_is_half_identity_plus_skew():
    for N in (1, 2, 7, 64, 256):
        A, _ = transition("legs", N)
        P = rank_correction("legs", N)
        S = A + P.T @ P + 0.5 * np.eye(N)
        np.testing.assert_allclose(S, -S.T, atol=1e-12 * N)
        np.testing.assert_allclose(np.diag(S), 0.0, atol=1e-12)


@given(N=even_N, measure=st.sampled_from(MEASURES))
def test_transition_property(N, measure):
    A, B = transition(measure, N)
    assert A.shape == (N, N) and B.shape == (N,)
    assert A.dtype == np.float64 and np.all(np.isfinite(A)) and np.all(np.isfinite(B))
    # Every HiPPO system is stable: no eigenvalue in the open right half plane.
    if N <= 64:
        assert np.max(np.linalg.eigvals(A).real) < 1e-6 * np.linalg.norm(A)


# ---------------------------------------------------------------- rank correction / NPLR


@given(N=even_N, measure=st.sampled_from(NPLR_MEASURES))
def test_nplr_property(N, measure):
    rank = RANK.get(measure, 1)
    A, B = transition(measure, N)
    P = rank_correction(measure, N, rank)
    AP = A + P.T @ P
    c = np.mean(np.diag(AP))
    skew = AP - c * np.eye(N)
    np.testing.assert_allclose(skew, -skew.T, atol=1e-12 * max(1.0, np.abs(A).max()))

    Lambda, Pt, Bt, V = nplr(measure, N, rank)
    assert Lambda.shape == (N // 2,) and Pt.shape == (rank, N // 2)
    assert Bt.shape == (N // 2,) and V.shape == (N, N // 2)
    np.testing.assert_allclose(Lambda.real, c, atol=1e-12)
    assert np.all(Lambda.imag <= 1e-9) and np.all(np.diff(Lambda.imag) >= 0)
    # [V, conj V] is unitary and brings A to diag(Λ) − P̃P̃* (both halves).
    Vf = np.concatenate([V, V.conj()], axis=1)
    np.testing.assert_allclose(Vf.conj().T @ Vf, np.eye(N), atol=1e-10)
    assert _rel(_full_dplr(measure, N), A) <= 1e-8
    np.testing.assert_allclose(2 * (V @ Bt).real, B, atol=1e-9 * np.abs(B).max())
    np.testing.assert_allclose(Pt, (V.conj().T @ P.T).T, atol=1e-12)


@pytest.mark.parametrize("measure", NPLR_MEASURES)
def test_nplr_reconstruction_n256(measure):
    A, _ = transition(measure, 256)
    assert _rel(_full_dplr(measure, 256), A) <= 1e-8


def test_legs_nplr_eigenvalues():
    Lambda = nplr("legs", 16).Lambda
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    expected = [-80.97, -25.63, -13.83, -8.36, -5.09, -2.90, -1.37, -0.35]
    np.testing.assert_allclose(np.round(Lambda.imag, 2), expected, atol=1e-9)
    for N in (2, 64, 256):
        np.testing.assert_allclose(nplr("legs", N).Lambda.real, -0.5, atol=1e-12)


def test_fourier_zero_frequency_pair():
    for measure, re in (("fout", 0.0), ("foud", -0.5)):
        Lambda, _, _, V = nplr(measure, 8)
        np.testing.assert_allclose(Lambda[-1], re, atol=1e-12)
        # The zero-frequency pair spans the c₀/s₀ plane with a genuinely complex vector.
        v = V[:, -1]
        np.testing.assert_allclose(np.abs(v[:2]), np.sqrt(0.5), atol=1e-12)
        np.testing.assert_allclose(v[2:], 0.0, atol=1e-12)
        assert abs(v @ v) < 1e-12  # v ⟂ conj(v)


def test_nplr_b_clip_and_phase():
    exact = nplr("legs", 64)
    clipped = nplr("legs", 64, b_clip=hippo.S4_B_CLIP)
    assert np.abs(exact.B.imag).max() > 2
    np.testing.assert_array_equal(clipped.B.real, exact.B.real)
    np.testing.assert_allclose(clipped.B.imag, np.clip(exact.B.imag, -2, 2))
    assert np.sum(np.isclose(np.abs(clipped.B.imag), 2.0)) >= 8  # the fast modes
    # Canonical phase: the first entry of every eigenvector is real and positive.
    assert np.all(exact.V[0].real > 0) and np.all(exact.V[0].imag == 0)


def test_rank_correction_padding_and_values():
    P = rank_correction("legt", 5, rank=3)
    p = np.sqrt(2 * np.arange(5) + 1) / np.sqrt(2)
    np.testing.assert_allclose(P[0], [0, p[1], 0, p[3], 0])
    np.testing.assert_allclose(P[1], [p[0], 0, p[2], 0, p[4]])
    np.testing.assert_array_equal(P[2], 0.0)
    np.testing.assert_array_equal(rank_correction("foud", 4, 2), np.zeros((2, 4)))
    np.testing.assert_allclose(rank_correction("lagt", 3), np.full((1, 3), np.sqrt(0.5)))
    assert rank_correction("legs", 4, 2)[1].sum() == 0


def test_errors():
    with pytest.raises(ValueError, match="measure must be one of"):
        transition("legendre", 4)
    with pytest.raises(ValueError, match="positive integer"):
        transition("legs", 0)
    with pytest.raises(ValueError, match="positive integer"):
        transition("legs", -2)
    with pytest.raises(ValueError, match="positive integer"):
        transition("legs", 4.0)
    with pytest.raises(ValueError, match="rank must be at least 2"):
        rank_correction("legt", 4, rank=1)
    with pytest.raises(ValueError, match="measure must be one of"):
        rank_correction("lmu", 4)
    with pytest.raises(ValueError, match="measure must be one of"):
        nplr("lmu", 4)
    with pytest.raises(ValueError, match="must be even"):
        nplr("legs", 7)
    with pytest.raises(ValueError, match="positive integer"):
        nplr("legs", 0)
    with pytest.raises(ValueError, match="b_clip"):
        nplr("legs", 4, b_clip=-1.0)
    with pytest.raises(ValueError, match="must be even"):
        diag_init("lin", 5)
    with pytest.raises(ValueError, match="kind must be one of"):
        diag_init("hippo", 4)
    with pytest.raises(ValueError, match="PRNG key"):
        diag_init("random", 4)
    with pytest.raises(ValueError, match="dt_min"):
        dt_init(jax.random.key(0), 3, 0.1, 0.01)
    with pytest.raises(ValueError, match="dt_min"):
        dt_init(jax.random.key(0), 3, 0.0, 0.01)


# ---------------------------------------------------------------- diagonal initialisers


def test_diag_init_values():
    N = 8
    n = np.arange(4)
    A, B = diag_init("lin", N)
    np.testing.assert_allclose(A, -0.5 - 1j * np.pi * n)
    np.testing.assert_array_equal(B, np.ones(4))
    A, _ = diag_init("inv", N)
    np.testing.assert_allclose(A, -0.5 - 1j * (N / np.pi) * (N / (2 * n + 1) - 1))
    A, _ = diag_init("real", N)
    np.testing.assert_allclose(A, -(n + 1.0))
    A, B = diag_init("legs", N)
    ref = nplr("legs", N, b_clip=2.0)
    np.testing.assert_allclose(A, ref.Lambda)
    np.testing.assert_allclose(B, ref.B)
    A1, _ = diag_init("random", N, key=jax.random.key(1))
    A2, _ = diag_init("random", N, key=jax.random.key(1))
    np.testing.assert_array_equal(A1, A2)
    assert np.all(A1.real == -0.5) and np.all(A1.imag < 0)
    for kind in hippo.DIAG_KINDS:
        A, B = diag_init(kind, N, key=jax.random.key(0))
        assert A.shape == B.shape == (4,) and A.dtype == B.dtype == np.complex128
        assert np.all(A.real < 0) and np.all(A.imag <= 0)


def test_dt_init_log_uniform():
    dt = dt_init(jax.random.key(0), (4000,), 1e-3, 1e-1)
    assert dt.shape == (4000,) and dt.dtype == np.float32
    dt = np.asarray(dt, dtype=np.float64)
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    # log Δ is uniform: mean at the midpoint, quartiles evenly spaced.
    logs = np.log10(dt)
    assert abs(logs.mean() + 2.0) < 0.05
    np.testing.assert_allclose(np.quantile(logs, [0.25, 0.75]), [-2.5, -1.5], atol=0.06)
    assert dt_init(jax.random.key(0), 3).shape == (3,)
