"""Bad input to the S4 family (S4, S4D, S5 and the PTD variants), issue 20: each probe that
once gave a silent wrong answer now raises a clear error or gives the right one.

Tiny shapes (H = 2, N = 4, L = 7) shared by every test, so that eager primitives compile once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.layers import S4, S4D, S4PTD, S5, S5PTD
from ssmix.testing import assert_close

H, N, BATCH, L = 2, 4, 2, 7

# Every mode of S4D and S5; S4 shares S4D's masking code (LTISSM), so one of its modes.
MODES = {
    "S4": ("fft",),
    "S4D": ("fft", "chunked", "scan", "materialized"),
    "S5": ("sequential", "associative", "chunked", "parallel", "materialized"),
}


def _make(name, dtype=jnp.float32, **kw):
    common = dict(param_dtype=dtype, rngs=nnx.Rngs(0), chunk_size=3, **kw)
    if name == "S4":
        return S4(H, N, **common)
    if name == "S4D":
        return S4D(H, N, **common)
    # PTD state sizes whose size-8 PTD system is in ssmix's packaged cache (no solver run).
    if name == "S4PTD":
        return S4PTD(H, 16, **common)
    if name == "S5PTD":
        return S5PTD(H, 8, **common)
    return S5(H, N, **common)


LAYERS = ("S4", "S4D", "S5", "S4PTD", "S5PTD")


def _x(dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(BATCH, L, H)), dtype)


@pytest.mark.parametrize("name", LAYERS)
def test_input_rule(name):
    """Integer input (would come back truncated) and float masks (0.3 counted as valid) are
    TypeErrors; length 0 is a ValueError; so is an unknown mode assigned after construction
    (it used to run the O(L²) path)."""
    layer = _make(name)
    x = _x()
    with pytest.raises(TypeError, match="x must be a floating-point array.*got int32"):
        layer(jnp.ones((BATCH, L, H), jnp.int32))
    with pytest.raises(TypeError, match="mask must be a boolean array.*got float32"):
        layer(x, mask=jnp.full((BATCH, L), 0.3, jnp.float32))
    with pytest.raises(ValueError, match=r"x must have a positive length.*\(2, 0, 2\)"):
        layer(jnp.zeros((BATCH, 0, H)))
    with pytest.raises(TypeError, match="x_t must be a floating-point array.*got int32"):
        layer.step(layer.init_state(BATCH), jnp.ones((BATCH, H), jnp.int32))
    layer.mode = "fast"
    with pytest.raises(ValueError, match="mode must be one of 'auto', .*; got 'fast'"):
        layer(x)


@pytest.mark.parametrize("name", ["S4D", "S5"])
def test_left_padding_and_holes_return_the_right_state(x64, name):
    """A left-padded mask (and one with a hole) with ``return_state=True`` used to return a
    wrong final state silently; now every mode returns the state right after the last valid
    position, padded inputs counting as zeros (NaN there included), with an incoming state.
    Both rows end valid, so the reference is the unmasked call on the zeroed input (right
    padding is tested in test_s4.py / test_s5.py; S4 shares S4D's code for both)."""
    layer = _make(name, jnp.float64)
    x = _x(jnp.float64)
    mask = jnp.asarray([[False, False, True, True, True, True, True],  # left padding
                        [True, False, True, True, False, True, True]])  # fmt: skip
    state0 = layer.init_state(BATCH) + (0.3 - 0.1j)
    layer.mode = MODES[name][-1]
    ref_y, ref_state = layer(jnp.where(mask[..., None], x, 0.0), state=state0, return_state=True)
    ref_y = jnp.where(mask[..., None], ref_y, 0.0)
    poisoned = jnp.where(mask[..., None], x, jnp.nan)
    for mode in MODES[name]:
        layer.mode = mode
        y, final = layer(poisoned, mask=mask, state=state0, return_state=True)
        assert_close(ref_y, y, name=f"{mode} outputs")
        assert_close(ref_state, final, name=f"{mode} state")


@pytest.mark.parametrize("name", ["S4", "S4D", "S5"])
def test_padded_nan_never_reaches_a_valid_output(name):
    """NaN / inf at padded positions (last and inner) leave every valid output finite and
    equal to the output with zeros there, causal and bidirectional, in every mode."""
    x = _x()
    mask = jnp.asarray([[True] * 6 + [False], [True, True, False] + [True] * 4])
    bad = jnp.where(mask[..., None], x, jnp.asarray([jnp.nan, jnp.inf]))
    clean = jnp.where(mask[..., None], x, 0.0)
    both, mask2 = jnp.concatenate([bad, clean]), jnp.concatenate([mask, mask])
    for bidirectional in (False, True):
        layer = _make(name, bidirectional=bidirectional)
        for mode in MODES[name]:
            layer.mode = mode
            got, ref = jnp.split(layer(both, mask=mask2), 2)
            assert bool(jnp.all(jnp.isfinite(got))), (mode, bidirectional)
            np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))


@pytest.mark.parametrize(
    "name, modes", [("S4", ("scan",)), ("S4D", ("scan",)), ("S5", ("sequential", "associative"))]
)
def test_unmasked_future_nan_stays_in_the_future_of_causal_scans(name, modes):
    """Without a mask, a NaN at the last position reaches no earlier output in the modes that
    run the recurrence (the FFT, closed-form chunk and materialized forms multiply it by zero
    weights, 0·NaN: documented in the layer modules)."""
    layer = _make(name)
    x = _x()
    bad = x.at[:, -1].set(jnp.nan)
    for mode in modes:
        layer.mode = mode
        got, ref = layer(bad), layer(x)
        np.testing.assert_array_equal(np.asarray(ref[:, :-1]), np.asarray(got[:, :-1]))
        assert bool(jnp.all(jnp.isnan(got[:, -1])))


def test_checks_hold_under_jit():
    """The input rule reads only dtypes and shapes, so it raises under ``jit`` too; the
    masked state needs no concrete mask (left padding is right under ``jit``)."""
    layer = _make("S4D")
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x, mask):
        return nnx.merge(graphdef, state)(x, mask=mask, return_state=True)

    with pytest.raises(TypeError, match="mask must be a boolean array"):
        run(state, _x(), jnp.ones((BATCH, L), jnp.float32))
    mask = jnp.arange(L)[None, :] >= jnp.asarray([2, 0])[:, None]
    _, final = run(state, _x(), mask)
    _, eager = layer(_x(), mask=mask, return_state=True)
    assert_close(eager, final)
