"""S4-PTD and S5-PTD: initialisation from the PTD table, stable spectra, modes agree, errors.

Sizes use the packaged PTD cache (blocks of 8 modes), so no optimisation runs here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lra.models import mixer_class
from ssmix import hippo
from ssmix.layers import S4D, S4PTD, S5, S5PTD
from ssmix.layers.base import as_complex
from ssmix.layers.s4d import S4D_INITS
from ssmix.layers.s5 import S5_INITS
from ssmix.testing import check_equivalent

H, L, BATCH = 3, 11, 2


def _u(dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, L, H)), dtype)


def _pure(layer, mode):
    layer.mode = mode
    graphdef, params = nnx.split(layer)
    return lambda p, x: nnx.merge(graphdef, p)(x), params


def test_s5_ptd_init_is_block_diagonal_ptd(x64):
    layer = S5PTD(H, 16, blocks=2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert isinstance(layer, S5) and layer.init == "ptd" and not layer.conj_sym
    res = hippo.ptd("legs", 8)
    Lambda = np.asarray(layer.Lambda_re[...]) + 1j * np.asarray(layer.Lambda_im[...])
    assert Lambda.shape == (16,)
    np.testing.assert_allclose(Lambda, np.tile(res.Lambda, 2), rtol=1e-12)
    assert np.all(np.isfinite(Lambda)) and np.all(Lambda.real < 0)
    # B̃ = Ṽ⁻¹ B blockwise: Ṽ B̃ is the real lecun-normal B of each block.
    Bt = np.asarray(as_complex(layer.B))
    B = np.concatenate([res.V @ Bt[:8], res.V @ Bt[8:]])
    assert np.max(np.abs(B.imag)) < 1e-10 * np.max(np.abs(B.real))


def test_s5_ptd_modes_agree(x64):
    """Mode equivalence is S5's (test_s5.py); here once with the PTD modes, no symmetry."""
    layer = S5PTD(H, 8, bidirectional=True, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    impls = {}
    for mode in ("materialized", "sequential", "parallel"):
        impls[mode], params = _pure(layer, mode)
    check_equivalent(impls, params, _u(), grads=False)


def test_s4_ptd_init_matches_ptd_table(x64):
    layer = S4PTD(H, 16, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert isinstance(layer, S4D) and layer.init == "ptd"
    res = hippo.ptd("legs", 8)
    A = -np.exp(np.asarray(layer.A_re_log[...])) + 1j * np.asarray(layer.A_im[...])
    assert A.shape == (H, 8) and np.all(np.isfinite(A)) and np.all(A.real < 0)
    np.testing.assert_allclose(A, np.broadcast_to(res.Lambda, (H, 8)), rtol=1e-12)
    b = hippo.transition("legs", 8)[1]
    np.testing.assert_allclose(
        np.asarray(as_complex(layer.B)), np.broadcast_to(res.Vinv @ b, (H, 8))
    )


def test_s4_ptd_kernel_is_the_perturbed_hippo_system(x64):
    """With ``C = c·Ṽ`` the S4-PTD kernel is ``2·Re`` of the ZOH kernel of ``A + E = ṼΛ̃Ṽ⁻¹``
    (exactly), and that kernel is near HiPPO-LegS's (``‖E‖ ≈ 4 % of ‖A‖``). S4D's modes are
    tested for every registered init, ``"ptd"`` included, in test_s4.py."""
    n, length = 8, 32
    layer = S4PTD(1, 2 * n, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    res = hippo.ptd("legs", n)
    A, b = hippo.transition("legs", n)
    c = np.random.default_rng(0).normal(size=n)
    C = c @ res.V
    layer.C[...] = jnp.asarray(np.stack([C.real, C.imag], axis=-1))[None, None]
    layer.D[...] = jnp.zeros_like(layer.D[...])
    K_layer = np.asarray(layer.materialize(length))[0, :, 0]  # column s = 0: the kernel
    dt = float(jnp.exp(layer.log_dt[...])[0])

    def zoh_kernel(M):
        dA = np.asarray(jax.scipy.linalg.expm(jnp.asarray(dt * M)))
        dB = np.linalg.solve(M, (dA - np.eye(n)) @ b)
        return np.array([c @ np.linalg.matrix_power(dA, k) @ dB for k in range(length)])

    K_ptd = zoh_kernel((res.V * res.Lambda) @ res.Vinv)
    np.testing.assert_allclose(K_layer, 2 * K_ptd.real, rtol=1e-8, atol=1e-10)
    K_hippo = zoh_kernel(A)
    assert np.linalg.norm(K_ptd - K_hippo) < 0.5 * np.linalg.norm(K_hippo)


def test_registries_and_lra_models_see_ptd():
    assert "ptd" in S4D_INITS and "ptd" in S5_INITS
    assert mixer_class("s4-ptd") is S4D and mixer_class("s5-ptd") is S5


def test_ptd_option_errors():
    with pytest.raises(ValueError, match="conj_sym=False"):
        S5(H, 16, init="ptd", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="S5PTD fixes conj_sym=False"):
        S5PTD(H, 16, conj_sym=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="S4PTD fixes init='ptd'"):
        S4PTD(H, 16, init="legs", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks of even size"):
        S5PTD(H, 16, blocks=3, rngs=nnx.Rngs(0))
