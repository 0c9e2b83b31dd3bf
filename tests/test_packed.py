"""Packed sequences (``segment_ids``) in the linear scan and the SSD kernels.

Every method, in both directions, against running each segment alone and concatenating
(outputs, final states and gradients, float64); awkward layouts (segments of length 1, a prime
length, boundaries at a chunk edge and inside a chunk, repeated non-sorted ids); the parallel
SSD's other state-passing and head-block paths; huge decays across a boundary (no NaN); input
validation; lowering of the loop-free forms for cuda and tpu.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmix
from ssmix.kernels.scan import EXPLICIT_METHODS, METHODS, linear_scan, linear_scan_naive
from ssmix.kernels.ssd import ssd
from ssmix.kernels.ssd.common import segment_labels
from ssmix.kernels.ssd.parallel import ssd_parallel
from ssmix.testing import assert_close

L = 13  # prime; with chunks of 4 the boundaries below fall on chunk edges and inside chunks
CHUNK = 4
# Row 0: segments [0, 4) [4, 5) [5, 8) [8, 13): boundaries at chunk edges 4 and 8, inside a
# chunk at 5, a segment of length 1. Row 1: a first segment of length 1, ids repeated and
# unsorted ([5] [6 …] [5 …]: only changes between neighbours count).
IDS = np.array([[0] * 4 + [1] + [2] * 3 + [3] * 5, [5] + [6] * 6 + [5] * 6], np.int32)


def _layout(reverse):
    """Every segment of every row of :data:`IDS` as a row of its own, ``L`` long, the segment
    at the start (at the end when ``reverse``: the side processed first) and identity steps
    in the rest. Returns numpy index arrays: ``rows, times (K, L)`` (where each buffer
    position reads from), ``valid (K, L)``, ``first (K,)`` (segment processed first in its
    row), ``row_of (K,)``, ``back_k, back_pos (2, L)`` (where each packed position's output
    is) and ``last_k (2,)`` (the segment processed last in each row)."""
    n_rows = IDS.shape[0]
    rows, times, valid, first, row_of = [], [], [], [], []
    back_k = np.zeros((n_rows, L), np.int32)
    back_pos = np.zeros((n_rows, L), np.int32)
    last_k = np.zeros(n_rows, np.int32)
    for r in range(n_rows):
        row = IDS[r]
        cuts = [0] + [t for t in range(1, L) if row[t] != row[t - 1]] + [L]
        segs = list(zip(cuts[:-1], cuts[1:], strict=True))
        for n, (s0, s1) in enumerate(segs):
            k, length = len(rows), s1 - s0
            offset = L - length if reverse else 0
            t_idx = np.zeros(L, np.int32)
            t_idx[offset : offset + length] = np.arange(s0, s1)
            rows.append(np.full(L, r, np.int32))
            times.append(t_idx)
            valid.append((np.arange(L) >= offset) & (np.arange(L) < offset + length))
            first.append(n == (len(segs) - 1 if reverse else 0))
            row_of.append(r)
            back_k[r, s0:s1] = k
            back_pos[r, s0:s1] = np.arange(offset, offset + length)
            if n == (0 if reverse else len(segs) - 1):
                last_k[r] = k
    return (
        np.array(rows),
        np.array(times),
        np.array(valid),
        np.array(first),
        np.array(row_of),
        back_k,
        back_pos,
        last_k,
    )


def _per_segment(run, reverse):
    """``f(arrays, fill, x0) -> (outputs (2, L, …), final states (2, …))`` running every
    segment alone (``run(arrays, init) -> (out, final)``, unpacked, on all segments as one
    batch, :func:`_layout`); ``arrays`` ``(2, L, …)`` are gathered, and filled with ``fill``
    (identity steps) off the segments; ``x0`` enters only the first segment processed."""
    rows, times, valid, first, row_of, back_k, back_pos, last_k = _layout(reverse)

    def f(arrays, fills, x0):
        parts = []
        for v, fill in zip(arrays, fills, strict=True):
            g = v[rows, times]
            keep = valid.reshape(valid.shape + (1,) * (g.ndim - 2))
            parts.append(jnp.where(keep, g, fill))
        init = x0[row_of] * first.reshape((-1,) + (1,) * (x0.ndim - 1))
        out, final = run(parts, init)
        return out[back_k, back_pos], final[last_k]

    return f


def check_vjp(impls, *args, seed=0):
    """Outputs and gradients of every implementation against the first one's: one jitted
    ``jax.vjp`` per implementation (one compilation each) with one shared random cotangent,
    compared by :func:`ssmix.testing.assert_close` (what
    :func:`ssmix.testing.check_equivalent` does, with a third of the compilations)."""
    names = list(impls)
    shapes = jax.eval_shape(impls[names[0]], *args)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    cot = []
    for key, leaf in zip(keys, leaves, strict=True):
        c = jax.random.normal(key, leaf.shape, jnp.finfo(leaf.dtype).dtype)
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            c = c + 1j * jax.random.normal(jax.random.fold_in(key, 1), leaf.shape, c.dtype)
        cot.append(c.astype(leaf.dtype))
    cot = jax.tree.unflatten(tree, cot)

    def run(fn):
        def f(*args):
            out, vjp = jax.vjp(fn, *args)
            return out, vjp(cot)

        return jax.jit(f)(*args)

    ref = run(impls[names[0]])
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(ref))
    for name in names[1:]:
        assert_close(ref, run(impls[name]), name=f"[{name}] (outputs, gradients)")


def check_outputs(impls, *args):
    """Outputs only, of every implementation against the first one's, all computed in one
    jitted program (one compilation for all of them)."""
    names = list(impls)
    outs = jax.jit(lambda *args: {name: impls[name](*args) for name in names})(*args)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(outs[names[0]]))
    for name in names[1:]:
        assert_close(outs[names[0]], outs[name], name=f"[{name}] outputs")


# --------------------------------------------------------------------------------------
# Linear scan


@pytest.mark.parametrize("time_varying, reverse", [(False, False), (True, True)])
def test_scan_packed_equals_per_segment(x64, time_varying, reverse):
    """Constant complex decay forward, time-varying real decay in reverse, each with an
    initial state; every method against the naive loop run on each segment alone."""
    rng = np.random.default_rng(1 + time_varying)
    S = (3,)
    b = jnp.asarray(rng.normal(size=(2, L, *S)) + 1j * rng.normal(size=(2, L, *S)))
    x0 = jnp.asarray(rng.normal(size=(2, *S)) + 1j * rng.normal(size=(2, *S)))
    if time_varying:
        a = jnp.asarray(rng.uniform(0.3, 0.95, size=(2, L, *S)))
    else:
        a = jnp.asarray(rng.uniform(0.3, 0.95, size=S) * np.exp(1j * rng.uniform(0, 1, S)))
    ids = jnp.asarray(IDS)
    # Alone, a segment is followed by identity steps (decay 1, input 0).
    alone = _per_segment(
        lambda parts, init: linear_scan_naive(parts[0], parts[1], init, reverse=reverse),
        reverse,
    )

    @jax.jit
    def reference(a, b, x0):
        a_full = a if time_varying else jnp.broadcast_to(a, b.shape)
        return alone([a_full, b], [1.0, 0.0], x0)

    def packed(method):
        return lambda a, b, x0: linear_scan(
            a, b, x0, method=method, chunk_size=CHUNK, reverse=reverse, segment_ids=ids
        )

    impls = {"per_segment": reference}
    impls.update({m: packed(m) for m in (*METHODS, *EXPLICIT_METHODS)})
    check_vjp(impls, a, b, x0)


def test_scan_without_boundaries_is_unchanged(x64):
    """One segment per row (constant ids): exactly the unpacked scan."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.3, 0.95, size=(2, L, 3)))
    b = jnp.asarray(rng.normal(size=(2, L, 3)))
    ids = jnp.full((2, L), 7, jnp.int32)
    assert_close(
        linear_scan(a, b, method="chunked", chunk_size=CHUNK),
        linear_scan(a, b, method="chunked", chunk_size=CHUNK, segment_ids=ids),
        exact=True,
    )


