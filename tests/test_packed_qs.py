"""Packed sequences (``segment_ids``) in the quasiseparable (Hydra) kernel and the Hydra layer.

Every method against each segment run alone (float64): outputs with both initial states (which
reach only the first / last segment), gradients of the chunked form against the materialized
one, the packed matrix (zero across segments, the shift / flip form inside them), the Hydra
layer in every mode with right padding, and the input checks. Layout as in
``tests/test_packed.py``: ``L = 13`` with chunks of 4, boundaries on chunk edges and inside
chunks, a segment of length 1, repeated non-contiguous ids.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmix
from ssmix.kernels.ssd import quasiseparable, quasiseparable_matrix, ssd_matrix
from ssmix.layers import Hydra
from ssmix.testing import assert_close

L = 13
CHUNK = 4
# Row 0: [0, 4) [4, 5) [5, 8) [8, 13): boundaries at the chunk edges 4 and 8 and inside a
# chunk at 5, a segment of length 1. Row 1: a first segment of length 1, then ids 6 and 5
# again (only changes between neighbours count), boundaries inside chunks at 1 and 7.
IDS = np.array([[0] * 4 + [1] + [2] * 3 + [3] * 5, [5] + [6] * 6 + [5] * 6], np.int32)
METHODS = ("materialized", "sequential", "chunked", "parallel", "pallas")


def _segments(ids):
    """``[(row, start, stop, first, last)]`` for every segment of every row of ``ids``."""
    out = []
    for r, row in enumerate(np.asarray(ids)):
        cuts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        n = len(cuts) - 1
        out += [(r, cuts[i], cuts[i + 1], i == 0, i == n - 1) for i in range(n)]
    return out


def _per_segment(ids):
    """``f(per_row, rows_fn) -> (B, L, …)``: ``rows_fn(per_row arrays gathered, fill 0)``
    run on every segment alone, each in a row of its own at offset 0 (zeros after it: zero
    steps, inputs and projections, which change nothing the segment reads), all segments as
    one batch, and scattered back to the packed layout."""
    segs = _segments(ids)
    Lr = ids.shape[1]
    rows = np.array([[r] * Lr for r, *_ in segs])
    times = np.array([np.clip(np.arange(Lr) + s0, 0, Lr - 1) for _, s0, *_ in segs])
    valid = np.array([np.arange(Lr) < s1 - s0 for _, s0, s1, *_ in segs])
    back_k = np.zeros(ids.shape, np.int32)
    back_pos = np.zeros(ids.shape, np.int32)
    for k, (r, s0, s1, _, _) in enumerate(segs):
        back_k[r, s0:s1] = k
        back_pos[r, s0:s1] = np.arange(s1 - s0)
    first = np.array([f for *_, f, _ in segs])
    last = np.array([la for *_, la in segs])
    row_of = np.array([r for r, *_ in segs])

    def gather(v):
        g = v[rows, times]
        return jnp.where(valid.reshape(valid.shape + (1,) * (g.ndim - 2)), g, 0)

    def run(arrays, states, fn):
        """``fn(gathered arrays, gathered states) -> (K, L, …)``; ``states (h_fw, h_bw)``:
        ``h_fw`` goes to each row's first segment, ``h_bw`` to its last, zeros elsewhere."""
        parts = [gather(v) for v in arrays]
        sts = None
        if states is not None:
            keep = lambda m: m.reshape(-1, 1, 1, 1)  # noqa: E731
            sts = (states[0][row_of] * keep(first), states[1][row_of] * keep(last))
        return fn(parts, sts)[back_k, back_pos]

    return run


def _qs_inputs(seed=0, b=2, H=4, P=2, G=2, N=3):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.normal(size=s))  # noqa: E731
    dt_fw = rng.uniform(0.05, 0.6, size=(b, L, H))
    dt_bw = rng.uniform(0.05, 0.6, size=(b, L, H))
    # Steps so large that exp(dt·A) underflows around the boundaries at 4 and 5: a sum across
    # a boundary taken before masking would give NaN in the gradients.
    dt_fw[0, 3:6] = 60.0
    dt_bw[0, 3:6] = 60.0
    A = jnp.asarray(-rng.uniform(0.5, 3.0, size=(H,)))
    args = (
        n(b, L, H, P),
        jnp.asarray(dt_fw),
        jnp.asarray(dt_bw),
        A,
        n(b, L, G, N),
        n(b, L, G, N),
        n(b, L, G, N),
        n(b, L, G, N),
        n(b, L, H),
    )
    states = (n(b, H, P, N), n(b, H, P, N))
    return args, states


