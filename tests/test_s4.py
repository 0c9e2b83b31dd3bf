"""S4 and S4D layers: every mode equals every other; stepping, state carry, masks, errors.

All layers here share H = 3, N = 8 and a few lengths, and run eagerly: JAX caches each
primitive per shape, so after the first configuration the others cost little to run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmix
from ssmix.kernels import cauchy as Cy
from ssmix.layers import S4, S4D
from ssmix.layers.base import SSMParam
from ssmix.layers.s4 import auto_kernel, auto_mode
from ssmix.layers.s4d import S4D_INITS
from ssmix.testing import assert_close, check_equivalent, trace_stats

H, N, BATCH, L, T = 3, 8, 2, 37, 8  # L odd and not a multiple of the chunk length T
RUN_MODES = ("materialized", "fft", "chunked", "scan")


def _layer(cls, dtype="float32", **kw):
    return cls(H, N, chunk_size=T, param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), **kw)


def _input(length=L, dtype="float32", seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(batch, length, H)), jnp.dtype(dtype))


def _pure(layer, mode):
    """``f(params, x)`` running ``layer`` in ``mode`` (the mode is static, in the graphdef)."""
    layer.mode = mode
    graphdef, params = nnx.split(layer)
    return lambda p, x: nnx.merge(graphdef, p)(x), params


def _modes(layer, jit=False, cauchy=True):
    """Every mode; for S4 also the ``"fft"`` mode with the Cauchy kernel (default: powers)."""
    impls = {}
    for mode in RUN_MODES:
        fn, params = _pure(layer, mode)
        impls[mode] = jax.jit(fn) if jit else fn
    if cauchy and isinstance(layer, S4):
        layer.kernel = "cauchy"
        fn, params = _pure(layer, "fft")
        impls["fft-cauchy"] = jax.jit(fn) if jit else fn
        layer.kernel = "auto"
    return impls, params


@pytest.mark.parametrize(
    "cls, dtype, kw",
    [
        (S4D, "float32", {}),
        (S4D, "float64", {"bidirectional": True, "channels": 2, "init": "lin"}),
        (S4, "float64", {}),
        (S4, "float32", {"bidirectional": True}),
    ],
    ids=["s4d-f32", "s4d-f64-bidir-ch2", "s4-f64", "s4-f32-bidir"],
)
def test_modes_agree_outputs_and_gradients(cls, dtype, kw):
    with jax.enable_x64(dtype == "float64"):
        layer = _layer(cls, dtype, **kw)
        # Jitted: one compile per mode is cheaper than eager dispatch under grad.
        # The Cauchy kernel joins once per layer class (float64, causal) to bound the time.
        impls, params = _modes(layer, jit=True, cauchy=dtype == "float64")
        check_equivalent(impls, params, _input(dtype=dtype))


INIT_CASES = [(S4D, {"init": k}) for k in S4D_INITS if k != "legs"] + [
    (S4D, {"disc": "bilinear"}),
    (S4D, {"disc": "dss", "l_max": 64}),
    (S4, {"init": "lagt"}),
    (S4, {"init": "fout"}),
    (S4, {"init": "legt", "rank": 3}),
]


@pytest.mark.parametrize(
    "cls, kw",
    INIT_CASES,
    ids=[f"{c.__name__}-{'-'.join(map(str, k.values()))}" for c, k in INIT_CASES],
)
def test_every_init_and_disc_agrees_across_modes(cls, kw):
    layer = _layer(cls, **kw)
    impls, params = _modes(layer)
    check_equivalent(impls, params, _input(), grads=False)


@pytest.mark.parametrize("cls", [S4D, S4])
def test_step_and_materialize_equal_forward(x64, cls):
    layer = _layer(cls, "float64", channels=2)
    x = _input(dtype="float64")
    y = layer(x)
    assert y.shape == (BATCH, L, 2 * H) and layer.d_output == 2 * H
    M = layer.materialize(L)
    assert M.shape == (2, H, L, L)
    assert_close(y, jnp.einsum("chts,bsh->btch", M, x).reshape(BATCH, L, 2 * H))
    state = layer.init_state(BATCH)
    ys = []
    for t in range(L):
        state, y_t = layer.step(state, x[:, t])
        ys.append(y_t)
    assert_close(y, jnp.stack(ys, axis=1))
    _, final = layer(x, return_state=True)
    assert_close(final, state)


@pytest.mark.parametrize("cls", [S4D, S4])
@pytest.mark.parametrize("mode", RUN_MODES)
def test_state_carry_across_calls(x64, cls, mode):
    """Forward on [x1; x2] equals forward on x1, then on x2 from the returned state."""
    layer = _layer(cls, "float64", mode=mode)
    x = _input(dtype="float64")
    y, final = layer(x, return_state=True)
    split = 13  # not a multiple of the chunk length
    y1, s1 = layer(x[:, :split], return_state=True)
    y2, s2 = layer(x[:, split:], state=s1, return_state=True)
    assert_close(y, jnp.concatenate([y1, y2], axis=1))
    assert_close(final, s2)


@pytest.mark.parametrize("cls", [S4D, S4])
@pytest.mark.parametrize("mode", RUN_MODES)
def test_mask_equals_unpadded_sequences(x64, cls, mode):
    """A right-padded batch gives each sequence's own outputs, zeros after it, and its state."""
    layer = _layer(cls, "float64", mode=mode)
    x = _input(dtype="float64")
    lengths = [13, 1]  # lengths shared with other tests: their compiled primitives are reused
    mask = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
    x_noisy = jnp.where(mask[..., None], x, 1e3)  # garbage in the padding must not leak
    state0 = layer.init_state(BATCH) + 0.1 - 0.2j
    y, final = layer(x_noisy, mask=mask, state=state0, return_state=True)
    for b, n in enumerate(lengths):
        y_n, s_n = layer(x[:, :n], state=state0, return_state=True)
        assert_close(y_n[b], y[b, :n])
        assert_close(s_n[b], final[b])
        assert float(jnp.max(jnp.abs(y[b, n:]), initial=0.0)) == 0.0


