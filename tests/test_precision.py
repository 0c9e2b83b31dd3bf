"""The precision policy of ssmix.layers.base, layer by layer.

bfloat16 in -> bfloat16 out and close to the float32 output; finite bfloat16 gradients;
``dtype=jnp.bfloat16`` on float32 inputs still returns float32; float64 in (x64) -> float64
out; ``param_dtype=bfloat16`` on a complex SSM is a ValueError that names ``dtype=``.
Each layer's bfloat16 and float32 passes are one compiled function; dtype-only checks are
traced with ``jax.eval_shape`` (no compilation).

Tolerances (``assert_close`` bounds every slice: each batch item, position and feature).
bfloat16 keeps 8 significant bits, a relative rounding of at most 2⁻⁹ ≈ 0.002 per value.

- S4, S4D, S5 and the PTD variants round twice in bfloat16: the input and the output (their
  SSM runs in float32). Measured worst slice 0.33–0.43 %; ``ratio = 2⁻⁶`` (1.6 %, about 8
  roundings) leaves 3.6× for the condition of the mixing matrix on other random inputs.
- Hydra, MatrixMixer, ShortConv and GatedRMSNorm compute the projections, convolution and
  gates in bfloat16: up to six chained roundings, some amplified by a gate's slope. Measured
  worst slice 1.2–1.5 % (ShortConv 0.6 %, GatedRMSNorm 0.75 %); ``ratio = 2⁻⁵`` (3.1 %) is
  twice the worst measured.
- ``atol = 2⁻⁸``: a slice whose reference is near zero (outputs are O(1)) is held to the
  absolute rounding of an O(1) value.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ssmix.layers import S4, S4D, S4PTD, S5, S5PTD, Hydra, MatrixMixer
from ssmix.layers.mixers import GatedRMSNorm, ShortConv
from ssmix.testing import assert_close

B, L, H, N = 2, 33, 8, 16
SSM_RATIO = 2.0**-6
GATED_RATIO = 2.0**-5
ATOL = 2.0**-8


def _hydra(**kw):
    return Hydra(H, d_state=4, headdim=4, d_conv=3, **kw)


def _mixer(kind, **kw):
    return MatrixMixer(H, kind, max_len=L, headdim=4, qk_dim=4, d_conv=3, **kw)


# Compile time is what these tests cost, so each layer runs one cheap-to-compile
# configuration: the policy (casts at the layer's edges and around its core) is the same in
# every mode and kind. S4 forms its kernel by Cauchy sums (the blocked powers compile 2.5×
# longer), MatrixMixer is the FFT "toeplitz" kind (the FFT has no bfloat16 form: its core
# must be float32). Layers are built once (float32 parameters) and shared by the tests.


def _call(layer, x):
    """The layer applied to ``x (B, L, H)``; GatedRMSNorm gets the reversed features as gate."""
    if isinstance(layer, GatedRMSNorm):
        return layer(x, x[..., ::-1])
    return layer(x)


# name -> (factory(**kwargs, rngs=...) -> layer, ratio)
LAYERS = {
    "S4": (lambda **kw: S4(H, N, kernel="cauchy", **kw), SSM_RATIO),
    "S4D": (lambda **kw: S4D(H, N, **kw), SSM_RATIO),
    "S5": (lambda **kw: S5(H, N, **kw), SSM_RATIO),
    "Hydra": (lambda **kw: _hydra(**kw), GATED_RATIO),
    "MatrixMixer": (lambda **kw: _mixer("toeplitz", **kw), GATED_RATIO),
    "ShortConv": (lambda **kw: ShortConv(H, 3, **kw), GATED_RATIO),
    "GatedRMSNorm": (lambda **kw: GatedRMSNorm(H, **kw), GATED_RATIO),
}
# S4PTD and S5PTD build S4D and S5 layers (another initialisation of the same code): their
# construction-time checks and output dtypes are tested, their values are S4D's and S5's.
FACTORIES = {
    **{name: factory for name, (factory, _) in LAYERS.items()},
    "S4PTD": lambda **kw: S4PTD(H, N, **kw),
    "S5PTD": lambda **kw: S5PTD(H, 8, **kw),
}


@functools.cache
def _layer(name, dtype=None):
    """The layer ``name`` with ``dtype``, built once (never mutated by these tests)."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    return FACTORIES[name](rngs=nnx.Rngs(0), **kwargs)


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (B, L, H)).astype(dtype)