def _packed(method, ids):
    def f(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, h_fw, h_bw):
        return quasiseparable(
            x,
            dt_fw,
            dt_bw,
            A,
            B_fw,
            C_fw,
            B_bw,
            C_bw,
            diag,
            chunk_size=CHUNK,
            initial_states=(h_fw, h_bw),
            method=method,
            interpret=True if method == "pallas" else None,
            segment_ids=ids,
        )

    return f


def _alone(ids):
    """Every segment alone through the materialized method, unpacked."""
    run = _per_segment(np.asarray(ids))

    def f(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, h_fw, h_bw):
        def fn(parts, sts):
            xs, dfs, dbs, bfs, cfs, bbs, cbs, ds = parts
            return quasiseparable(
                xs, dfs, dbs, A, bfs, cfs, bbs, cbs, ds, initial_states=sts, method="materialized"
            )

        arrays = (x, dt_fw, dt_bw, B_fw, C_fw, B_bw, C_bw, diag)
        return run(arrays, (h_fw, h_bw), fn)

    return f


def test_qs_packed_equals_each_segment_alone_every_method(x64):
    """Outputs of every method (both initial states on) against each segment run alone, all
    in one compiled program; a row of one segment (no boundary) equals the unpacked call."""
    ids = jnp.asarray(IDS)
    one = jnp.full_like(ids, 3)
    args, states = _qs_inputs(0)

    def outputs(*a):
        out = {"alone": _alone(IDS)(*a)}
        out |= {m: _packed(m, ids)(*a) for m in METHODS}
        plain = quasiseparable(*a[:9], chunk_size=CHUNK, initial_states=a[9:], method="chunked")
        out["one_segment"] = (plain, _packed("chunked", one)(*a))
        return out

    outs = jax.jit(outputs)(*args, *states)
    assert np.all(np.isfinite(np.asarray(outs["alone"])))
    for m in METHODS:
        assert_close(outs["alone"], outs[m], name=f"[{m}] outputs")
    plain, single = outs["one_segment"]
    assert_close(plain, single, exact=True, name="one segment per row")


def test_qs_packed_gradients_chunked_equal_materialized(x64):
    """Gradients with respect to every input (states included) through the chunked form's
    hand-written backward pass equal autodiff through the materialized matrix, and are finite
    next to steps whose decay underflows across a boundary."""
    ids = jnp.asarray(IDS)
    args, states = _qs_inputs(1)
    cot = jax.random.normal(jax.random.PRNGKey(2), args[0].shape, jnp.float64)

    def grads(method):
        def g(*a):
            y, vjp = jax.vjp(_packed(method, ids), *a)
            return y, vjp(cot)

        return jax.jit(g)(*args, *states)

    ref = grads("materialized")
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(ref))
    assert_close(ref, grads("chunked"), name="[chunked] (outputs, gradients)")


def _shift_rows(M):
    return jnp.pad(M[..., :-1, :], ((0, 0), (0, 0), (1, 0), (0, 0)))


