"""Attention kernels: softmax (reference vs blocked), KAO and tensor / 2-simplicial attention."""

import contextlib
import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmix
from ssmix.kernels.attention import _common as attention_common
from ssmix.kernels.attention import (
    kao,
    kao_mixing_matrix,
    softmax_attention,
    softmax_attention_weights,
    softmax_block_size,
    tensor_attention,
    tensor_attention_error_bound,
    tensor_attention_weights,
)
from ssmix.kernels.attention import softmax as attention_softmax
from ssmix.testing import assert_close, check_equivalent, trace_stats


def _normal(seed, shape, dtype=jnp.float64, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _uniform(seed, shape, bound, dtype=jnp.float64):
    return np.random.default_rng(seed).uniform(-bound, bound, size=shape).astype(dtype)


@contextlib.contextmanager
def _precision(name):
    """float64 (x64 enabled) or float32 for the duration of one check."""
    with jax.enable_x64(name == "float64"):
        yield jnp.dtype(name)


def _jit_all(impls):
    """Jit every implementation: eager dispatch of scans is far slower than compiling once."""
    return {name: jax.jit(f) for name, f in impls.items()}


def _lengths_mask(lengths, n):
    return jnp.asarray(np.arange(n)[None, :] < np.asarray(lengths)[:, None])


# ----------------------------------------------------------------------------- softmax attention


def _softmax_direct(q, k, v, causal, mask):
    """Loop over queries in numpy float64: the definition, with zero rows when nothing is valid."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, h, lq, d = q.shape
    out = np.zeros((b, h, lq, v.shape[-1]))
    for bi, hi, t in itertools.product(range(b), range(h), range(lq)):
        ok = np.ones(k.shape[2], bool) if mask is None else np.asarray(mask[bi]).copy()
        if causal:
            ok &= np.arange(k.shape[2]) <= t
        if not ok.any():
            continue
        s = k[bi, hi][ok] @ q[bi, hi, t] / math.sqrt(d)
        w = np.exp(s - s.max())
        out[bi, hi, t] = (w / w.sum()) @ v[bi, hi][ok]
    return out


# Each combination compiles several kernels and their gradients; these cover float64 and
# float32, causal and not, masked and not, and cross-attention (Lq ≠ Lk, dv ≠ d) within the
# test-time budget.
_COMBOS = [("float64", False, True), ("float64", True, False), ("float32", True, True)]


@pytest.mark.parametrize("dtype, causal, masked", _COMBOS)
def test_softmax_blocked_matches_reference(dtype, causal, masked):
    with _precision(dtype) as dt:
        _check_softmax_blocked(dt, causal, masked)


def _check_softmax_blocked(float_dtype, causal, masked):
    b, h, lk, d = 2, 2, 13, 5
    lq, dv = (lk, d) if causal else (7, 6)
    q = _normal(0, (b, h, lq, d), float_dtype)
    k, v = _normal(1, (b, h, lk, d), float_dtype), _normal(2, (b, h, lk, dv), float_dtype)
    mask = _lengths_mask([9, 13], lk) if masked else None
    impls = {
        "reference": lambda q, k, v: softmax_attention(q, k, v, causal=causal, mask=mask),
        "blocked": lambda q, k, v: softmax_attention(
            q, k, v, causal=causal, mask=mask, block_size=4
        ),
    }
    check_equivalent(_jit_all(impls), q, k, v)
    if float_dtype == jnp.float64:
        ref = impls["reference"](q, k, v)
        assert_close(_softmax_direct(q, k, v, causal, mask), ref)
        w = softmax_attention_weights(q, k, causal=causal, mask=mask)
        assert_close(ref, jnp.einsum("bhqk,bhkc->bhqc", w, v))


@pytest.mark.parametrize("block_size", [None, 3])
def test_softmax_masking(x64, block_size):
    """Masked keys have no influence; a query without valid keys outputs 0, gradients finite."""
    b, h, n, d = 2, 1, 8, 4
    q, k, v = (jnp.asarray(_normal(i, (b, h, n, d))) for i in range(3))
    mask = _lengths_mask([5, 0], n)
    f = jax.jit(lambda q, k, v: softmax_attention(q, k, v, mask=mask, block_size=block_size))
    out = f(q, k, v)
    out_poked = f(q, k.at[0, :, 5:].set(100.0), v.at[0, :, 5:].set(-1e3))
    assert_close(out[0], out_poked[0], atol=1e-12)
    assert np.all(np.asarray(out[1]) == 0.0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g[1]) == 0.0)


def test_softmax_low_precision_computes_in_float32():
    q, k, v = (_normal(i, (1, 2, 9, 8), jnp.float32) for i in range(3))
    ref = jax.jit(partial(softmax_attention, causal=True))(q, k, v)
    for block_size in (None, 4):
        f = jax.jit(partial(softmax_attention, causal=True, block_size=block_size))
        got = f(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
        assert got.dtype == jnp.bfloat16
        assert_close(ref, got, ratio=3e-2)


def test_softmax_errors():
    q = jnp.zeros((1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, H, L, d\)"):
        softmax_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head dimension"):
        softmax_attention(q, q[..., :3], q)
    with pytest.raises(ValueError, match="same length"):
        softmax_attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="batch and head"):
        softmax_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="causal"):
        softmax_attention(q, q[:, :, :3], q[:, :, :3], causal=True)
    with pytest.raises(TypeError, match="boolean"):
        softmax_attention(q, q, q, mask=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, Lk\)"):
        softmax_attention(q, q, q, mask=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="block_size"):
        softmax_attention(q, q, q, block_size=0)
    with pytest.raises(TypeError, match="floating"):
        softmax_attention(q.astype(jnp.int32), q, q)


# ----------------------------------------------------------------------------- KAO


def _kao_direct(x, keys, values, variant, heads, mask=None):
    """KAO from its definition (REFERENCE §8) with explicit loops in numpy float64."""
    x, keys, values = (np.asarray(a, np.float64) for a in (x, keys, values))
    b, grid, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    wgt = np.ones((b,) + grid) if mask is None else np.asarray(mask, np.float64)
    dh, dvh = c // heads, values.shape[-1] // heads

    def summaries(y, bi):
        """Mean over all other modes, for each index of each mode (valid positions only)."""
        rows, ok = [], []
        for a, n_a in enumerate(grid):
            for idx in range(n_a):
                sl = np.take(y[bi], idx, axis=a).reshape(-1, y.shape[-1])
                wt = np.take(wgt[bi], idx, axis=a).reshape(-1)
                rows.append(wt @ sl / max(wt.sum(), 1.0))
                ok.append(wt.sum() > 0)
        return np.stack(rows), np.array(ok)

    def attend(qv, ck, cv, ok):
        s = ck[ok] @ qv / math.sqrt(dh)
        w = np.exp(s - s.max())
        return (w / w.sum()) @ cv[ok]

    out = np.zeros(x.shape[:-1] + (values.shape[-1],))
    for bi in range(b):
        ck, ok = summaries(keys, bi)
        cv, _ = summaries(values, bi)
        cq, _ = summaries(x, bi)
        for hd in range(heads):
            qs, vs = slice(hd * dh, (hd + 1) * dh), slice(hd * dvh, (hd + 1) * dvh)
            for pos in itertools.product(*(range(g) for g in grid)):
                if wgt[(bi,) + pos] == 0:
                    continue
                if variant == "kv":
                    o = attend(x[(bi,) + pos][qs], ck[:, qs], cv[:, vs], ok)
                else:
                    offsets = np.cumsum((0,) + grid[:-1])
                    o = sum(
                        attend(cq[off + p, qs], ck[:, qs], cv[:, vs], ok)
                        for off, p in zip(offsets, pos, strict=True)
                    )
                out[(bi,) + pos + (vs,)] = o
    return out


@pytest.mark.parametrize("variant", ["kv", "qkv"])
@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_kao_matches_definition(x64, variant, grid):
    b, c, heads = 2, 4, 2
    x = _normal(0, (b,) + grid + (c,))
    keys = _normal(1, (b,) + grid + (c,))
    values = _normal(2, (b,) + grid + (6,))
    f = jax.jit(lambda x, k, v: kao(x, variant=variant, num_heads=heads, keys=k, values=v))
    assert_close(_kao_direct(x, keys, values, variant, heads), f(x, keys, values))
    # The parameter-free operator of the paper: queries, keys and values are all x.
    assert_close(_kao_direct(x, x, x, variant, 1), jax.jit(partial(kao, variant=variant))(x))


@pytest.mark.parametrize("variant", ["kv", "qkv"])
def test_kao_masked_matches_definition_and_matrix(x64, variant):
    b, grid, c, heads = 2, (3, 4), 4, 2
    x, keys, values = (_normal(i, (b,) + grid + (c,)) for i in range(3))
    mask = _lengths_mask([7, 12], 12).reshape((b,) + grid)
    f = jax.jit(
        lambda x, k, v: kao(x, variant=variant, num_heads=heads, keys=k, values=v, mask=mask)
    )
    got = f(x, keys, values)
    assert_close(_kao_direct(x, keys, values, variant, heads, mask), got)
    m = kao_mixing_matrix(x, variant=variant, num_heads=heads, keys=keys, mask=mask)
    vh = values.reshape(b, -1, heads, c // heads)
    via_matrix = jnp.einsum("bhnm,bmhc->bnhc", m, vh).reshape(got.shape)
    assert_close(got, via_matrix)
    # Masked positions have no influence on valid outputs.
    flat = lambda a: a.reshape(b, -1, a.shape[-1])
    poke = lambda a: jnp.asarray(flat(a)).at[0, 7:].set(50.0).reshape(a.shape)
    assert_close(got, f(poke(x), poke(keys), poke(values)), atol=1e-12)


@pytest.mark.parametrize(
    "dtype, variant, grid",
    [("float64", "kv", (4, 3)), ("float32", "qkv", (2, 2, 3))],
)
def test_kao_matrix_form_agrees_with_gradients(dtype, variant, grid):
    with _precision(dtype) as dt:
        _check_kao_matrix_form(dt, variant, grid)


def _check_kao_matrix_form(float_dtype, variant, grid):
    b, c, heads = 1, 4, 2
    x, keys, values = (_normal(i, (b,) + grid + (c,), float_dtype) for i in range(3))

    def via_matrix(x, keys, values):
        m = kao_mixing_matrix(x, variant=variant, num_heads=heads, keys=keys)
        vh = values.reshape(b, -1, heads, c // heads)
        return jnp.einsum("bhnm,bmhc->bnhc", m, vh).reshape(values.shape)

    check_equivalent(
        _jit_all(
            {
                "matrix": via_matrix,
                "kao": lambda x, k, v: kao(x, variant=variant, num_heads=heads, keys=k, values=v),
            }
        ),
        x,
        keys,
        values,
    )


def test_kao_fully_masked_is_zero_and_finite(x64):
    x = _normal(0, (2, 3, 3, 2))
    mask = jnp.zeros((2, 3, 3), bool).at[1].set(True)
    for variant in ("kv", "qkv"):
        f = jax.jit(partial(kao, variant=variant, mask=mask))
        assert np.all(np.asarray(f(x)[0]) == 0.0)
        grad = jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2)))(x)
        assert np.all(np.isfinite(np.asarray(grad)))


def test_kao_errors():
    x = jnp.zeros((1, 3, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, h, w, c\) or \(B, t, h, w, c\)"):
        kao(x[0])
    with pytest.raises(ValueError, match="variant must be one of"):
        kao(x, variant="q")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        kao(x, num_heads=4)
    with pytest.raises(ValueError, match="grid"):
        kao(x, keys=jnp.zeros((1, 4, 3, 6)))
    with pytest.raises(ValueError, match="same channels"):
        kao(x, keys=jnp.zeros((1, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, \*grid\)"):
        kao(x, mask=jnp.ones((1, 12), bool))


# ----------------------------------------------------------------------------- tensor attention


def _tensor_direct(q, k1, k2, v1, v2, causal=False, mask=None, w1=None, w2=None):
    """One softmax over all valid pairs (i, j) per query, in numpy float64 loops."""
    q, k1, k2, v1, v2 = (np.asarray(a, np.float64) for a in (q, k1, k2, v1, v2))
    b, n, d = q.shape
    out = np.zeros((b, n, v1.shape[-1]))
    idx = np.arange(n)
    for bi, t in itertools.product(range(b), range(n)):
        ok1 = np.ones(n, bool) if mask is None else np.asarray(mask[bi]).copy()
        ok2 = ok1.copy()
        if causal:
            ok1 &= idx <= t
            ok2 &= idx <= t
        if w1 is not None:
            ok1 &= idx > t - w1
        if w2 is not None:
            ok2 &= idx > t - w2
        if not (ok1.any() and ok2.any()):
            continue
        s = np.einsum("k,ik,jk->ij", q[bi, t], k1[bi][ok1], k2[bi][ok2]) / math.sqrt(d)
        w = np.exp(s - s.max())
        w /= w.sum()
        out[bi, t] = np.einsum("ij,ic,jc->c", w, v1[bi][ok1], v2[bi][ok2])
    return out


def _tensor_inputs(n, d=4, dv=3, b=2, dtype=jnp.float64, bound=1.0):
    qk = [_uniform(i, (b, n, d), bound, dtype) for i in range(3)]
    vs = [_normal(10 + i, (b, n, dv), dtype) for i in range(2)]
    return qk + vs


@pytest.mark.parametrize(
    "dtype, causal, masked, windows",
    [
        ("float64", False, True, None),
        ("float64", True, False, (3, 5)),
        ("float32", True, True, None),
    ],
)
def test_tensor_exact_methods_agree(dtype, causal, masked, windows):
    with _precision(dtype) as dt:
        _check_tensor_exact(dt, causal, masked, windows)


def _check_tensor_exact(float_dtype, causal, masked, windows):
    n = 11
    args = _tensor_inputs(n, dtype=float_dtype)
    mask = _lengths_mask([8, 11], n) if masked else None
    w1, w2 = windows or (None, None)
    kw = dict(causal=causal, mask=mask, w1=w1, w2=w2)
    impls = {
        "naive": lambda *a: tensor_attention(*a, method="naive", **kw),
        "blocked": lambda *a: tensor_attention(*a, method="blocked", block_size=(3, 4), **kw),
    }
    if causal:
        impls["simplicial"] = lambda *a: tensor_attention(
            *a, method="simplicial", block_size=2, **kw
        )
    check_equivalent(_jit_all(impls), *args)
    if float_dtype == jnp.float64:
        assert_close(_tensor_direct(*args, **kw), impls["naive"](*args))


def test_tensor_weights_reproduce_naive(x64):
    q, k1, k2, v1, v2 = _tensor_inputs(6)
    mask = _lengths_mask([4, 6], 6)
    w = tensor_attention_weights(q, k1, k2, causal=True, mask=mask, w1=4)
    np.testing.assert_allclose(np.asarray(w.sum(axis=(2, 3)))[0, :4], 1.0)
    got = jnp.einsum("blij,bic,bjc->blc", w, v1, v2)
    want = tensor_attention(q, k1, k2, v1, v2, method="naive", causal=True, mask=mask, w1=4)
    assert_close(want, got)


@pytest.mark.parametrize("method", ["naive", "blocked", "simplicial", "approx"])
def test_tensor_masking(x64, method):
    n = 7
    q, k1, k2, v1, v2 = _tensor_inputs(n)
    mask = jnp.asarray([[True] * 5 + [False] * 2, [False] * n])
    kw = dict(method=method, mask=mask, causal=method == "simplicial")
    f = jax.jit(lambda *a: tensor_attention(*a, **kw))
    out = f(q, k1, k2, v1, v2)
    poked = [jnp.asarray(a).at[0, 5:].set(30.0) for a in (k1, k2, v1, v2)]
    assert_close(out[0], f(q, *poked)[0], atol=1e-12)  # masked keys have no influence
    assert np.all(np.asarray(out[1]) == 0.0)  # no valid pair: zero output
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4))(q, k1, k2, v1, v2)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_tensor_approx_error_falls_with_degree_within_bound(x64):
    n, bound = 24, 0.7
    args = _tensor_inputs(n, d=4, bound=bound)
    exact = jax.jit(partial(tensor_attention, method="naive"))(*args)
    errors = []
    for degree in (2, 4, 6):
        # Chunks of 5 positions: several chunks and a padded last one.
        approx = partial(tensor_attention, method="approx", degree=degree, block_size=5)
        got = jax.jit(approx)(*args)
        err = np.abs(np.asarray(got - exact))
        eps, out_bound = tensor_attention_error_bound(*args, degree=degree)
        assert np.all(np.asarray(eps) < 1)
        assert np.all(err <= np.asarray(out_bound)[:, None, :])
        errors.append(err.max())
    assert errors[0] > 10 * errors[1] > 100 * errors[2] > 0


def test_tensor_approx_matches_naive_masked_and_causal(x64):
    """Small entries make the Taylor remainder negligible: structure (mask, causal) is exact.

    Chunks of 4 positions: the causal prefix sums cross chunk boundaries and a padded chunk.
    """
    args = _tensor_inputs(9, d=3, bound=0.2)
    mask = _lengths_mask([6, 9], 9)
    f = lambda method, **kw: (
        lambda *a: tensor_attention(*a, method=method, causal=True, mask=mask, degree=4, **kw)
    )
    impls = {"naive": f("naive"), "approx": f("approx", block_size=4)}
    check_equivalent(_jit_all(impls), *args, ratio=1e-9)


def test_tensor_approx_default_degree_meets_target(x64):
    """Head dimension 8, q, k1, k2 uniform in [−½, ½]: relative error ≤ 1e-2 (issue target)."""
    args = _tensor_inputs(64, d=8, dv=8, b=1, bound=0.5)
    exact = jax.jit(partial(tensor_attention, method="naive"))(*args)
    got = jax.jit(partial(tensor_attention, method="approx"))(*args)
    rel = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
    assert rel <= 1e-2
    eps, _ = tensor_attention_error_bound(*args)
    assert float(eps[0]) < 1e-4  # the documented worst case for this setting is 7e-5


def test_tensor_low_precision_computes_in_float32():
    args = _tensor_inputs(8, dtype=jnp.float32)
    ref = jax.jit(partial(tensor_attention, method="naive"))(*args)
    low = [a.astype(jnp.bfloat16) for a in args]
    for method in ("blocked", "approx"):
        got = jax.jit(partial(tensor_attention, method=method))(*low)
        assert got.dtype == jnp.bfloat16
        assert_close(ref, got, ratio=5e-2)


def test_tensor_errors():
    q = jnp.zeros((1, 5, 4))
    v = jnp.zeros((1, 5, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        tensor_attention(q, q, q, v, v, method="fast")
    with pytest.raises(ValueError, match=r"\(B, n, d\)"):
        tensor_attention(q[0], q, q, v, v)
    with pytest.raises(ValueError, match="same shape"):
        tensor_attention(q, q[:, :4], q, v, v)
    with pytest.raises(ValueError, match="v1 and v2"):
        tensor_attention(q, q, q, v, v[:, :4])
    with pytest.raises(ValueError, match="causal=True"):
        tensor_attention(q, q, q, v, v, method="simplicial")
    with pytest.raises(ValueError, match="needs causal=True"):
        tensor_attention(q, q, q, v, v, w1=2)
    with pytest.raises(ValueError, match="w1 must be a positive integer"):
        tensor_attention(q, q, q, v, v, causal=True, w1=0)
    with pytest.raises(ValueError, match="even"):
        tensor_attention(q, q, q, v, v, method="approx", degree=3)
    with pytest.raises(ValueError, match="windows"):
        tensor_attention(q, q, q, v, v, method="approx", causal=True, w2=2)
    with pytest.raises(ValueError, match="block_size"):
        tensor_attention(q, q, q, v, v, block_size=(2, 0))
    with pytest.raises(ValueError, match="block_size"):
        tensor_attention(q, q, q, v, v, block_size=(1, 2, 3))
    with pytest.raises(TypeError, match="boolean"):
        tensor_attention(q, q, q, v, v, mask=jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="scale"):
        tensor_attention(q, q, q, v, v, scale=float("nan"))


# ----------------------------------------------------------------------------- accelerator rules


@pytest.fixture
def small_tiles(monkeypatch):
    """A 1 KiB tile budget and 2-key softmax blocks: the accelerator rules' blocked, chunked
    and query-blocked forms at test sizes (at the default budget small inputs take one step)."""
    monkeypatch.setattr(attention_common, "ACCEL_TILE_BYTES", 1024)
    monkeypatch.setattr(attention_softmax, "_MIN_ACCEL_BLOCK", 2)


def test_softmax_block_size_rule():
    target = (2, 1, 16384, 16384)  # B, heads, Lq, Lk of benchmarks/accelerator.py
    assert softmax_block_size(*target, backend="cpu") is None
    for backend in ("gpu", "tpu"):
        assert softmax_block_size(*target, backend=backend) == 2048  # (2, 1, L, 2048) f32
        assert softmax_block_size(*target, dtype=jnp.float64, backend=backend) == 1024
        assert softmax_block_size(2, 1, 4096, 4096, backend=backend) is None  # fits: dense
        assert softmax_block_size(64, 16, 16384, 16384, backend=backend) == 128  # the floor
    with ssmix.auto_backend("tpu"):
        assert softmax_block_size(*target) == 2048


def _train_stats(fn, *shapes):
    """trace_stats of fn's forward + gradient w.r.t. every input, at float32 input shapes."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    loss = lambda *a: jnp.sum(fn(*a))
    return trace_stats(jax.grad(loss, argnums=tuple(range(len(args)))), *args)


def test_accelerator_rules_bound_loops_and_memory_at_long_length():
    """B = 2, L = 16384 (TensorAttention: 8 heads of 8 folded into the batch), traced only."""
    n, mib = 16384, 2**20
    with ssmix.auto_backend("gpu"):
        block = softmax_block_size(2, 1, n, n)
        stats = _train_stats(partial(softmax_attention, block_size=block), *[(2, 1, n, 64)] * 3)
        assert stats.loop_iterations == 2 * n // block <= 64, stats
        assert stats.largest_bytes <= 256 * mib, stats
        shapes = [(16, n, 8)] * 5
        for method, kw, max_loops in [
            ("blocked", {}, 4 * 528384),  # ≥ 2·B·n³·4 B / 256 MiB steps to stay in budget
            ("simplicial", {"causal": True, "w1": 64, "w2": 64}, 100),
            ("approx", {}, 8),  # 2 chunks; without remat their features stack to 495 MiB
        ]:
            stats = _train_stats(partial(tensor_attention, method=method, **kw), *shapes)
            assert stats.largest_bytes <= 256 * mib, (method, stats)
            assert stats.loop_iterations <= max_loops, (method, stats)


def _traced_under(backend, fn):
    """``fn`` jitted so that it is traced under ``auto_backend(backend)``."""

    def under(*args):
        with ssmix.auto_backend(backend):
            return fn(*args)

    return jax.jit(under)


def test_tensor_accelerator_forms_match(x64, small_tiles):
    """Under the GPU rules with 1 KiB tiles (n = 11: a prime, no multiple of any block):
    causal approx in rematerialised chunks of 2 == approx in one chunk as on CPU (same degree:
    only chunking and remat differ); simplicial in query blocks of 4 == naive."""
    n = 11
    args = _tensor_inputs(n, d=3, dv=2, bound=0.3)
    mask = _lengths_mask([8, n], n)
    approx = partial(tensor_attention, method="approx", causal=True, mask=mask, degree=2)
    impls = {"cpu approx": _traced_under("cpu", approx), "gpu approx": _traced_under("gpu", approx)}
    check_equivalent(impls, *args)
    win = {"causal": True, "mask": mask, "w1": 3, "w2": 4}
    impls = {
        "naive": jax.jit(partial(tensor_attention, method="naive", **win)),
        "gpu simplicial": _traced_under(
            "gpu", partial(tensor_attention, method="simplicial", block_size=2, **win)
        ),
    }
    check_equivalent(impls, *args)