def _run(name):
    """One compiled function per layer, on one float32 input ``x``: the plain layer's output
    and parameter gradients on ``x`` in bfloat16, its output on ``x``, and the output of the
    same layer (same parameters) built with ``dtype=jnp.bfloat16`` on ``x``."""
    graphdef, state = nnx.split(_layer(name))
    graphdef16, state16 = nnx.split(_layer(name, jnp.bfloat16))
    assert_close(state, state16, exact=True)
    cot = jax.random.normal(jax.random.key(2), (B, L, H))

    @jax.jit
    def run(state, x32):
        def loss(state, x):
            y = _call(nnx.merge(graphdef, state), x)
            return jnp.sum(y.astype(jnp.float32) * cot), y

        (_, y16), g16 = jax.value_and_grad(loss, has_aux=True)(state, x32.astype(jnp.bfloat16))
        y32 = _call(nnx.merge(graphdef, state), x32)
        return y16, g16, y32, _call(nnx.merge(graphdef16, state), x32)

    return run(state, _x())


@pytest.mark.parametrize("name", list(LAYERS))
def test_bfloat16_outputs_and_gradients(name):
    """bfloat16 in -> bfloat16 out, close to the float32 output, finite nonzero gradients;
    ``dtype=bfloat16`` on a float32 input -> float32 out, the bfloat16 computation up to the
    final rounding (2⁻⁹ relative: bound 2⁻⁸)."""
    _, ratio = LAYERS[name]
    y16, g16, y32, y_dt = _run(name)
    assert y16.dtype == jnp.bfloat16
    assert y32.dtype == jnp.float32
    assert_close(y32, y16, ratio=ratio, atol=ATOL, name=name)
    leaves = jax.tree.leaves(g16)
    assert leaves
    for leaf in leaves:
        assert bool(jnp.all(jnp.isfinite(leaf))), name
    assert any(bool(jnp.any(leaf != 0)) for leaf in leaves), name
    assert y_dt.dtype == jnp.float32
    assert_close(y16, y_dt, ratio=2.0**-8, atol=ATOL, name=f"{name}(dtype=bfloat16)")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_float64_in_float64_out(name):
    """float64 in (x64) -> float64 out, with and without ``dtype=bfloat16``; S4PTD and S5PTD
    also for bfloat16 and float32 (traced only: the values are checked above and, in float64,
    by each layer's own tests)."""
    cases = [(None, jnp.float64), (jnp.bfloat16, jnp.float64)]
    if name.endswith("PTD"):
        cases += [(None, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]
    for layer_dtype, dtype in cases:
        layer = _layer(name, layer_dtype)
        with jax.enable_x64(True):
            x = jax.ShapeDtypeStruct((B, L, H), dtype)
            out = jax.eval_shape(lambda x: _call(layer, x), x)  # noqa: B023
        assert out.dtype == dtype, (name, layer_dtype, dtype)
        assert out.shape == (B, L, H)


@pytest.mark.parametrize("cls", [S4D, S5])
def test_float64_parameters_under_x64(cls, x64):
    """float64 storage, and still the input's dtype out (built and traced abstractly)."""
    layer = nnx.eval_shape(lambda: cls(H, N, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float64)}
    for dtype in (jnp.float64, jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct((B, L, H), dtype)
        out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)
        assert out.dtype == dtype


@pytest.mark.parametrize("cls", [S4, S4D, S5, S4PTD, S5PTD])
@pytest.mark.parametrize("param_dtype", ["bfloat16", jnp.float16])
def test_half_precision_complex_parameters_are_refused(cls, param_dtype):
    half = jnp.dtype(param_dtype).name
    with pytest.raises(
        ValueError,
        match=rf"param_dtype={half} cannot store the complex SSM parameters .*no complex "
        rf"{half}.*Keep param_dtype=float32 \(or float64\) and pass dtype=jnp\.{half}",
    ):
        cls(H, 8, param_dtype=param_dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", [S4D, S5])
def test_other_parameter_dtypes_are_refused(cls):
    with pytest.raises(ValueError, match="param_dtype must be float32 or float64; got int32"):
        cls(H, 8, param_dtype=jnp.int32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="param_dtype must be float32 or float64; got 'real'"):
        cls(H, 8, param_dtype="real", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["S4", "S5", "Hydra", "MatrixMixer", "ShortConv"])
def test_non_floating_dtype_is_refused(name):
    factory = FACTORIES[name]
    msg = r"dtype must be None or a floating dtype \(bfloat16, float16, float32, float64\)"
    with pytest.raises(ValueError, match=msg + "; got int32"):
        factory(dtype=jnp.int32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=msg + "; got complex64"):
        factory(dtype=jnp.complex64, rngs=nnx.Rngs(0))


def test_integer_input_is_refused_by_conv_and_norm():
    xi = jnp.ones((B, L, H), jnp.int32)
    with pytest.raises(TypeError, match="x must be a floating-point array .*got int32"):
        ShortConv(H, 3, rngs=nnx.Rngs(0))(xi)
    with pytest.raises(TypeError, match="y must be a floating-point array .*got int32"):
        GatedRMSNorm(H)(xi, xi.astype(jnp.float32))
