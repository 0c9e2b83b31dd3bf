"""Packed sequences (``segment_ids``) in the S4-family layers: S4D, S4-PTD, S4, S5, S5-PTD.

Every supported mode, causal and bidirectional, against every segment run alone (float64):
the segments of the packed rows become rows of their own (right-padded, masked) run through the
unpacked ``"materialized"`` mode (whose mask path, not its segment masking, is the reference
for the packed ``"materialized"`` mode too), with the incoming state in each row's first
segment and the returned state the last segment's; packed rows with right padding (whose ids
change inside the padding); ``"fft"`` / ``"auto"`` tracing to the chunked program; gradients
for one mode per layer; input validation. One jitted program per layer for all its modes, one
per gradient check, compiled at XLA's lowest optimisation level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.layers import S4, S4D, S5
from ssmix.layers.ptd import S4PTD, S5PTD
from ssmix.layers.s5 import auto_mode as s5_auto_mode
from ssmix.testing import assert_close

H, N, L, CHUNK = 4, 4, 13, 4
# Row 0: segments [0, 4) [4, 5) [5, 8) [8, 13): boundaries on chunk edges (4, 8), inside a
# chunk (5), a segment of length 1. Row 1: [0, 1) [1, 7) [7, 13) with repeated unsorted ids.
IDS = np.array([[0] * 4 + [1] + [2] * 3 + [3] * 5, [5] + [6] * 6 + [5] * 6], np.int32)
# With right padding: row 0 valid up to 11 (its ids change inside the padding), row 1 full.
LENGTHS = np.array([11, 13])
IDS_PAD = IDS.copy()
IDS_PAD[0, 11:] = 9
MASK = np.arange(L)[None, :] < LENGTHS[:, None]


def _layout(ids, lengths):
    """Every segment (cut to the valid length) as a row of its own, at the start, right-padded.

    Returns numpy ``rows, times, valid (K, L)``, ``first (K,)``, ``back_k, back_pos (2, L)``
    (where each packed position's output is) and ``last_k (2,)``."""
    rows, times, valid, first = [], [], [], []
    back_k = np.zeros(ids.shape, np.int32)
    back_pos = np.zeros(ids.shape, np.int32)
    last_k = np.zeros(ids.shape[0], np.int32)
    for r, row in enumerate(ids):
        n = lengths[r]
        cuts = [0] + [t for t in range(1, n) if row[t] != row[t - 1]] + [n]
        for j, (s0, s1) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            k = len(rows)
            t_idx = np.zeros(L, np.int32)
            t_idx[: s1 - s0] = np.arange(s0, s1)
            rows.append(r)
            times.append(t_idx)
            valid.append(np.arange(L) < s1 - s0)
            first.append(j == 0)
            back_k[r, s0:s1] = k
            back_pos[r, s0:s1] = np.arange(s1 - s0)
            last_k[r] = k
    return (
        np.array(rows),
        np.array(times),
        np.array(valid),
        np.array(first),
        back_k,
        back_pos,
        last_k,
    )


def _per_segment(layer, x, x0, ids, lengths, causal):
    """Outputs (and, causal, final states) of every segment run alone through ``layer``."""
    rows, times, valid, first, back_k, back_pos, last_k = _layout(ids, lengths)
    xs = jnp.where(valid[..., None], x[rows[:, None], times], 0)
    if not causal:
        y = layer(xs, mask=jnp.asarray(valid))
        return y[back_k, back_pos]
    init = x0[rows] * first.reshape((-1,) + (1,) * (x0.ndim - 1))
    y, final = layer(xs, mask=jnp.asarray(valid), state=init, return_state=True)
    return y[back_k, back_pos], final[last_k]


def _with_mode(layer, mode):
    layer = nnx.clone(layer)
    layer.mode = mode
    return layer


def _zero_padding(y):
    return jnp.where(jnp.asarray(MASK)[..., None], y, 0)


def _run(f, *args):
    """``jax.jit(f)(*args)`` compiled at XLA's lowest CPU optimisation level: these programs
    run once on tiny shapes, so compiling is all their cost."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(f).lower(*args).compile(compiler_options=options)(*args)


def _inputs(layer):
    kx, kr, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, L, H))
    x0 = layer.init_state(2)
    x0 = x0 + (jax.random.normal(kr, x0.shape) + 1j * jax.random.normal(ki, x0.shape))
    return x, x0.astype(layer.init_state(1).dtype)


def _check_modes(make, modes, light_modes=()):
    """Packed == per segment for every mode of the layers ``make(bidirectional)``, in one
    program: causal with a state in and out, bidirectional, and both right-padded (only the
    first two for ``light_modes``). The reference runs every segment alone through the
    unpacked ``"materialized"`` mode."""
    causal, bidir = make(False), make(True)
    x, x0 = _inputs(causal)
    lengths = np.full(2, L)
    mask, ids, ids_pad = jnp.asarray(MASK), jnp.asarray(IDS), jnp.asarray(IDS_PAD)

    def calls(c, b, packed, full=True):
        if packed:
            out = [c(x, state=x0, return_state=True, segment_ids=ids), b(x, segment_ids=ids)]
            if full:
                out.append(c(x, mask=mask, state=x0, return_state=True, segment_ids=ids_pad))
                out.append(b(x, mask=mask, segment_ids=ids_pad))
            return out
        out = [_per_segment(c, x, x0, IDS, lengths, True)]
        out.append(_per_segment(b, x, x0, IDS, lengths, False))
        if full:
            y, final = _per_segment(c, x, x0, IDS_PAD, LENGTHS, True)
            out.append((_zero_padding(y), final))
            out.append(_zero_padding(_per_segment(b, x, x0, IDS_PAD, LENGTHS, False)))
        return out

    def program(x, x0):
        got = {
            "ref": calls(
                _with_mode(causal, "materialized"), _with_mode(bidir, "materialized"), False
            )
        }
        for mode in modes:
            got[mode] = calls(_with_mode(causal, mode), _with_mode(bidir, mode), True)
        for mode in light_modes:
            got[mode] = calls(_with_mode(causal, mode), _with_mode(bidir, mode), True, False)
        return got

    got = _run(program, x, x0)
    names = ["causal", "bidirectional", "causal, padded", "bidirectional, padded"]
    for mode in (*modes, *light_modes):
        for name, ref, out in zip(names[: len(got[mode])], got["ref"], got[mode], strict=False):
            assert_close(ref, out, name=f"{mode} {name}")


def _same_program(layer, mode_a, mode_b):
    """The packed call traces to the same program in ``mode_a`` as in ``mode_b``."""
    x, x0 = _inputs(layer)
    ids = jnp.asarray(IDS)

    def trace(mode):
        lay = _with_mode(layer, mode)
        return str(jax.make_jaxpr(lambda x: lay(x, segment_ids=ids))(x))

    assert trace(mode_a) == trace(mode_b)


def _check_grads(layer, mode):
    """Gradients (input, incoming state, parameters) of the packed layer in ``mode``, with a
    state in and out, against every segment run alone (``"materialized"`` mode)."""
    x, x0 = _inputs(layer)
    cot = jax.random.normal(jax.random.PRNGKey(1), (2, L, layer.d_output))
    graph, params = nnx.split(_with_mode(layer, mode))
    graph_ref, _ = nnx.split(_with_mode(layer, "materialized"))
    lengths = np.full(2, L)

    def loss_packed(params, x, x0):
        y, s = nnx.merge(graph, params)(x, state=x0, return_state=True, segment_ids=IDS)
        return jnp.sum(y * cot) + jnp.sum(jnp.abs(s) ** 2)

    def loss_ref(params, x, x0):
        y, s = _per_segment(nnx.merge(graph_ref, params), x, x0, IDS, lengths, True)
        return jnp.sum(y * cot) + jnp.sum(jnp.abs(s) ** 2)

    def program(params, x, x0):
        return [jax.grad(f, argnums=(0, 1, 2))(params, x, x0) for f in (loss_ref, loss_packed)]

    ref, got = _run(program, params, x, x0)
    assert_close(ref, got, name=f"{mode} gradients")


def _maker(cls):
    """``make(bidirectional, mode="chunked")``: a float64 ``cls`` layer of this file's sizes."""

    def make(bidirectional, mode="chunked"):
        return cls(
            H,
            N,
            chunk_size=CHUNK,
            bidirectional=bidirectional,
            mode=mode,
            param_dtype=jnp.float64,
            rngs=nnx.Rngs(0),
        )

    return make


def test_s4d_packed(x64):
    make = _maker(S4D)
    _check_modes(make, ("scan", "chunked", "materialized"))
    # "fft" and "auto" run the chunked form with segment_ids: the very same program.
    _same_program(make(True), "fft", "chunked")
    _same_program(make(False), "auto", "chunked")
    _check_grads(make(False), "chunked")


def test_s4_packed(x64):
    make = _maker(S4)
    _check_modes(make, ("scan", "chunked", "materialized"))
    _same_program(make(False), "fft", "chunked")
    _check_grads(make(False), "scan")


def test_s5_packed(x64):
    make = _maker(S5)
    _check_modes(make, ("chunked", "materialized"), ("sequential", "associative", "parallel"))
    _same_program(make(True), "auto", s5_auto_mode(L))
    _check_grads(make(False), "parallel")


def test_ptd_packed(x64):
    _check_modes(_maker(S4PTD), (), ("chunked",))
    _check_modes(_maker(S5PTD), (), ("chunked",))


@pytest.mark.parametrize("make", [_maker(S4D), _maker(S4), _maker(S5)], ids=["S4D", "S4", "S5"])
def test_segment_ids_errors(make, x64):
    layer = make(False)
    x = jnp.zeros((2, L, H))
    with pytest.raises(
        TypeError,
        match=r"segment_ids must be an integer array of shape \(B, L\) = \(2, 13\) "
        r"\(equal ids = same document\); got float64",
    ):
        layer(x, segment_ids=jnp.zeros((2, L)))
    with pytest.raises(
        ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 13\); got \(2, 12\)"
    ):
        layer(x, segment_ids=jnp.zeros((2, L - 1), jnp.int32))


def test_segment_ids_refuse_kernel_dropout(x64):
    layer = S4D(H, N, mode="fft", drop_kernel=0.1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layer.train()
    with pytest.raises(
        ValueError,
        match=r"drop_kernel drops taps of the FFT kernel, but with segment_ids the layer "
        r"runs the 'chunked' mode",
    ):
        layer(jnp.zeros((2, L, H)), segment_ids=jnp.asarray(IDS), rngs=nnx.Rngs(dropout=0))