def test_scan_segment_ids_validation():
    b = jnp.ones((2, 5, 3))
    a = jnp.full((3,), 0.5)
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array of shape \(B, L\)"):
        linear_scan(a, b, segment_ids=jnp.zeros((2, 5)))
    with pytest.raises(TypeError, match="segment_ids must be an integer array.*got bool"):
        linear_scan(a, b, segment_ids=jnp.zeros((2, 5), bool))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        linear_scan(a, b, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        linear_scan(a, b, segment_ids=jnp.zeros((5,), jnp.int32))


# --------------------------------------------------------------------------------------
# SSD


def _ssd_inputs(seed, H=2, P=2, G=1, N=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, L, H, P)))
    dt = rng.uniform(0.05, 0.6, size=(2, L, H))
    # Steps so large that exp(dt·A) underflows to 0 right before and after a boundary:
    # a sum across the boundary taken before masking would overflow or give NaN.
    dt[0, 3:6] = 60.0
    A = jnp.asarray(-rng.uniform(0.5, 12.0, size=(H,)))
    B = jnp.asarray(rng.normal(size=(2, L, G, N)))
    C = jnp.asarray(rng.normal(size=(2, L, G, N)))
    h0 = jnp.asarray(rng.normal(size=(2, H, P, N)))
    return x, jnp.asarray(dt), A, B, C, h0


