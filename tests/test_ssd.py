"""SSD and quasiseparable kernels: chunked = parallel = sequential = materialised, the
backend rules and the accelerator shape of the parallel form, structure, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmix
from ssmix.kernels.ssd import (
    auto_method,
    default_chunk_size,
    naive,
    parallel,
    quasiseparable,
    quasiseparable_matrix,
    ssd,
    ssd_matrix,
)
from ssmix.testing import assert_close, check_equivalent, trace_stats

METHODS = ("materialized", "sequential", "chunked", "parallel")


def make_ssd(b=2, L=13, H=4, P=3, G=2, N=5, seed=0, dtype=jnp.float64, a_scale=1.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (b, L, H, P), dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, L, H), dtype) - 1)
    A = -a_scale * jnp.exp(jax.random.normal(k[2], (H,), dtype))
    B = jax.random.normal(k[3], (b, L, G, N), dtype)
    C = jax.random.normal(k[4], (b, L, G, N), dtype)
    h0 = jax.random.normal(k[5], (b, H, P, N), dtype)
    return x, dt, A, B, C, h0


def ssd_impls(chunk_size, methods=METHODS):
    """Each implementation returns both directions (and their final states) from one call,
    so one comparison covers forward and reverse with an initial state."""

    def impl(method):
        def f(x, dt, A, B, C, h0):
            kw = dict(chunk_size=chunk_size, initial_state=h0, method=method)
            return ssd(x, dt, A, B, C, **kw), ssd(x, dt, A, B, C, reverse=True, **kw)

        return jax.jit(f)

    return {m: impl(m) for m in methods}


@pytest.mark.parametrize(
    "L, chunk, G",
    [
        (13, 4, 2),  # prime length, not a multiple of the chunk, G < Hh
        (1, 4, 1),  # L = 1, chunk longer than the sequence, a single group
    ],
)
def test_ssd_methods_agree_float64(x64, L, chunk, G):
    check_equivalent(ssd_impls(chunk), *make_ssd(L=L, G=G))


def test_ssd_methods_agree_float32_with_strong_decay():
    # Decay rates from 1 to 300: exp(A·Σdt) underflows across a chunk in the fast heads. The
    # segment sums are masked before the exponential, so nothing overflows in float32 and
    # neither outputs nor gradients see inf or NaN.
    # L ≥ 256 also takes the sequential method's blockwise-rematerialised path.
    x, dt, A, B, C, h0 = make_ssd(b=1, L=261, H=4, P=2, N=3, dtype=jnp.float32, seed=3)
    A = -jnp.array([1.0, 10.0, 100.0, 300.0], jnp.float32)
    impls = ssd_impls(16)
    del impls["materialized"]
    check_equivalent(impls, x, dt, A, B, C, h0, grad_ratio=1e-3)


def test_ssd_parallel_associative_state_passing_and_head_blocks_float64(x64):
    # Past parallel.MATMUL_MAX_CHUNKS chunks (here past 0) the states pass between chunks by
    # the associative scan instead of the segment-sum matmul; a tiny (Q, Q) budget also
    # splits the 2 heads of each group into blocks run by lax.map.
    x, dt, A, B, C, h0 = make_ssd(L=13, H=4, G=2)
    kw = dict(qq_budget_bytes=1, matmul_max_chunks=0)
    blocked = lambda *a: parallel.ssd_parallel(*a, 3, **kw)  # noqa: E731
    assert trace_stats(blocked, x, dt, A, B, C, h0).loop_iterations == 2
    impls = {"naive": lambda *a: naive.ssd_naive(*a, False), "parallel": blocked}
    check_equivalent({k: jax.jit(f) for k, f in impls.items()}, x, dt, A, B, C, h0)


def test_ssd_parallel_bfloat16_accumulates_in_float32():
    x, dt, A, B, C, h0 = make_ssd(L=19, dtype=jnp.bfloat16)
    y, h = ssd(x, dt, A, B, C, chunk_size=8, initial_state=h0, reverse=True, method="parallel")
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    x, dt, A, B, C, h0 = (v.astype(jnp.float32) for v in (x, dt, A, B, C, h0))
    kw = dict(initial_state=h0, reverse=True, method="materialized")
    y_ref, h_ref = ssd(x, dt, A, B, C, **kw)
    assert_close(y_ref, y.astype(jnp.float32), ratio=2e-2)
    assert_close(h_ref, h, ratio=1e-4)


def test_auto_rules_per_backend():
    assert [auto_method(b) for b in ("cpu", "gpu", "tpu")] == ["chunked", "parallel", "parallel"]
    assert [default_chunk_size(b) for b in ("cpu", "gpu", "tpu")] == [64, 128, 128]
    with ssmix.auto_backend("tpu"):
        assert (auto_method(), default_chunk_size()) == ("parallel", 128)
    with pytest.raises(ValueError, match="backend must be one of"):
        auto_method("metal")


def _hydra_kernel_shapes(L, b=2):
    """ShapeDtypeStructs of quasiseparable's arguments at Hydra's default shape (d_model 64:
    2 heads of 64, d_state 64, one group)."""
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return (S(b, L, 2, 64), S(b, L, 2), S(b, L, 2), S(2), *[S(b, L, 1, 64)] * 4, S(b, L, 2))


def _grad_all(f, n):
    return jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 2), argnums=tuple(range(n)))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_is_loop_free_on_accelerators(backend):
    # Forward + backward of the default method, traced (nothing runs) at L = 16384: no loop at
    # all, and no (..., Q, Q) tensor or other intermediate above 256 MiB.
    args = _hydra_kernel_shapes(16384)
    qs = lambda *a: (quasiseparable(*a),)  # noqa: E731
    sd = lambda x, dt, A, B, C: ssd(x, dt, A, B, C)  # noqa: E731
    with ssmix.auto_backend(backend):
        for name, f, a in (("qs", qs, args), ("ssd", sd, (*args[:2], args[3], *args[4:6]))):
            stats = trace_stats(_grad_all(f, len(a)), *a)
            assert stats.loop_iterations == 0, (name, stats.loops)
            assert stats.largest_bytes <= 256 * 2**20, (name, stats.largest)
    with ssmix.auto_backend("cpu"):  # the CPU keeps the chunked loop: one step per chunk
        assert trace_stats(_grad_all(qs, 9), *_hydra_kernel_shapes(1024)).loop_iterations == 32


@pytest.mark.parametrize("L, chunk", [(37, 4), (131, 2)])
def test_quasiseparable_parallel_lowers_for_cuda_and_tpu(L, chunk):
    # Both state-passing forms (matmul over 10 chunks, associative scan over 66), fwd + bwd.
    args, states = make_qs(b=1, L=L, H=2, P=2, N=3, G=1, dtype=jnp.float32)

    def loss(*a):
        y = quasiseparable(*a, chunk_size=chunk, initial_states=states, method="parallel")
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(9))))
    for platform in ("cuda", "tpu"):
        grad.trace(*args).lower(lowering_platforms=(platform,))


def test_ssd_outputs_and_final_state_dtypes():
    x, dt, A, B, C, h0 = make_ssd(dtype=jnp.bfloat16)
    y, h = ssd(x, dt, A, B, C, chunk_size=4)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert h.dtype == jnp.float32 and h.shape == h0.shape


def test_ssd_final_state_is_the_last_state_and_chains(x64):
    # Running two halves with the state handed over equals running the whole sequence.
    x, dt, A, B, C, _ = make_ssd(L=12)
    y, h = ssd(x, dt, A, B, C, chunk_size=4)
    y1, h1 = ssd(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], chunk_size=4)
    y2, h2 = ssd(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], chunk_size=4, initial_state=h1)
    assert_close(y, jnp.concatenate([y1, y2], axis=1))
    assert_close(h, h2)


def test_ssd_matrix_matches_definition(x64):
    x, dt, A, B, C, _ = make_ssd(L=6, G=2, H=4)
    M = np.asarray(ssd_matrix(dt, A, B, C))
    Mr = np.asarray(ssd_matrix(dt, A, B, C, reverse=True))
    dt_, A_, B_, C_ = map(np.asarray, (dt, A, B, C))
    for h in range(4):
        g = h // 2
        for t in range(6):
            for s in range(6):
                cb = C_[0, t, g] @ B_[0, s, g]
                fw = np.exp(A_[h] * dt_[0, s + 1 : t + 1, h].sum()) * dt_[0, s, h] * cb
                bw = np.exp(A_[h] * dt_[0, t:s, h].sum()) * dt_[0, s, h] * cb
                np.testing.assert_allclose(M[0, h, t, s], fw if s <= t else 0.0, rtol=1e-12)
                np.testing.assert_allclose(Mr[0, h, t, s], bw if s >= t else 0.0, rtol=1e-12)


@settings(max_examples=3)
@given(L=st.integers(1, 30), chunk=st.integers(1, 9), reverse=st.booleans())
def test_ssd_chunked_equals_sequential_any_length(L, chunk, reverse):
    with jax.enable_x64(True):
        x, dt, A, B, C, h0 = make_ssd(L=L, seed=L)
        kw = dict(chunk_size=chunk, initial_state=h0, reverse=reverse)
        assert_close(
            ssd(x, dt, A, B, C, method="sequential", **kw),
            ssd(x, dt, A, B, C, method="chunked", **kw),
        )


# ------------------------------------------------------------------------------------------
# Quasiseparable


def make_qs(b=2, L=11, H=4, P=3, G=2, N=5, seed=0, dtype=jnp.float64):
    x, dt_fw, A, B_fw, C_fw, h_fw = make_ssd(b, L, H, P, G, N, seed, dtype)
    _, dt_bw, _, B_bw, C_bw, h_bw = make_ssd(b, L, H, P, G, N, seed + 100, dtype)
    diag = jax.random.normal(jax.random.PRNGKey(seed + 7), (b, L, H), dtype)
    return (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag), (h_fw, h_bw)


def qs_impls(chunk_size, with_state):
    def impl(method):
        if with_state:
            return lambda *a: quasiseparable(
                *a[:9], chunk_size=chunk_size, initial_states=a[9:], method=method
            )
        return lambda *a: quasiseparable(*a, chunk_size=chunk_size, method=method)

    return {m: jax.jit(impl(m)) for m in METHODS}


@pytest.mark.parametrize("L, chunk, G, with_state", [(11, 4, 2, True), (1, 4, 4, False)])
def test_quasiseparable_methods_agree_float64(x64, L, chunk, G, with_state):
    args, states = make_qs(L=L, G=G)
    check_equivalent(qs_impls(chunk, with_state), *args, *(states if with_state else ()))


def _shift_rows(M):
    return jnp.pad(M[..., :-1, :], ((0, 0), (0, 0), (1, 0), (0, 0)))


def test_quasiseparable_matrix_is_shift_flip_of_ssd_matrices(x64):
    # M = S·M_fw + F·S·M'_bw·F + diag, with S the one-step shift and F the flip, M'_bw the SSD
    # matrix of the flipped backward parameters: the definition in REFERENCE §7.
    (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag), _ = make_qs(L=9)
    flip = lambda v: jnp.flip(v, 1)  # noqa: E731
    M_fw = _shift_rows(ssd_matrix(dt_fw, A, B_fw, C_fw))
    M_bw = _shift_rows(ssd_matrix(flip(dt_bw), A, flip(B_bw), flip(C_bw)))[..., ::-1, ::-1]
    M_diag = jnp.eye(9) * jnp.moveaxis(diag, 1, 2)[..., None]
    M = quasiseparable_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    assert_close(M_fw + M_bw + M_diag, M)
    y = quasiseparable(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, chunk_size=4)
    assert_close(jnp.einsum("bhts,bshp->bthp", M, x), y)


def test_quasiseparable_matrix_parts_depend_on_their_parameters_only(x64):
    (_, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag), _ = make_qs(L=7)
    L = 7
    names = ("dt_fw", "dt_bw", "B_fw", "C_fw", "B_bw", "C_bw", "diag")
    params = (dt_fw, dt_bw, B_fw, C_fw, B_bw, C_bw, diag)
    r = jax.random.normal(jax.random.PRNGKey(1), (2, 4, L, L))

    def matrix(dt_fw, dt_bw, B_fw, C_fw, B_bw, C_bw, diag):
        return quasiseparable_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)

    _, vjp = jax.vjp(matrix, *params)

    def part_grads(part_mask):
        return dict(zip(names, vjp(jnp.where(part_mask, r, 0)), strict=True))

    M = quasiseparable_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    assert_close(jnp.moveaxis(diag, 1, 2), jnp.diagonal(M, axis1=-2, axis2=-1))
    lower = jnp.tril(jnp.ones((L, L), bool), -1)
    depends = {
        "diagonal": (jnp.eye(L, dtype=bool), {"diag"}),
        "strictly lower": (lower, {"dt_fw", "B_fw", "C_fw"}),
        "strictly upper": (lower.T, {"dt_bw", "B_bw", "C_bw"}),
    }
    for part, (mask, allowed) in depends.items():
        grads = part_grads(mask)
        for name, g in grads.items():
            nonzero = bool(jnp.any(g != 0))
            assert nonzero == (name in allowed), f"{part} part vs {name}: nonzero={nonzero}"


# ------------------------------------------------------------------------------------------
# Errors


def test_ssd_rejects_bad_arguments():
    x, dt, A, B, C, h0 = make_ssd(dtype=jnp.float32)
    cases = [
        (dict(x=x[0]), r"x must have shape \(B, L, Hh, P\)"),
        (dict(x=x[:, :0]), "positive length"),
        (dict(dt=dt[:, :-1]), r"dt must have shape \(B, L, Hh\)"),
        (dict(A=A[:-1]), r"A must have shape \(Hh,\)"),
        (dict(B=B[:, :, :1]), "B and C must both have shape"),
        (dict(B=B[:, :, :, :1], C=C[:, :, :, :1]), None),
        (dict(B=jnp.zeros((2, 13, 3, 5)), C=jnp.zeros((2, 13, 3, 5))), "G = 3 .* must divide"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(chunk_size=-3), "chunk_size must be a positive integer"),
        (dict(chunk_size=2.5), "chunk_size must be a positive integer"),
        (dict(method="fft"), "method must be one of"),
        (dict(initial_state=h0[:, :, :1]), r"initial_state must have shape \(B, Hh, P, N\)"),
    ]
    for change, msg in cases:
        kw = dict(x=x, dt=dt, A=A, B=B, C=C, chunk_size=4)
        kw.update(change)
        args = [kw.pop(k) for k in ("x", "dt", "A", "B", "C")]
        if msg is None:
            ssd(*args, **kw)  # a different N for B and C together is fine
            continue
        with pytest.raises(ValueError, match=msg):
            ssd(*args, **kw)
    with pytest.raises(TypeError, match="floating-point"):
        ssd(*(v.astype(jnp.int32) for v in (x, dt, A, B, C)))


def test_quasiseparable_rejects_bad_arguments():
    args, (h_fw, h_bw) = make_qs(dtype=jnp.float32)
    names = ("x", "dt_fw", "dt_bw", "A", "B_fw", "C_fw", "B_bw", "C_bw", "diag")
    cases = [
        ("dt_bw", args[2][:, :-1], "dt_bw must have the shape of dt_fw"),
        ("dt_fw", args[1][:, :-1], r"dt_fw must have shape \(B, L, Hh\)"),
        ("C_bw", args[7][..., :-1], "B_bw and C_bw must have the shape of B_fw"),
        ("B_fw", args[4][:, :, :1], "B_fw and C_fw must both have shape"),
        ("diag", args[8][..., :1], r"diag must have shape \(B, L, Hh\)"),
    ]
    for name, value, msg in cases:
        bad = list(args)
        bad[names.index(name)] = value
        with pytest.raises(ValueError, match=msg):
            quasiseparable(*bad)
    with pytest.raises(ValueError, match="initial_states must be a pair"):
        quasiseparable(*args, initial_states=h_fw)
    with pytest.raises(ValueError, match="initial_states h_bw must have shape"):
        quasiseparable(*args, initial_states=(h_fw, h_bw[..., :1]))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        quasiseparable(*args, chunk_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        quasiseparable(*args, method="dense")
    with pytest.raises(ValueError, match=r"dt_fw must have shape \(B, L, Hh\)"):
        quasiseparable_matrix(args[1][0], *args[2:])
