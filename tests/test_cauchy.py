"""DPLR (S4) kernels: Cauchy + Woodbury against a dense bilinear reference, and step forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmix
from ssmix import hippo
from ssmix.kernels import cauchy as Cy
from ssmix.kernels import vandermonde as V
from ssmix.kernels.fftconv import fft_conv
from ssmix.testing import assert_close
from ssmix.testing import check_equivalent as _check_equivalent

H, BATCH = 3, 2


def check_equivalent(impls, *args, **kwargs):
    """The harness with every implementation jitted (eager dispatch under grad is slow)."""
    return _check_equivalent({k: jax.jit(f) for k, f in impls.items()}, *args, **kwargs)


def _system(measure, N, rank, dtype, seed=0, channels=2):
    """HiPPO DPLR parameters broadcast over H features, random C and Δ."""
    form = hippo.nplr(measure, N, rank, b_clip=hippo.S4_B_CLIP)
    N2 = N // 2
    cdtype = jnp.promote_types(dtype, jnp.complex64)
    # Same clamp as the layers: FouT's normal part has Re Λ = 0.
    lam = np.minimum(form.Lambda.real, -1e-4) + 1j * form.Lambda.imag
    rng = np.random.default_rng(seed)
    Lam = jnp.asarray(np.broadcast_to(lam, (H, N2)), cdtype)
    P = jnp.asarray(np.broadcast_to(form.P[:, None, :], (rank, H, N2)), cdtype)
    B = jnp.asarray(np.broadcast_to(form.B, (H, N2)), cdtype)
    C = jnp.asarray(rng.normal(size=(channels, H, N2)) + 1j * rng.normal(size=(channels, H, N2)))
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-2), np.log(0.5), H)), dtype)
    return Lam, P, B, C.astype(cdtype), dt


LENGTHS = (1, 2, 7, 16, 33)
MEASURES = [("legs", 8, 1), ("legt", 8, 2), ("lagt", 6, 1), ("fout", 8, 1)]


def _on(backend, fn):
    """``fn`` traced under ``backend``'s auto rules (each call of a fresh jit traces anew)."""

    def run(*args, **kwargs):
        with ssmix.auto_backend(backend):
            return fn(*args, **kwargs)

    return run


def test_kernel_matches_dense_bilinear(x64):
    """Cauchy + Woodbury equals C Ā^ℓ B̄ with dense Ā, B̄ for every measure and length (one
    block of frequencies at these lengths under every backend's rules)."""
    systems = [_system(*m, jnp.float64) for m in MEASURES]

    def kernels(kernel_fn):
        return lambda systems: [[kernel_fn(*s, L) for L in LENGTHS] for s in systems]

    check_equivalent(
        {"dense": kernels(Cy.dplr_ssm_kernel_naive), "cauchy": kernels(Cy.dplr_ssm_kernel)},
        systems,
        grads=False,
    )


def test_kernel_gradients_match_dense_bilinear(x64):
    """Gradients through the Cauchy sums (one block; 9 frequencies in blocks of 4, a loop,
    the last block padded, rematerialised), the Woodbury solve (rank 2) and C̃ = C(I − Ā^L)."""
    check_equivalent(
        {
            "dense": lambda *s: Cy.dplr_ssm_kernel_naive(*s, 16),
            "cauchy": lambda *s: Cy.dplr_ssm_kernel(*s, 16),
            "cauchy-blocks": lambda *s: Cy.dplr_ssm_kernel(*s, 16, freq_block=4),
        },
        *_system("legt", 8, 2, jnp.float64),
    )


def test_power_kernel_matches_dense_bilinear(x64):
    """Blocked powers equal C Ā^ℓ B̄ for every measure and length (default block), and with
    block 1 (one row per tap) and 64 (dense squarings past rank S/4, one row block) for LegT,
    including lengths that are not a multiple of the block; rows by a scan (CPU rules) and
    by doubling (GPU rules: their own default block, steps that stop short of 2^k rows)."""
    systems = [_system(*m, jnp.float64) for m in MEASURES]
    lengths = LENGTHS + (64, 97)

    def kernels(kernel_fn):
        def run(systems):
            out = [[kernel_fn(*s, L) for L in lengths] for s in systems]
            legt = systems[1]
            for block in (1, 64):
                out.append([kernel_fn(*legt, L, block=block) for L in (1, 33, 97)])
            return out

        return run

    def naive(*args, block=None):
        return Cy.dplr_ssm_kernel_naive(*args)

    check_equivalent(
        {
            "dense": kernels(naive),
            "powers": kernels(Cy.dplr_power_kernel),
            "powers-gpu": kernels(_on("gpu", Cy.dplr_power_kernel)),
        },
        systems,
        grads=False,
    )


