"""Packed sequences (``segment_ids``) in the quasiseparable (Hydra) kernel and the Hydra layer.

Every method against each segment run alone (float64): outputs with both initial states (which
reach only the first / last segment), gradients of the chunked form against the materialized
one, the packed matrix (zero across segments, the shift / flip form inside them), the Hydra
layer in every mode with right padding, and the input checks. Layout as in
``tests/test_packed.py``: ``L = 13`` with chunks of 4, boundaries on chunk edges and inside
chunks, a segment of length 1, repeated non-contiguous ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssmix.kernels.ssd import quasiseparable, quasiseparable_matrix, ssd_matrix
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
