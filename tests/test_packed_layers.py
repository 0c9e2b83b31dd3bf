"""Packed sequences (``segment_ids``) in the S4-family layers: S4D, S4-PTD, S4, S5, S5-PTD.

Every supported mode, causal and bidirectional, against every segment run alone (float64):
the segments of the packed rows become rows of their own (right-padded, masked) run through the
unpacked ``"materialized"`` mode (the ``"scan"`` / ``"sequential"`` one for the packed
``"materialized"`` mode), with the incoming state in each row's first segment and the returned
state the last segment's; packed rows with right padding (whose ids change inside the
padding); gradients for one mode per layer; input validation. One jitted program per layer and
mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.layers import S4, S4D, S5
from ssmix.layers.ptd import S4PTD, S5PTD
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
    return np.array(rows), np.array(times), np.array(valid), np.array(first), back_k, back_pos, last_k


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


def _check_layer(make, modes, ref_mode, grad_mode):
    """Packed == per segment for every mode of ``make(bidirectional, mode)``: causal with a
    state in and out, with and without right padding; bidirectional with and without padding.
    Gradients (input, incoming state, parameters) in ``grad_mode``."""
    causal, bidir = make(False), make(True)
    kx, ks = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, L, H))
    x0 = causal.init_state(2)
    x0 = x0 + (jax.random.normal(ks, x0.shape) + 1j * jax.random.normal(ks, x0.shape)).astype(
        x0.dtype
    )
    full = np.full(2, L)
    mask = jnp.asarray(MASK)

    def reference(ref_mode):
        c, b = _with_mode(causal, ref_mode), _with_mode(bidir, ref_mode)
        return (
            _per_segment(c, x, x0, IDS, full, True),
            _per_segment(c, x, x0, IDS_PAD, LENGTHS, True),
            _per_segment(b, x, x0, IDS, full, False),
            _per_segment(b, x, x0, IDS_PAD, LENGTHS, False),
        )

    refs = {m: jax.jit(lambda m=m: reference(m))() for m in {ref_mode, "materialized"}}

    for mode in modes:
        c, b = _with_mode(causal, mode), _with_mode(bidir, mode)

        @jax.jit
        def packed(x, x0, c=c, b=b):
            ids, ids_pad = jnp.asarray(IDS), jnp.asarray(IDS_PAD)
            return (
                c(x, state=x0, return_state=True, segment_ids=ids),
                c(x, mask=mask, state=x0, return_state=True, segment_ids=ids_pad),
                b(x, segment_ids=ids),
                b(x, mask=mask, segment_ids=ids_pad),
            )

        got = packed(x, x0)
        ref = refs[ref_mode if mode == "materialized" else "materialized"]
        assert_close(ref[0], got[0], name=f"{mode} causal")
        assert_close(
            (_zero_padding(ref[1][0]), ref[1][1]), got[1], name=f"{mode} causal, padded"
        )
        assert_close(ref[2], got[2], name=f"{mode} bidirectional")
        assert_close(_zero_padding(ref[3]), got[3], name=f"{mode} bidirectional, padded")

    # Gradients: the packed layer in grad_mode against the per-segment materialized one.
    cot = jax.random.normal(jax.random.PRNGKey(1), (2, L, causal.d_output))
    graph, params = nnx.split(_with_mode(causal, grad_mode))
    graph_ref, _ = nnx.split(_with_mode(causal, "materialized"))

    def loss_packed(params, x, x0):
        y, s = nnx.merge(graph, params)(x, state=x0, return_state=True, segment_ids=IDS)
        return jnp.sum(y * cot) + jnp.sum(jnp.abs(s) ** 2)

    def loss_ref(params, x, x0):
        y, s = _per_segment(nnx.merge(graph_ref, params), x, x0, IDS, full, True)
        return jnp.sum(y * cot) + jnp.sum(jnp.abs(s) ** 2)

    grads = [jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, x, x0) for f in (loss_ref, loss_packed)]
    assert_close(grads[0], grads[1], name=f"{grad_mode} gradients")


def _s4d(init="legs"):
    def make(bidirectional, mode="chunked"):
        return S4D(H, N, init=init, chunk_size=CHUNK, bidirectional=bidirectional, mode=mode,
                   param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    return make


S4_MODES = ("scan", "chunked", "fft", "auto", "materialized")


def test_s4d_packed(x64):
    _check_layer(_s4d(), S4_MODES, "scan", "chunked")
