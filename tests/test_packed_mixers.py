"""Packed sequences (``segment_ids``) in the matrix-mixer family: :class:`ShortConv` and
:class:`MatrixMixer` of the kinds that take them (attention, semiseparable, quasiseparable).

Every segment of the packed rows becomes a row of its own (at position 0, right-padded and
masked) run through the same layer without ``segment_ids``; the packed outputs must equal
those, for data-dependent and data-independent variants (whose position parameters restart
in every segment), in the fast and materialized modes, and the packed ``materialize`` must be
block diagonal: zero between segments, each block the matrix of its segment alone (float64).
One jitted program per (kind, data_dependent) computes all of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.layers.mixers import KINDS, SEGMENT_KINDS, MatrixMixer, ShortConv
from ssmix.testing import assert_close

L, CHUNK, D_MODEL = 13, 4, 4
# Row 0: segments [0, 4) [4, 6) [6, 7) [7, 13): a boundary on a chunk edge (4), inside chunks
# (6, 7), a segment of length 1. Row 1: [0, 5) [5, 8) [8, 13) with the id 2 repeated after a
# different one (two segments), valid up to 11 (right padding inside its last segment).
IDS = np.array([[0] * 4 + [1] * 2 + [2] + [3] * 6, [2] * 5 + [7] * 3 + [2] * 5], np.int32)
LENGTHS = np.array([13, 11])
MASK = np.arange(L)[None, :] < LENGTHS[:, None]


def _layout():
    """Every segment (cut to the valid length) as a row of its own, at the start.

    Returns numpy ``rows, times, valid (K, L)`` (the packed row and positions each segment row
    reads, and its mask) and ``back_k, back_pos (2, L)`` (where each packed position's
    result is), plus the segments ``(row, start, stop)``."""
    rows, times, valid, segs = [], [], [], []
    back_k = np.zeros(IDS.shape, np.int32)
    back_pos = np.zeros(IDS.shape, np.int32)
    for r, row in enumerate(IDS):
        n = LENGTHS[r]
        cuts = [0] + [t for t in range(1, n) if row[t] != row[t - 1]] + [n]
        for s0, s1 in zip(cuts[:-1], cuts[1:], strict=True):
            t_idx = np.zeros(L, np.int32)
            t_idx[: s1 - s0] = np.arange(s0, s1)
            back_k[r, s0:s1] = len(rows)
            back_pos[r, s0:s1] = np.arange(s1 - s0)
            rows.append(r)
            times.append(t_idx)
            valid.append(np.arange(L) < s1 - s0)
            segs.append((r, s0, s1))
    return np.array(rows), np.array(times), np.array(valid), back_k, back_pos, segs


ROWS, TIMES, VALID, BACK_K, BACK_POS, SEGMENTS = _layout()


def _segment_rows(x):
    """``x (2, L, C)`` -> the segment rows ``(K, L, C)``, zero beyond each segment."""
    return jnp.where(VALID[..., None], x[ROWS[:, None], TIMES], 0)


def _valid(y):
    """The valid positions of packed outputs ``(2, L, ·)`` (right padding dropped)."""
    return [y[r, : LENGTHS[r]] for r in range(2)]


def _check_outputs(packed, per_segment, name):
    """Packed outputs ``(2, L, C)`` equal the segment rows' outputs at the valid positions."""
    assert_close(_valid(per_segment[BACK_K, BACK_POS]), _valid(packed), name=name)


def test_short_conv_packed_equals_each_segment(x64):
    # K = 4: one tap to the left, two to the right (the asymmetric "same" padding).
    conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, L, 3), jnp.float64)
    run = jax.jit(lambda x, ids, mask, xs, ms: (conv(x, mask, ids), conv(xs, ms)))
    packed, alone = run(x, IDS, MASK, _segment_rows(x), VALID)
    _check_outputs(packed, alone, "ShortConv")
    assert jnp.all(packed[~MASK] == 0)  # padded outputs stay zero
    # Packing changes the result (a tap crosses every boundary): the check is not vacuous.
    assert not np.allclose(_valid(packed)[0], _valid(conv(x, MASK))[0])