def test_power_kernel_gradients_match_dense_bilinear(x64):
    """Gradients through the low-rank doubling, the dense squarings and the rows by scan and
    by doubling (5 rows: the last step partial; the Cauchy kernel's are checked by
    test_kernel_gradients_match_dense_bilinear)."""
    check_equivalent(
        {
            "dense": lambda *s: Cy.dplr_ssm_kernel_naive(*s, 37),
            "powers": lambda *s: Cy.dplr_power_kernel(*s, 37, block=8),
            "powers-doubling": lambda *s: Cy.dplr_power_kernel(*s, 37, block=8, method="doubling"),
        },
        *_system("legt", 8, 2, jnp.float64),
    )


def test_power_block_rule_and_errors():
    lengths = (1, 2, 16, 1024, 2048, 2049, 4096, 8193, 16384, 10**6)
    assert [Cy.power_block(L) for L in lengths] == [1, 1, 2, 16, 32, 64, 64, 128, 128, 128]
    for backend in ("gpu", "tpu"):  # 2^⌈log₂L / 2⌉: about √L rows of about √L taps
        rule = [Cy.power_block(L, backend) for L in lengths]
        assert rule == [1, 2, 4, 32, 64, 64, 64, 128, 128, 1024]
        with ssmix.auto_backend(backend):
            assert Cy.power_block(16384) == 128
    with pytest.raises(ValueError, match="backend must be one of"):
        Cy.power_block(8, "cuda")
    Lam, P, B, C, dt = _system("legs", 8, 1, jnp.float32)
    with pytest.raises(ValueError, match="block must be a power of two; got 6"):
        Cy.dplr_power_kernel(Lam, P, B, C, dt, 8, block=6)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        Cy.dplr_power_kernel(Lam, P, B, C, dt, 8, block=0)
    with pytest.raises(ValueError, match="L must be a positive integer"):
        Cy.dplr_power_kernel(Lam, P, B, C, dt, 0)
    with pytest.raises(ValueError, match="C must have shape"):
        Cy.dplr_power_kernel(Lam, P, B, C[..., :3], dt, 8)
    with pytest.raises(ValueError, match="method must be one of 'auto', 'scan', 'doubling'"):
        Cy.dplr_power_kernel(Lam, P, B, C, dt, 8, method="parallel")


def test_cauchy_block_rule():
    """256 frequencies on CPU; on accelerators the fewest blocks whose complex (H, block, N)
    matrix fits 64 MiB, balanced: 8193 frequencies at H = N = 64 in 5 blocks of 1639."""
    assert Cy.cauchy_block(16384, 64, 64, 8, "cpu") == 256
    for backend in ("gpu", "tpu"):
        assert Cy.cauchy_block(16384, 64, 64, 8, backend) == 1639
        assert Cy.cauchy_block(2048, 64, 64, 8, backend) == 1025  # fits: one block, no loop
        assert Cy.cauchy_block(16384, 64, 64, 16, backend) == 911  # complex128: 9 blocks
    with ssmix.auto_backend("gpu"):
        assert Cy.cauchy_block(100, 3, 8) == 51
    with pytest.raises(ValueError, match="backend must be one of"):
        Cy.cauchy_block(8, 3, 8, 8, "GPU")
    Lam, P, B, C, dt = _system("legs", 8, 1, jnp.float32)
    with pytest.raises(ValueError, match="freq_block must be a positive integer"):
        Cy.dplr_ssm_kernel(Lam, P, B, C, dt, 8, freq_block=0)


def test_dense_form_is_the_step_on_every_basis_state(x64):
    """The closed-form Ā = G − XYᵀ equals the O(N) step applied to each real basis state."""
    Lam, P, B, C, dt = _system("legt", 8, 2, jnp.float64)
    dA, dB, _ = Cy.dplr_dense(Lam, P, B, C, dt)
    params = Cy.dplr_step_setup(Lam, P, B, dt)
    eye = jnp.eye(4, dtype=Lam.dtype)
    basis = jnp.broadcast_to(jnp.concatenate([eye, 1j * eye])[:, None], (8, H, 4))
    cols = Cy.dplr_step(params, basis)  # (S, H, N/2)
    expected = jnp.transpose(jnp.concatenate([cols.real, cols.imag], axis=-1), (1, 2, 0))
    assert_close(expected, dA)
    b = Cy.dplr_step(params, jnp.zeros_like(Lam)[None], jnp.ones((1, H)))[0]
    assert_close(jnp.concatenate([b.real, b.imag], axis=-1), dB)


def test_kernel_float32_and_unbatched_C():
    Lam, P, B, C, dt = _system("legs", 8, 1, jnp.float32)
    L = 40
    kernel = jax.jit(Cy.dplr_ssm_kernel, static_argnums=5)
    assert_close(
        jax.jit(Cy.dplr_ssm_kernel_naive, static_argnums=5)(Lam, P, B, C[0], dt, L),
        kernel(Lam, P, B, C[0], dt, L),
    )
    K = kernel(Lam, P[0], B, C[0], dt, L)  # rank 1 given as (H, N/2)
    assert K.shape == (H, L) and K.dtype == jnp.float32