def test_qs_matrix_with_segments(x64):
    """``quasiseparable_matrix(segment_ids=)``: exactly zero between different segments,
    inside them the shift / flip form of the SSD matrices, and it applies as the packed
    mixer."""
    ids = jnp.asarray(IDS)
    (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag), _ = _qs_inputs(3)

    @jax.jit
    def run(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag):
        p = (dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
        flip = lambda v: jnp.flip(v, 1)  # noqa: E731
        M_fw = _shift_rows(ssd_matrix(dt_fw, A, B_fw, C_fw))
        M_bw = _shift_rows(ssd_matrix(flip(dt_bw), A, flip(B_bw), flip(C_bw)))[..., ::-1, ::-1]
        product = M_fw + M_bw + jnp.eye(L) * jnp.moveaxis(diag, 1, 2)[..., None]
        y = quasiseparable(x, *p, chunk_size=CHUNK, method="parallel", segment_ids=ids)
        return quasiseparable_matrix(*p, segment_ids=ids), product, y

    M, product, y = run(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    runs = [[[_same_run(r, t, s) for s in range(L)] for t in range(L)] for r in range(2)]
    same = np.array(runs)[:, None]  # (B, 1, L, L)
    assert np.all(np.asarray(M)[np.broadcast_to(~same, M.shape)] == 0)
    assert_close(jnp.where(same, product, 0), M)
    assert_close(y, jnp.einsum("bhts,bshp->bthp", M, x))


def _same_run(r, t, s):
    """Whether positions ``t`` and ``s`` of row ``r`` of :data:`IDS` lie in one segment (a
    run of equal neighbouring ids: row 1's two runs of id 5 are different segments)."""
    lo, hi = min(t, s), max(t, s)
    return bool(np.all(IDS[r, lo : hi + 1] == IDS[r, t]))


def test_qs_segment_ids_validation():
    x = jnp.ones((2, 5, 2, 2))
    dt = jnp.ones((2, 5, 2))
    A = -jnp.ones((2,))
    Bm = jnp.ones((2, 5, 1, 3))
    args = (x, dt, dt, A, Bm, Bm, Bm, Bm, dt)
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array of shape \(B, L\)"):
        quasiseparable(*args, segment_ids=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        quasiseparable(*args, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array.*got bool"):
        quasiseparable_matrix(*args[1:], segment_ids=jnp.zeros((2, 5), bool))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        quasiseparable_matrix(*args[1:], segment_ids=jnp.zeros((5,), jnp.int32))


# --------------------------------------------------------------------------------------
# Hydra layer

# Right padding combined with packing: row 0 valid for 12 steps (its padding keeps the last
# id), row 1 for 11 (its padding has an id of its own).
HYDRA_IDS = np.array([IDS[0], np.r_[IDS[1, :11], 7, 7]], np.int32)
HYDRA_LENGTHS = (12, 11)


@functools.cache
def _hydra():
    """d_model 8, expand 2 -> 4 heads of 4 channels, 2 groups, d_state 4, chunks of 4, a
    5-tap convolution; random learned initial states (so their entry into every segment is
    observable); float64 parameters (build it under x64). Built once per process."""
    layer = Hydra(
        8,
        d_state=4,
        d_conv=5,
        headdim=4,
        ngroups=2,
        chunk_size=CHUNK,
        learnable_init_states=True,
        rngs=nnx.Rngs(0),
    )
    shape = layer.init_states.shape
    layer.init_states = nnx.Param(jax.random.normal(jax.random.PRNGKey(1), shape))
    graph, state = nnx.split(layer)
    state = jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    return graph, state


def _hydra_alone(graph):
    """``(state, x) -> y (B, L, d)``: every valid segment of :data:`HYDRA_IDS` run alone, in a
    right-padded row of its own (the padded path, checked in ``tests/test_hydra.py``), the
    materialized mode; also the matrices of those rows."""
    valid_ids = np.where(np.arange(L) < np.array(HYDRA_LENGTHS)[:, None], HYDRA_IDS, -1)
    segs = [s for s in _segments(valid_ids) if valid_ids[s[0], s[1]] >= 0]
    rows = np.array([[r] * L for r, *_ in segs])
    times = np.array([np.clip(np.arange(L) + s0, 0, L - 1) for _, s0, *_ in segs])
    valid = np.array([np.arange(L) < s1 - s0 for _, s0, s1, *_ in segs])

    def run(state, x):
        layer = nnx.merge(graph, state)
        layer.mode = "materialized"
        xs = jnp.where(valid[..., None], x[rows, times], 1e3)
        y, M = layer(xs, jnp.asarray(valid)), layer.materialize(xs, jnp.asarray(valid))
        packed = jnp.zeros((len(HYDRA_LENGTHS), L, x.shape[-1]), y.dtype)
        for k, (r, s0, s1, _, _) in enumerate(segs):
            packed = packed.at[r, s0:s1].set(y[k, : s1 - s0])
        return packed, M

    return run, segs


def _hydra_inputs():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, L, 8), jnp.float64)
    mask = jnp.arange(L)[None, :] < jnp.asarray(HYDRA_LENGTHS)[:, None]
    return jnp.where(mask[..., None], x, 1e3), mask


def test_hydra_packed_equals_each_segment_alone_every_mode(x64):
    """Valid outputs of a packed, right-padded batch in every mode equal each segment run
    alone (convolution, both directions and the learned initial states, which enter every
    segment); the packed matrix is block diagonal with each segment's own matrix; one
    compiled program for all of them."""
    graph, state = _hydra()
    x, mask = _hydra_inputs()
    ids = jnp.asarray(HYDRA_IDS)
    alone, segs = _hydra_alone(graph)

    def outputs(state, x):
        out = {"alone": alone(state, x)}
        for m in METHODS:
            layer = nnx.merge(graph, state)
            layer.mode = m
            out[m] = layer(x, mask, ids)
        out["matrix"] = nnx.merge(graph, state).materialize(x, mask, segment_ids=ids)
        return out

    outs = jax.jit(outputs)(state, x)
    ref, M_alone = outs["alone"]
    keep = np.asarray(mask)[..., None]
    assert np.all(np.isfinite(np.asarray(ref)))
    for m in METHODS:
        assert_close(ref, jnp.where(keep, outs[m], 0), name=f"[{m}] valid outputs")
    M = np.asarray(outs["matrix"])
    block = np.zeros(M.shape, bool)
    for k, (r, s0, s1, _, _) in enumerate(segs):
        n = s1 - s0
        assert_close(M_alone[k, :, :n, :n], M[r, :, s0:s1, s0:s1], name=f"segment {k} matrix")
        block[r, :, s0:s1, s0:s1] = True
    assert np.all(M[~block & np.asarray(mask)[:, None, :, None]] == 0)


def test_hydra_packed_gradients_equal_each_segment_alone(x64):
    """Parameter and input gradients of the packed layer (chunked mode) equal those of the
    segments run alone, through valid outputs, in one compiled program."""
    graph, state = _hydra()
    x, mask = _hydra_inputs()
    ids = jnp.asarray(HYDRA_IDS)
    alone, _ = _hydra_alone(graph)
    cot = jax.random.normal(jax.random.PRNGKey(9), x.shape, jnp.float64) * mask[..., None]

    def packed(state, x):
        layer = nnx.merge(graph, state)
        layer.mode = "chunked"
        return layer(x, mask, ids)

    def grads(state, x):
        g = lambda f: jax.grad(lambda s, x: jnp.sum(cot * f(s, x)), (0, 1))(state, x)  # noqa: E731
        return g(lambda s, x: alone(s, x)[0]), g(packed)

    ref, got = jax.jit(grads)(state, x)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(ref))
    assert_close(ref, got, name="gradients")


def test_hydra_segment_ids_validation(x64):
    layer = nnx.merge(*_hydra())
    x = jnp.ones((2, 5, 8))
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array of shape \(B, L\)"):
        layer(x, segment_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        layer(x, segment_ids=jnp.zeros((2, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        layer.materialize(x, segment_ids=jnp.zeros((1, 5), jnp.int32))


def test_packed_qs_lowers_for_accelerators():
    """The packed quasiseparable mixer, forward + backward, lowers for cuda and tpu from a CPU
    host: the parallel method without a while loop, the Pallas method as one Triton forward
    and one backward kernel (Triton needs power-of-two Q, P, N of at least 16)."""
    rng = np.random.default_rng(0)
    n = 40
    x = jnp.asarray(rng.normal(size=(1, n, 2, 16)), jnp.float32)
    dt = jnp.full((1, n, 2), 0.1, jnp.float32)
    A = -jnp.ones((2,), jnp.float32)
    Bm = jnp.asarray(rng.normal(size=(1, n, 1, 16)), jnp.float32)
    ids = jnp.asarray((np.arange(n) >= 21)[None].astype(np.int32))

    def loss(method, x, dt, A, Bm):
        kw = dict(chunk_size=16, method=method, segment_ids=ids)
        if method == "pallas":
            kw["interpret"] = False
        y = quasiseparable(x, dt, dt, A, Bm, Bm, Bm, Bm, dt, **kw)
        return jnp.sum(y**2)

    def lowered(method, platform):
        grad = jax.jit(jax.grad(functools.partial(loss, method), argnums=(0, 1, 2, 3)))
        return grad.trace(x, dt, A, Bm).lower(lowering_platforms=(platform,)).as_text()

    with ssmix.auto_backend("gpu"):
        for platform in ("cuda", "tpu"):
            assert "stablehlo.while" not in lowered("parallel", platform)
        assert len(re.findall(r"xla\.gpu\.triton", lowered("pallas", "cuda"))) == 2