@pytest.mark.parametrize("data_dependent", [True, False], ids=["DD", "DI"])
@pytest.mark.parametrize("kind", SEGMENT_KINDS)
def test_matrix_mixer_packed_equals_each_segment(x64, kind, data_dependent):
    extra = {"ssd_method": "chunked", "chunk_size": CHUNK}
    if kind == "attention":
        extra = {"block_size": CHUNK}  # the blocked kernel, key blocks across boundaries
    layer = MatrixMixer(
        D_MODEL,
        kind,
        max_len=16,
        data_dependent=data_dependent,
        qk_dim=2,
        headdim=4,
        d_conv=4,
        rngs=nnx.Rngs(0),
        **extra,
    )
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x, ids, mask, xs, ms):
        m = nnx.merge(graphdef, state)
        out = {}
        for mode in MatrixMixer.MODES:
            m.mode = mode
            out[mode] = (m(x, mask, segment_ids=ids), m(xs, ms))
        out["M"] = (m.materialize(x, mask, segment_ids=ids), m.materialize(xs, ms))
        return out

    x = jax.random.normal(jax.random.key(1), (2, L, D_MODEL), jnp.float64)
    out = run(state, x, IDS, MASK, _segment_rows(x), VALID)
    for mode in MatrixMixer.MODES:
        _check_outputs(*out[mode], name=mode)
    assert_close(out["materialized"][0], out["fast"][0], name="fast against materialized")

    M, M_alone = out["M"]
    assert M.shape == (2, layer.nheads, L, L)
    same = IDS[:, :, None] == IDS[:, None, :]
    for k, (r, s0, s1) in enumerate(SEGMENTS):
        n = s1 - s0
        same[r, s0:s1, :s0] = same[r, s0:s1, s1:] = False  # a repeated id is another segment
        assert_close(M_alone[k, :, :n, :n], M[r, :, s0:s1, s0:s1], name=f"block {k}")
    assert jnp.all(jnp.where(same[:, None], 0, M) == 0)  # exactly zero between segments
    # Each segment sees the matrix it has alone, not the unpacked row's: not vacuous.
    M_unpacked = run(state, x, np.zeros_like(IDS), MASK, _segment_rows(x), VALID)["M"][0]
    assert not np.allclose(M[0, :, 4:6, 4:6], M_unpacked[0, :, 4:6, 4:6])


def test_segment_ids_errors():
    x = jnp.ones((2, L, D_MODEL))
    unsupported = [k for k in KINDS if k not in SEGMENT_KINDS]
    assert unsupported == ["dense", "toeplitz", "vandermonde", "cauchy", "low_rank"]
    # Abstract layers (nnx.eval_shape): the checks come before any computation.
    make = lambda kind: nnx.eval_shape(  # noqa: E731
        lambda: MatrixMixer(
            D_MODEL, kind, max_len=16, data_dependent=kind != "dense", headdim=4, rngs=nnx.Rngs(0)
        )
    )
    for kind in unsupported:
        layer = make(kind)
        msg = (
            r"supported by the kinds \('attention', 'semiseparable', 'quasiseparable'\) "
            rf"only; got kind '{kind}'"
        )
        with pytest.raises(ValueError, match=msg):
            layer(x, segment_ids=IDS)
        with pytest.raises(ValueError, match=msg):
            layer.materialize(x, segment_ids=IDS)
    layer = make("semiseparable")
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array of shape \(B, L\)"):
        layer(x, segment_ids=IDS.astype(np.float32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 13\)"):
        layer(x, segment_ids=IDS[:, :-1])
    conv = nnx.eval_shape(lambda: ShortConv(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 13\)"):
        conv(jnp.ones((2, L, 3)), segment_ids=IDS[:1])