@pytest.mark.parametrize("cls", [S4D, S4])
def test_bidirectional_mask_ignores_padding(x64, cls):
    layer = _layer(cls, "float64", bidirectional=True, mode="chunked")
    x = _input(dtype="float64")
    mask = jnp.arange(L)[None, :] < jnp.asarray([L, 13])[:, None]
    y = layer(jnp.where(mask[..., None], x, -7.0), mask=mask)
    assert_close(layer(x[:, :13])[1], y[1, :13])


@pytest.mark.parametrize("cls", [S4D, S4])
def test_length_one(cls):
    layer = _layer(cls)
    impls, params = _modes(layer, cauchy=False)
    check_equivalent(impls, params, _input(length=1), grads=False)


@pytest.mark.parametrize("kernel", ["powers", "cauchy"])
def test_s4_any_length_matches_dense_reference(x64, kernel):
    """One S4 layer at lengths 5, 16 and 40 equals the dense bilinear system at each."""
    layer = _layer(S4, "float64", mode="fft", kernel=kernel)
    lam, P, B, dt = layer._system(jnp.float64)
    C = layer._output_rows(jnp.float64)[0]
    for length in (5, 16, 40):
        x = _input(length, "float64")
        K = Cy.dplr_ssm_kernel_naive(lam, P, B, C, dt, length)[0]  # (H, L)
        y_ref = jnp.einsum("hts,bsh->bth", jnp.tril(_toeplitz(K)), x) + layer.D[0] * x
        assert_close(y_ref, layer(x))


def _toeplitz(k):
    idx = jnp.arange(k.shape[-1])
    return k[:, jnp.abs(idx[:, None] - idx[None, :])]