@pytest.mark.parametrize("measure, rank", [("legs", 1), ("legt", 2), ("lagt", 1), ("fout", 1)])
def test_long_kernel_float32_is_accurate(measure, rank):
    """At N = 64 and L = 1024 the float32 kernels stay close to float64: the blocked powers
    within 1e-4 for every measure; the Cauchy sums within 1e-4 for LegS and 1e-3 otherwise
    (measured: 2e-6 LegS, 2e-4 LegT, 5e-5 LagT, 2e-5 FouT; powers 3e-6 to 2.5e-5)."""
    with jax.enable_x64(True):
        sys64 = _system(measure, 64, rank, jnp.float64, channels=1)
        k64 = np.asarray(jax.jit(Cy.dplr_ssm_kernel_naive, static_argnums=5)(*sys64, 1024))
    sys32 = [jnp.asarray(a, jnp.complex64 if jnp.iscomplexobj(a) else jnp.float32) for a in sys64]
    tolerances = {
        Cy.dplr_power_kernel: 1e-4,
        Cy.dplr_ssm_kernel: 1e-4 if measure == "legs" else 1e-3,
    }
    for fn, tol in tolerances.items():
        k32 = np.asarray(jax.jit(fn, static_argnums=5)(*sys32, 1024))
        assert np.linalg.norm(k32 - k64) / np.linalg.norm(k64) < tol, fn.__name__


def test_step_forms_agree(x64):
    """O(N) linear step, dense real step, diagonalised step and the kernel give one system."""
    Lam, P, B, C, dt = _system("legs", 8, 1, jnp.float64)
    L = 12
    u = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, L, H)))
    K = Cy.dplr_ssm_kernel(Lam, P, B, C, dt, L)
    y_conv = fft_conv(u, K)  # (B, L, C, H)

    params = Cy.dplr_step_setup(Lam, P, B, dt)
    dA, dB, C_r = Cy.dplr_dense(Lam, P, B, C, dt)
    lam, b, c = Cy.dplr_diagonalize(Lam, P, B, C, dt)
    x = jnp.zeros((BATCH, H, Lam.shape[1]), Lam.dtype)
    xi = jnp.zeros((BATCH, H, dA.shape[-1]))
    z = jnp.zeros((BATCH, *lam.shape), lam.dtype)
    ys_lin, ys_dense, ys_diag = [], [], []
    for t in range(L):
        x = Cy.dplr_step(params, x, u[:, t])
        xi = jnp.einsum("hij,bhj->bhi", dA, xi) + dB * u[:, t, :, None]
        z = lam * z + b * u[:, t, :, None]
        ys_lin.append(2 * jnp.real(jnp.einsum("chn,bhn->bch", C, x)))
        ys_dense.append(jnp.einsum("chs,bhs->bch", C_r, xi))
        ys_diag.append(jnp.real(jnp.einsum("chn,bhn->bch", c, z)))
    assert_close(y_conv, jnp.stack(ys_lin, axis=1))
    assert_close(y_conv, jnp.stack(ys_dense, axis=1))
    assert_close(y_conv, jnp.stack(ys_diag, axis=1), ratio=1e-6)
    # The real state is [Re x, Im x] of the half state.
    assert_close(jnp.concatenate([x.real, x.imag], axis=-1), xi)


@pytest.mark.parametrize("L, T", [(1, 4), (13, 4)])
def test_chunk_operators_match_kernel_and_state(x64, L, T):
    Lam, P, B, C, dt = _system("legt", 8, 2, jnp.float64)
    rng = np.random.default_rng(2)
    u = jnp.asarray(rng.normal(size=(BATCH, L, H)))
    x0 = jnp.asarray(rng.normal(size=(BATCH, H, 8)))
    ops = Cy.dplr_chunk_operators(Lam, P, B, C, dt, T)
    y, xf = V.chunked_ssm_conv(u, ops, x0, return_state=True)
    y_loop, x_loop = V.chunked_ssm_conv_naive(u, ops, x0)
    assert_close(y_loop, y)
    assert_close(x_loop, xf)
    y_fft = fft_conv(u, Cy.dplr_ssm_kernel(Lam, P, B, C, dt, L))
    assert_close(y_fft + V.chunked_state_output(ops, x0, L), y)


def test_bad_input_raises():
    Lam, P, B, C, dt = _system("legs", 8, 1, jnp.float32)
    with pytest.raises(ValueError, match="L must be a positive integer"):
        Cy.dplr_ssm_kernel(Lam, P, B, C, dt, 0)
    with pytest.raises(ValueError, match=r"P must have shape \(rank, 3, 4\)"):
        Cy.dplr_ssm_kernel(Lam, P[..., :2], B, C, dt, 8)
    with pytest.raises(ValueError, match="B must have shape"):
        Cy.dplr_ssm_kernel(Lam, P, B[:2], C, dt, 8)
    with pytest.raises(ValueError, match="C must have shape"):
        Cy.dplr_ssm_kernel(Lam, P, B, C[..., :3], dt, 8)
    with pytest.raises(ValueError, match="dt must have shape"):
        Cy.dplr_ssm_kernel(Lam, P, B, C, dt[:, None], 8)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        Cy.dplr_chunk_operators(Lam, P, B, C, dt, 0)