def _ssd_reference(reverse):
    """Every segment alone through the materialized SSD (identity steps, ``dt = 0``, around
    it), jitted."""

    @jax.jit
    def reference(x, dt, A, B, C, h0):
        def run(parts, init):
            xs, dts, Bs, Cs = parts
            return ssd(
                xs, dts, A, Bs, Cs, initial_state=init, reverse=reverse, method="materialized"
            )

        return _per_segment(run, reverse)([x, dt, B, C], [0.0] * 4, h0)

    return reference


def test_ssd_packed_equals_per_segment(x64):
    """Every method forward, outputs and gradients (materialized: outputs; and the parallel
    form's associative-scan state passing and head blocks, with groups); the directions' own
    code (materialized, sequential, the flip of the chunk forms) in reverse, outputs; against
    each segment run alone."""
    ids = jnp.asarray(IDS)
    labels = segment_labels(ids)

    def packed(method, reverse=False):
        return lambda x, dt, A, B, C, h0: ssd(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=CHUNK,
            initial_state=h0,
            reverse=reverse,
            method=method,
            segment_ids=ids,
        )

    def blocks(x, dt, A, B, C, h0):
        return ssd_parallel(
            x, dt, A, B, C, h0, CHUNK, labels, qq_budget_bytes=1, matmul_max_chunks=1
        )

    args = _ssd_inputs(3, H=4, G=2)
    methods = ("sequential", "chunked", "parallel", "pallas")
    impls = {"per_segment": _ssd_reference(False)} | {m: packed(m) for m in methods}
    check_vjp(impls | {"parallel_blocks": blocks}, *args)
    # Outputs of the materialized form (its gradient is autodiff through the same masks),
    # and of the reverse direction (the chunk forms run reversed as the forward form on
    # flipped inputs), in one compiled program.
    forward, backward = _ssd_reference(False), _ssd_reference(True)

    def outputs(*args):
        return {
            "per_segment": (forward(*args), backward(*args)),
            "materialized": (packed("materialized")(*args), packed("materialized", True)(*args)),
            "sequential": (packed("sequential")(*args), packed("sequential", True)(*args)),
            "chunked": (packed("chunked")(*args), packed("chunked", True)(*args)),
        }

    outs = jax.jit(outputs)(*args)
    for name in ("materialized", "sequential", "chunked"):
        assert_close(outs["per_segment"], outs[name], name=f"[{name}] outputs")