def test_parameter_groups_and_storage():
    for layer in (_layer(S4D), _layer(S4)):
        ssm = nnx.state(layer, SSMParam)
        names = {str(path[0]) for path, _ in nnx.to_flat_state(ssm)}
        expected = {"A_re_log", "A_im", "B", "log_dt"} | ({"P"} if isinstance(layer, S4) else set())
        assert names == expected
        params = nnx.state(layer, nnx.Param)
        assert all(
            jnp.isrealobj(v.get_value() if hasattr(v, "get_value") else v)
            for v in jax.tree.leaves(params)
        )
        assert layer.C[...].shape == (1, H, N // 2, 2) and layer.D[...].shape == (1, H)
        assert bool(jnp.all(jnp.exp(layer.A_re_log[...]) > 0))


def test_auto_mode_rule():
    for backend in (None, "cpu", "gpu", "tpu"):
        assert auto_mode(1, backend=backend) == auto_mode(16384, backend=backend) == "fft"
        assert auto_mode(2048, "s4", backend) == auto_mode(16384, "s4", backend) == "fft"
        assert auto_kernel(1, backend) == auto_kernel(16384, backend) == "powers"
    with pytest.raises(ValueError, match="layer"):
        auto_mode(8, "s5")
    with pytest.raises(ValueError, match="backend must be one of"):
        auto_mode(8, "s4", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        auto_kernel(8, "GPU")
    layer = _layer(S4D)
    assert layer.mode == "auto"
    x = _input()
    layer_ref = _layer(S4D, mode="fft")
    assert_close(layer_ref(x), layer(x))


@pytest.mark.parametrize("cls", [S4D, S4])
def test_bad_input_raises(cls):
    with pytest.raises(ValueError, match="d_state must be even"):
        cls(H, 7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        cls(H, N, mode="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init must be one of"):
        cls(H, N, init="hippo", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        cls(H, N, channels=0, rngs=nnx.Rngs(0))
    layer = _layer(cls)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 3\)"):
        layer(jnp.zeros((L, H)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 3\)"):
        layer(jnp.zeros((BATCH, L, H + 1)))
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(_input(), mask=jnp.ones((BATCH, L + 1), bool))
    with pytest.raises(ValueError, match="state must have shape"):
        layer(_input(), state=jnp.zeros((BATCH, H, N), jnp.complex64))
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 3\)"):
        layer.step(layer.init_state(BATCH), _input())
    bidir = _layer(cls, bidirectional=True)
    with pytest.raises(ValueError, match="no causal state"):
        bidir(_input(), return_state=True)
    with pytest.raises(ValueError, match="cannot be stepped"):
        bidir.step(bidir.init_state(BATCH), _input()[:, 0])


def test_option_errors():
    with pytest.raises(ValueError, match="disc must be one of"):
        S4D(H, N, disc="euler", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass l_max"):
        S4D(H, N, disc="dss", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="disc must be one of 'bilinear'"):
        S4(H, N, disc="zoh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank is too small|rank"):
        S4(H, N, init="legt", rank=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'powers', 'cauchy'"):
        S4(H, N, kernel="vandermonde", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", [S4D, S4])
def test_kernel_dropout(x64, cls):
    """drop_kernel zeroes taps of the fft kernel (the rest scaled by 1/(1 − p)) in training,
    is off in eval, needs rngs, and is refused by modes that never form the kernel."""
    layer = _layer(cls, "float64", drop_kernel=0.5, mode="fft")
    plain = _layer(cls, "float64", mode="fft")  # same seed: same parameters
    x = jnp.zeros((1, L, H), jnp.float64).at[0, 0].set(1.0)  # impulse: y − D·x is the kernel
    K = plain(x) - plain.D[0] * x
    layer.eval()
    assert_close(plain(x), layer(x))
    layer.train()
    with pytest.raises(ValueError, match="rngs"):
        layer(x)
    Kd = layer(x, rngs=nnx.Rngs(dropout=1)) - layer.D[0] * x
    dropped = np.isclose(np.asarray(Kd), 0.0, atol=1e-12)
    kept = np.isclose(np.asarray(Kd), 2 * np.asarray(K), rtol=1e-9, atol=1e-12)
    assert np.all(dropped | kept)
    assert 0.3 < dropped.mean() < 0.7
    Kd2 = layer(x, rngs=nnx.Rngs(dropout=2)) - layer.D[0] * x
    assert not np.allclose(np.asarray(Kd), np.asarray(Kd2))
    layer.mode = "chunked"
    with pytest.raises(ValueError, match="drop_kernel drops taps of the kernel"):
        layer(x, rngs=nnx.Rngs(dropout=1))
    with pytest.raises(ValueError, match=r"drop_kernel must be in \[0, 1\)"):
        cls(H, N, drop_kernel=1.0, rngs=nnx.Rngs(0))


def _under(backend, graphdef, **call):
    """``f(params, x)`` of the layer traced under ``backend``'s auto rules."""

    def run(params, x):
        with ssmix.auto_backend(backend):
            return nnx.merge(graphdef, params)(x, **call)

    return run


def test_s4_under_accelerator_rules_equals_cpu_rules(x64):
    """Bidirectional S4 with a mask: under the GPU rules (rows of the power kernel by
    doubling, block 8: 5 rows) the same outputs as under the CPU rules (a row scan, block 4:
    10 rows; the kernels' gradients are checked in tests/test_cauchy.py)."""
    graphdef, params = nnx.split(_layer(S4, "float64", bidirectional=True))
    mask = jnp.arange(L)[None, :] < jnp.asarray([L, 13])[:, None]
    impls = {b: jax.jit(_under(b, graphdef, mask=mask)) for b in ("cpu", "gpu")}
    check_equivalent(impls, params, _input(dtype="float64"), grads=False)


def _train_step_stats(layer, length, backend):
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(jnp.square(_under(backend, graphdef)(params, x)))

    x = jax.ShapeDtypeStruct((BATCH, length, H), jnp.float32)
    return trace_stats(jax.grad(loss, argnums=(0, 1)), params, x)


def test_accelerator_rules_have_no_loops():
    """Forward + backward at L = 16384 (traced, nothing runs): S4 with either kernel and
    bidirectional S4, S4D have no loop under the GPU / TPU rules (H = 3, N = 64: the Cauchy
    sums fit one block); under the CPU rules S4 scans its 128 rows each way."""
    long = 16384
    layers = [
        S4(H, 64, rngs=nnx.Rngs(0)),
        S4(H, 64, kernel="cauchy", rngs=nnx.Rngs(0)),
        S4(H, 64, bidirectional=True, rngs=nnx.Rngs(0)),
        S4D(H, 64, bidirectional=True, rngs=nnx.Rngs(0)),
    ]
    for layer in layers:
        for backend in ("gpu", "tpu"):
            stats = _train_step_stats(layer, long, backend)
            assert stats.loop_iterations == 0 and stats.unknown_loops == 0, (layer, stats)
    assert _train_step_stats(layers[0], long, "cpu").loop_iterations == 2 * 128


@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_s4_cauchy_lowers_for_accelerators(backend, platform):
    """The Cauchy-kernel S4 (the default's lowering is tests/test_accelerator.py's) lowers
    forward + backward under the accelerator rules."""
    graphdef, params = nnx.split(S4(H, N, kernel="cauchy", bidirectional=True, rngs=nnx.Rngs(0)))

    def loss(params, x):
        return jnp.sum(jnp.square(_under(backend, graphdef)(params, x)))

    x = jax.ShapeDtypeStruct((BATCH, L, H), jnp.float32)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    lowered = step.trace(params, x).lower(lowering_platforms=(platform,))
    assert "func.func public @main" in lowered.as_text()


def _tiled_full_layer(shared, cls, h, s, **kw):
    """A layer with one SSM per feature whose Λ / P / B are ``shared``'s, tiled so that
    feature ``f`` holds SSM ``f mod s``; Δ, C and D copied."""
    full = cls(h, N, chunk_size=T, param_dtype=jnp.float64, rngs=nnx.Rngs(1), **kw)
    for name in ("A_re_log", "A_im", "B", "P"):
        if hasattr(shared, name):
            value = getattr(shared, name)[...]
            tile = [1] * value.ndim
            tile[1 if name == "P" else 0] = h // s
            getattr(full, name)[...] = jnp.tile(value, tile)
    for name in ("log_dt", "C", "D"):
        getattr(full, name)[...] = getattr(shared, name)[...]
    return full


@pytest.mark.parametrize("cls", [S4D, S4])
def test_n_ssm_equals_a_full_layer_with_tiled_parameters(x64, cls):
    """``n_ssm = S``: Λ / P / B stored once per SSM ``(S, N/2)`` and Δ per feature, as
    state-spaces/s4; equal to a per-feature layer holding the tiled parameters in every mode
    (outputs, state in and out, right padding, stepping). The layer shapes are the file's
    (H = 3, so S = 1); the feature → SSM order (``h mod S``) is checked at H = 4, S = 2."""
    shared = cls(H, N, n_ssm=1, chunk_size=T, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert shared.n_ssm == 1
    assert shared.A_re_log.shape == shared.A_im.shape == (1, N // 2)
    assert shared.B.shape == (1, N // 2, 2) and shared.log_dt.shape == (H,)
    if cls is S4:
        assert shared.P.shape == (1, 1, N // 2, 2)
    full = _tiled_full_layer(shared, cls, H, 1)
    x = _input(dtype="float64")
    # The shapes of test_mask_equals_unpadded_sequences: their eager primitives are reused.
    mask = jnp.arange(L)[None, :] < jnp.asarray([13, 1])[:, None]
    state0 = shared.init_state(BATCH) + 0.1 - 0.2j
    for mode in RUN_MODES:
        shared.mode = full.mode = mode
        got = shared(x, mask, state=state0, return_state=True)
        ref = full(x, mask, state=state0, return_state=True)
        assert_close(ref, got, name=mode)
    state, ref_state = shared.init_state(BATCH), full.init_state(BATCH)
    for t in range(2):
        state, y_t = shared.step(state, x[:, t])
        ref_state, ref_t = full.step(ref_state, x[:, t])
        assert_close(ref_t, y_t, name=f"step {t}")
    assert_close(ref_state, state)

    # Feature h uses SSM h mod S (state-spaces/s4's repeat 't n -> (v t) n'): the discrete
    # systems of H = 4, S = 2 and of its tiled full layer are identical.
    shared = cls(4, N, n_ssm=2, chunk_size=T, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    full = _tiled_full_layer(shared, cls, 4, 2)
    for a, b in zip(shared._system(jnp.float64), full._system(jnp.float64), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("cls", [S4D, S4])
def test_n_ssm_default_is_one_ssm_per_feature(cls):
    """``n_ssm=None`` and ``n_ssm=H`` build the same layer as before the option existed:
    parameters ``(H, N/2)`` and identical outputs; ``n_ssm`` must divide ``H``."""
    default, explicit = _layer(cls), _layer(cls, n_ssm=H)
    assert default.n_ssm == H and default.A_re_log.shape == (H, N // 2)
    x = _input()
    np.testing.assert_array_equal(np.asarray(default(x)), np.asarray(explicit(x)))
    for a, b in zip(
        jax.tree.leaves(nnx.state(default)), jax.tree.leaves(nnx.state(explicit)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="n_ssm must divide d_model.*n_ssm=2, d_model=3"):
        _layer(cls, n_ssm=2)
    with pytest.raises(ValueError, match="n_ssm must be a positive integer"):
        _layer(cls, n_ssm=0)
