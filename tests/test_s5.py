"""S5: the kernel's scan methods equal a Python loop; the layer's modes, stepping, state carry,
masks and materialized matrices equal each other; initialisation facts; clear errors; the
accelerator rules' form has no loop and lowers for cuda / tpu.

Shapes stay tiny (H = 3, P = 4 stored modes) and lengths awkward (1, odd, prime, not a
multiple of the chunk length 4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmix
from ssmix import hippo
from ssmix.kernels.s5 import (
    METHODS,
    auto_method,
    discretize,
    s5_matrix,
    s5_ssm,
    s5_ssm_naive,
    s5_step,
)
from ssmix.layers import S5, S5PTD
from ssmix.layers.base import SSMParam, as_complex
from ssmix.layers.s5 import MODES, auto_mode
from ssmix.optim import param_labels
from ssmix.testing import assert_close, check_equivalent, trace_stats

H, P, T = 3, 4, 4
BATCH, L = 2, 13  # prime, not a multiple of T


def _system(bidirectional, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    cdtype = jnp.promote_types(dtype, jnp.complex64)

    def cnormal(*shape):
        return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), cdtype)

    Lambda = jnp.asarray(-np.exp(rng.normal(size=P)) + 1j * rng.normal(size=P) * 3, cdtype)
    B = cnormal(P, H) / np.sqrt(H)
    C = cnormal(H, 2 * P if bidirectional else P) / np.sqrt(P)
    D = jnp.asarray(rng.normal(size=H), dtype)
    step = jnp.asarray(np.exp(rng.uniform(np.log(1e-2), np.log(0.5), size=P)), dtype)
    return Lambda, B, C, D, step


def _u(length=L, batch=BATCH, seed=1, dtype=jnp.float64):
    shape = (length, H) if batch is None else (batch, length, H)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---------------------------------------------------------------------------------------------
# Kernel


def _kernel_impls(**kw):
    impls = {"loop": lambda *a: s5_ssm_naive(*a, **kw)}
    for method in METHODS:
        impls[method] = lambda *a, m=method: s5_ssm(*a, method=m, chunk_size=T, **kw)
    return impls


# Every axis (direction, conjugate symmetry, discretisation) both ways in four cases.
KERNEL_CASES = [(False, True, "zoh"), (False, False, "bilinear"), (True, True, "bilinear")]
KERNEL_CASES += [(True, False, "zoh")]


@pytest.mark.parametrize("bidirectional, conj_sym, disc", KERNEL_CASES)
def test_kernel_methods_equal_loop(x64, bidirectional, conj_sym, disc):
    impls = _kernel_impls(disc=disc, bidirectional=bidirectional, conj_sym=conj_sym)
    check_equivalent(impls, *_system(bidirectional), _u())


def test_kernel_awkward_lengths_and_unbatched(x64):
    """Length 1 (batched, bidirectional) and an odd length with an unbatched ``(L, H)`` input."""
    check_equivalent(_kernel_impls(bidirectional=True), *_system(True), _u(1), grads=False)
    check_equivalent(_kernel_impls(), *_system(False), _u(7, batch=None))


def test_kernel_initial_and_final_state(x64):
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.normal(size=(BATCH, P)) + 1j * rng.normal(size=(BATCH, P)))
    impls = {"loop": lambda *a: s5_ssm_naive(*a[:-1], initial_state=a[-1], return_state=True)}
    for method in METHODS:
        impls[method] = lambda *a, m=method: s5_ssm(
            *a[:-1], method=m, chunk_size=T, initial_state=a[-1], return_state=True
        )
    check_equivalent(impls, *_system(False), _u(), x0)
    y, final = s5_ssm(*_system(False), _u(7, batch=None), initial_state=x0[0], return_state=True)
    assert y.shape == (7, H) and final.shape == (P,)


def test_kernel_float32_matches_float64_loop():
    args32 = (*_system(False, dtype=jnp.float32), _u(dtype=jnp.float32))
    y32 = s5_ssm(*args32, method="chunked", chunk_size=T)
    assert y32.dtype == jnp.float32
    with jax.enable_x64(True):
        y64 = s5_ssm_naive(*_system(False), _u())
    assert_close(np.asarray(y64, np.float32), y32)


@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_step_and_matrix_equal_loop(x64, bidirectional, conj_sym):
    Lambda, B, C, D, step = _system(bidirectional)
    u = _u()
    y = s5_ssm_naive(Lambda, B, C, D, step, u, bidirectional=bidirectional, conj_sym=conj_sym)
    Lambda_bar, B_bar = discretize(Lambda, B, step)
    M = s5_matrix(Lambda_bar, B_bar, C, D, L, bidirectional=bidirectional, conj_sym=conj_sym)
    assert M.shape == (H, H, L, L)
    assert_close(y, jnp.einsum("ijts,bsj->bti", M, u))
    if not bidirectional:
        state = jnp.zeros((BATCH, P), Lambda.dtype)
        ys = []
        for t in range(L):
            state, y_t = s5_step(Lambda_bar, B_bar, C, D, state, u[:, t], conj_sym=conj_sym)
            ys.append(y_t)
        assert_close(y, jnp.stack(ys, axis=1))


def test_discretize_formulas(x64):
    Lambda, B, _, _, step = _system(False)
    Lb, Bb = discretize(Lambda, B, step, "zoh")
    assert_close(jnp.exp(step * Lambda), Lb)
    assert_close((jnp.exp(step * Lambda) - 1)[:, None] / Lambda[:, None] * B, Bb)
    Lb, Bb = discretize(Lambda, B, step, "bilinear")
    half = step * Lambda / 2
    assert_close((1 + half) / (1 - half), Lb)
    assert_close((step / (1 - half))[:, None] * B, Bb)


def test_kernel_bad_input_raises():
    Lambda, B, C, D, step = _system(False, dtype=jnp.float32)
    u = _u(dtype=jnp.float32)
    ok = dict(Lambda=Lambda, B=B, C=C, D=D, step=step, u=u)
    bad = {
        "Lambda": (Lambda[None], "Lambda must have shape"),
        "B": (B[:-1], "B must have shape"),
        "C": (C[:, :-1], "C must have shape"),
        "D": (D[:-1], "D must have shape"),
        "step": (step[:-1], "step must have shape"),
        "u": (u[..., :-1], "u must have shape"),
    }
    for name, (value, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            s5_ssm(**{**ok, name: value})
    with pytest.raises(ValueError, match=r"\(H, 2P\)"):
        s5_ssm(**ok, bidirectional=True)
    with pytest.raises(ValueError, match="method must be one of"):
        s5_ssm(**ok, method="fft")
    with pytest.raises(ValueError, match="disc must be one of"):
        s5_ssm(**ok, disc="dss")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        s5_ssm(**ok, initial_state=jnp.zeros((BATCH, P + 1), jnp.complex64))
    C2 = jnp.concatenate([C, C], axis=1)
    with pytest.raises(ValueError, match="bidirectional"):
        s5_ssm(**{**ok, "C": C2}, bidirectional=True, return_state=True)
    with pytest.raises(ValueError, match="bidirectional"):
        s5_ssm(**{**ok, "C": C2}, bidirectional=True, initial_state=jnp.zeros((BATCH, P)))


# ---------------------------------------------------------------------------------------------
# Layer

RUN_MODES = ("materialized", "sequential", "associative", "chunked", "parallel")
# Layers store P = 4 modes like the kernel tests (two blocks of 4 halved by conjugate
# symmetry, or one block of 4 in full), so the compiled scans are shared between the tests.
D_STATE = 8


def _layer(dtype="float64", **kw):
    if kw.get("conj_sym", True):
        kw = {"blocks": 2, **kw}
    kw = {"d_state": D_STATE if kw.get("conj_sym", True) else P, "chunk_size": T, **kw}
    return S5(H, param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), **kw)


def _pure(layer, mode, **call_kw):
    layer.mode = mode
    graphdef, params = nnx.split(layer)
    return lambda p, *a: nnx.merge(graphdef, p)(*a, **call_kw), params


def _modes(layer, **call_kw):
    impls = {}
    for mode in RUN_MODES:
        impls[mode], params = _pure(layer, mode, **call_kw)
    return impls, params


LAYER_CASES = [
    ({}, "float32"),
    (
        {"bidirectional": True, "conj_sym": False, "disc": "bilinear", "C_init": "complex_normal"},
        "float64",
    ),
    ({"bidirectional": True, "C_init": "lecun_normal"}, "float64"),
]


@pytest.mark.parametrize("kw, dtype", LAYER_CASES, ids=["f32", "bi-full-bilinear", "bi"])
def test_layer_modes_agree_outputs_and_gradients(kw, dtype):
    """Gradients with respect to every parameter and the input, in float64 (float32: outputs)."""
    with jax.enable_x64(dtype == "float64"):
        layer = _layer(dtype, clip_eigs=True, step_rescale=0.5, **kw)
        impls, params = _modes(layer)
        check_equivalent(impls, params, _u(dtype=jnp.dtype(dtype)), grads=dtype == "float64")


def test_layer_state_mask_and_final_state_agree_across_modes(x64):
    layer = _layer()
    lengths = jnp.asarray([L, 5])
    mask = jnp.arange(L)[None, :] < lengths[:, None]
    state0 = layer.init_state(BATCH) + 0.3 - 0.1j
    impls, params = _modes(layer, return_state=True)
    check_equivalent(impls, params, _u(), mask, state0)


def test_layer_step_and_materialize_equal_forward(x64):
    layer = _layer(mode="sequential")
    x = _u()
    y, final = layer(x, return_state=True)
    assert y.shape == x.shape and layer.d_output == H
    M = layer.materialize(L)
    assert M.shape == (H, H, L, L)
    assert_close(y, jnp.einsum("ijts,bsj->bti", M, x))
    state = layer.init_state(BATCH)
    assert state.shape == (BATCH, P)
    ys = []
    for t in range(L):
        state, y_t = layer.step(state, x[:, t])
        ys.append(y_t)
    assert_close(y, jnp.stack(ys, axis=1))
    assert_close(final, state)


def test_layer_matches_kernel_loop(x64):
    """The layer is s5_ssm on its discretised parameters (ZOH, step_rescale applied)."""
    layer = _layer(bidirectional=True, step_rescale=2.0)
    Lambda = layer.Lambda_re[...] + 1j * layer.Lambda_im[...]
    step = 2.0 * jnp.exp(layer.log_step[...])
    args = (Lambda, as_complex(layer.B), as_complex(layer.C), layer.D[...], step, _u())
    assert_close(s5_ssm_naive(*args, bidirectional=True), layer(_u()))


def test_layer_state_carry_across_calls(x64):
    layer = _layer(mode="sequential")
    x = _u()
    y, final = layer(x, return_state=True)
    y1, s1 = layer(x[:, :6], return_state=True)
    y2, s2 = layer(x[:, 6:], state=s1, return_state=True)
    assert_close(y, jnp.concatenate([y1, y2], axis=1))
    assert_close(final, s2)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_mask_equals_unpadded_sequences(x64, bidirectional):
    """Padding never reaches valid outputs (either direction); padded outputs are zero."""
    layer = _layer(bidirectional=bidirectional, mode="sequential")
    x = _u(batch=3)
    lengths = [L, 6, 1]
    mask = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
    x_noisy = jnp.where(mask[..., None], x, 1e3)
    kw = {} if bidirectional else {"return_state": True}
    out = layer(x_noisy, mask=mask, **kw)
    y = out if bidirectional else out[0]
    for b, n in enumerate(lengths):
        out_b = layer(x[b : b + 1, :n], **kw)
        y_b = out_b if bidirectional else out_b[0]
        assert_close(y_b[0], y[b, :n])
        if not bidirectional:
            assert_close(out_b[1][0], out[1][b])
        assert float(jnp.max(jnp.abs(y[b, n:]), initial=0.0)) == 0.0


def test_conj_sym_halves_equal_full_spectrum(x64):
    """HiPPO-N with conjugate symmetry is the same real system as its full spectrum.

    Same keys draw the same real B and C; giving each conjugate pair the same step makes the
    two layers compute the same function (2·Re over halves = Re over both halves).
    """
    half = _layer(blocks=1, d_state=P, C_init="lecun_normal")
    full = _layer(blocks=1, d_state=P, conj_sym=False, C_init="lecun_normal")
    full.log_step[...] = jnp.concatenate([half.log_step[...], half.log_step[...][::-1]])
    assert_close(half(_u()), full(_u()))


def test_legs_init_is_block_diagonal_hippo_n(x64):
    layer = S5(H, 16, blocks=2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    expected = hippo.nplr("legs", 8).Lambda
    Lambda = np.asarray(layer.Lambda_re[...]) + 1j * np.asarray(layer.Lambda_im[...])
    np.testing.assert_allclose(Lambda, np.tile(expected, 2), rtol=1e-12)
    np.testing.assert_allclose(Lambda.real, -0.5, rtol=1e-12)
    dt = np.exp(np.asarray(layer.log_step[...]))
    assert dt.shape == (8,) and np.all((dt >= 1e-3) & (dt <= 1e-1))
    assert layer.B.shape == (8, H, 2) and layer.C.shape == (H, 8, 2)


def test_parameter_groups():
    layer = _layer("float32", bidirectional=True)
    assert isinstance(layer.Lambda_re, SSMParam) and isinstance(layer.B, SSMParam)
    assert isinstance(layer.log_step, SSMParam) and not isinstance(layer.C, SSMParam)
    assert layer.C.shape == (H, 2 * P, 2)  # two directions × 4 stored modes
    labels = jax.tree.leaves(param_labels(layer))
    assert sorted(set(labels)) == ["default", "ssm"] and labels.count("ssm") == 4


def test_dt_global_moves_log_step_to_the_default_group():
    """``dt_global`` (lindermanlab/S5's ``--dt_global``) only relabels Δ: ``log_step`` is a
    plain Param (global learning rate and weight decay), the values and outputs unchanged."""
    base, glob = _layer("float32"), _layer("float32", dt_global=True)
    assert not isinstance(glob.log_step, SSMParam) and isinstance(glob.log_step, nnx.Param)
    np.testing.assert_array_equal(np.asarray(base.log_step[...]), np.asarray(glob.log_step[...]))
    labels = param_labels(glob)
    assert labels["log_step"] == "default" and labels["B"] == "ssm"
    x = _u(dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(base(x)), np.asarray(glob(x)))


def test_force_neg_uses_minus_abs_of_the_real_parts(x64):
    """``force_neg`` (S5-PTD): the layer runs with ``Re Λ ← −|Re Λ|`` whatever is stored."""
    forced = _layer(force_neg=True)
    forced.Lambda_re[...] = jnp.abs(forced.Lambda_re[...]) * jnp.where(
        jnp.arange(forced.d_stored) % 2 == 0, 1.0, -1.0
    )
    ref = _layer()
    ref.Lambda_re[...] = -jnp.abs(forced.Lambda_re[...])
    x = _u()
    assert_close(ref(x), forced(x))


def test_auto_mode_rule():
    assert auto_mode(1, "cpu") == "sequential" and auto_mode(100_000, "cpu") == "sequential"
    assert auto_mode(1, "gpu") == "parallel" and auto_mode(100_000, "tpu") == "parallel"
    with ssmix.auto_backend("gpu"):
        assert auto_mode(7) == "parallel" and auto_method() == "parallel"
    with ssmix.auto_backend("cpu"):
        assert auto_mode(7) == "sequential" and auto_method() == "associative"
    assert set(MODES) == {"auto", *RUN_MODES}
    with pytest.raises(ValueError, match="L must be a positive integer"):
        auto_mode(0)
    with pytest.raises(ValueError, match="backend must be one of"):
        auto_mode(7, "cuda")


ACCELERATOR_LAYERS = {
    "S5": lambda: _layer("float32", chunk_size=64),
    "S5 bidirectional": lambda: _layer("float32", bidirectional=True, chunk_size=64),
    "S5PTD": lambda: S5PTD(H, P, rngs=nnx.Rngs(0)),  # a block of the packaged PTD table
}


def _train_step(layer):
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(jnp.square(nnx.merge(graphdef, params)(x)))

    return jax.grad(loss, argnums=(0, 1)), params


@pytest.mark.parametrize("name", list(ACCELERATOR_LAYERS))
def test_accelerator_rules_default_has_no_loop(name):
    """``mode="auto"`` under the GPU / TPU rules: forward + backward at B = 2, L = 16384 trace
    (nothing runs) to no loop and no array over 256 MiB; the CPU rules keep the sequential
    scan. Small widths here; ``benchmarks/accelerator.py`` shows the default widths."""
    grad, params = _train_step(ACCELERATOR_LAYERS[name]())
    x = jax.ShapeDtypeStruct((2, 16384, H), jnp.float32)
    for backend in ("gpu", "tpu"):
        with ssmix.auto_backend(backend):
            stats = trace_stats(grad, params, x)
        assert stats.loop_iterations == 0 and stats.unknown_loops == 0, stats.loops
        assert stats.largest_bytes <= 256 * 2**20, stats.largest
    with ssmix.auto_backend("cpu"):
        stats = trace_stats(grad, params, jax.ShapeDtypeStruct((2, 64, H), jnp.float32))
    assert stats.loop_iterations > 64


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_form_lowers(platform):
    """The bidirectional layer's GPU-rules training step lowers for the accelerators."""
    grad, params = _train_step(_layer("float32", bidirectional=True))
    with ssmix.auto_backend("gpu"):
        traced = jax.jit(grad).trace(params, _u(dtype=jnp.float32))
    assert "stablehlo.while" not in traced.lower(lowering_platforms=(platform,)).as_text()


def test_layer_option_errors():
    cases = [
        ({"mode": "fft"}, "mode must be one of"),
        ({"init": "lin"}, "init must be one of"),
        ({"C_init": "zeros"}, "C_init must be one of"),
        ({"disc": "dss"}, "disc must be one of"),
        ({"blocks": 3}, "blocks of even size"),
        ({"blocks": 8}, "blocks of even size"),
        ({"step_rescale": 0.0}, "step_rescale must be a positive number"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            S5(H, D_STATE, rngs=nnx.Rngs(0), **kw)
    with pytest.raises(TypeError, match="conj_sym must be a bool"):
        S5(H, D_STATE, conj_sym=1, rngs=nnx.Rngs(0))
    for flag in ("dt_global", "force_neg"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            S5(H, D_STATE, rngs=nnx.Rngs(0), **{flag: 1})


def test_layer_bad_input_raises():
    layer = _layer("float32")
    x = _u(dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 3\)"):
        layer(x[0])
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 3\)"):
        layer(x[..., :2])
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(x, mask=jnp.ones((BATCH, L + 1), bool))
    with pytest.raises(ValueError, match="state must have shape"):
        layer(x, state=jnp.zeros((BATCH, 3), jnp.complex64))
    with pytest.raises(ValueError, match="x_t must have shape"):
        layer.step(layer.init_state(BATCH), x[:, 0, :2])
    bi = _layer("float32", bidirectional=True)
    with pytest.raises(ValueError, match="no causal state"):
        bi(x, return_state=True)
    with pytest.raises(ValueError, match="cannot be stepped"):
        bi.step(bi.init_state(BATCH), x[:, 0])