def test_ssd_segment_ids_validation():
    x, dt, A, B, C, _ = (
        jnp.ones((2, 5, 2, 2)),
        jnp.ones((2, 5, 2)),
        -jnp.ones((2,)),
        jnp.ones((2, 5, 1, 3)),
        jnp.ones((2, 5, 1, 3)),
        None,
    )
    with pytest.raises(TypeError, match=r"segment_ids must be an integer array of shape \(B, L\)"):
        ssd(x, dt, A, B, C, segment_ids=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        ssd(x, dt, A, B, C, segment_ids=jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_packed_loop_free_forms_lower(platform):
    """The packed parallel scan and parallel SSD (forward + backward) lower for the
    accelerators from a CPU host, without a while loop."""
    ids = jnp.asarray(IDS)

    def loss(a, b, x, dt, A, B, C):
        states, _ = linear_scan(a, b, method="parallel", chunk_size=CHUNK, segment_ids=ids)
        y, _ = ssd(x, dt, A, B, C, chunk_size=CHUNK, method="parallel", segment_ids=ids)
        return jnp.sum(states**2) + jnp.sum(y**2)

    x, dt, A, B, C, _ = _ssd_inputs(0)
    args = (jnp.full((3,), 0.5), jnp.ones((2, L, 3)), x, dt, A, B, C)
    args = jax.tree.map(lambda v: v.astype(jnp.float32), args)
    with ssmix.auto_backend("gpu"):
        traced = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" not in text


@pytest.mark.parametrize(
    "backend, platform, marker",
    [("gpu", "cuda", r"xla\.gpu\.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_packed_pallas_ssd_lowers(backend, platform, marker):
    """The packed Pallas SSD, forward + backward, lowers as compiled kernels (Triton on cuda,
    Mosaic on tpu; Triton needs power-of-two Q, P, N of at least 16)."""
    rng = np.random.default_rng(0)
    n = 100
    x = jnp.asarray(rng.normal(size=(1, n, 2, 16)), jnp.float32)
    dt = jnp.full((1, n, 2), 0.1, jnp.float32)
    A = -jnp.ones((2,), jnp.float32)
    B = jnp.asarray(rng.normal(size=(1, n, 1, 16)), jnp.float32)
    ids = jnp.asarray((np.arange(n) >= 45)[None].astype(np.int32))

    def loss(x, dt, A, B):
        y, h = ssd(x, dt, A, B, B, chunk_size=32, method="pallas", interpret=False, segment_ids=ids)
        return jnp.sum(y**2) + jnp.sum(h**2)

    with ssmix.auto_backend(backend):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        text = grad.trace(x, dt, A, B).lower(lowering_platforms=(platform,)).as_text()
    assert len(re.findall(marker, text)) == 2  # the forward and the backward kernel


def _value_and_sin_grad(f, uc, Tm):
    """``f(uc, Tm)`` and the gradient of ``Σ sin f`` with respect to both."""
    return f(uc, Tm), jax.grad(lambda u, t: jnp.sum(jnp.sin(f(u, t))), (0, 1))(uc, Tm)


def test_same_segment_toeplitz_every_branch(x64):
    """The in-chunk Toeplitz product of packed S4-family convolutions against the direct
    masked sum (values and gradients) in each branch: 2 shared-matrix passes (every chunk
    holds at most 2 pieces), 8 passes (5 pieces), and for a chunk of 12 pieces (one starting
    at every position: more than ``PACKED_PASSES = 8``) the CPU rule's masked product and
    the GPU rule's one pass per chunk position."""
    from ssmix.kernels.vandermonde import _same_segment_toeplitz

    H, B, nc, T, C = 2, 2, 3, 12, 2
    rng = np.random.default_rng(0)
    uc = jnp.asarray(rng.normal(size=(H, B, nc, T)))
    Tm = jnp.asarray(np.tril(rng.normal(size=(C, H, T, T))))
    few = np.zeros((1, B, nc, T), bool)
    few[0, 0, 1, 5] = few[0, 1, 2, 0] = few[0, 1, 0, 11] = True
    mid = few.copy()
    mid[0, 0, 2, [2, 4, 6, 8]] = True
    many = rng.random((1, B, nc, T)) < 0.3
    many[0, 1, 2] = True
    for starts, backend in ((few, "cpu"), (mid, "cpu"), (many, "cpu"), (many, "gpu")):
        lab = jnp.asarray(np.cumsum(starts, axis=-1))
        same = lab[..., :, None] == lab[..., None, :]
        fast = functools.partial(_same_segment_toeplitz, lab=lab)
        direct = functools.partial(jnp.einsum, "hbkts,chts->hbkct")
        with ssmix.auto_backend(backend):
            got, want = jax.jit(
                lambda uc, Tm, fast=fast, direct=direct, same=same: (
                    _value_and_sin_grad(fast, uc, Tm),
                    _value_and_sin_grad(lambda u, t: direct(u[..., None, :] * same, t), uc, Tm),
                )
            )(uc, Tm)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert_close(a, b, atol=1e-12, ratio=1e-12)
