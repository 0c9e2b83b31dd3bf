"""Every linear_scan method against the Python-loop reference: states, final state, gradients;
the accelerator rules (loop-free decay gradient, no loop in "auto", lowering for cuda / tpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmix
from ssmix.kernels.scan import METHODS, auto_method, linear_scan, linear_scan_naive, step
from ssmix.testing import assert_close, check_equivalent, trace_stats


def _method_impls(reverse, chunk_sizes=(3, 64)):
    """Every method; "chunked" at every chunk size, "parallel" at the first (several chunks and
    a partial one at the lengths below, where its default would be one chunk)."""
    impls = {}
    for method in METHODS:
        sizes = {"chunked": chunk_sizes, "parallel": chunk_sizes[:1]}.get(method, (64,))
        for cs in sizes:
            name = f"{method}[{cs}]" if method in ("chunked", "parallel") else method

            def fn(a, b, x0, method=method, cs=cs):
                return linear_scan(a, b, x0, reverse=reverse, method=method, chunk_size=cs)

            impls[name] = fn
    return impls


def _problem(key, B, L, S, *, complex_, time_varying, with_init, dtype):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape_a = (1, L, *S) if time_varying else S[-1:]
    # |a| < 1 keeps long recurrences bounded, as a stable SSM's discretised decay would be.
    a = 0.95 * jnp.tanh(jax.random.normal(k1, shape_a, dtype))
    b = jax.random.normal(k2, (B, L, *S), dtype)
    x0 = jax.random.normal(k3, (B, *S), dtype) if with_init else None
    if complex_:
        a = a * jnp.exp(1j * jax.random.uniform(k4, shape_a, dtype, 0, np.pi))
        b = b + 1j * jax.random.normal(k4, b.shape, dtype)
    return a, b, x0


def _naive(reverse):
    return lambda a, b, x0: linear_scan_naive(a, b, x0, reverse=reverse)


def _lax_scan(reverse):
    """A second, independent reference: plain `lax.scan` over time-major arrays, with JAX's
    own autodiff. It checks gradients at lengths where differentiating the Python loop op by
    op would only cost time."""

    def fn(a, b, x0):
        S = b.shape[2:]
        time_varying = a.ndim == b.ndim
        a = jnp.broadcast_to(a, (b.shape[0], *b.shape[1:]) if time_varying else S)
        dtype = jnp.result_type(a, b) if x0 is None else jnp.result_type(a, b, x0)
        x = jnp.zeros((b.shape[0], *S), dtype) if x0 is None else x0.astype(dtype)
        xs = (
            (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0))
            if time_varying
            else jnp.moveaxis(b, 1, 0)
        )

        def body(x, inp):
            a_t, b_t = inp if time_varying else (a, inp)
            x = a_t * x + b_t
            return x, x

        final, states = jax.lax.scan(body, x, xs, reverse=reverse)
        return jnp.moveaxis(states, 0, 1), final

    return fn


# Each length is checked forward and in reverse, with and without an initial state, with a
# constant or time-varying, real or complex decay: pairwise coverage keeps the suite short.
CASES = [
    (1, False, True, False, True),
    (1, True, False, True, False),
    (2, False, False, True, True),
    (2, True, True, False, False),
    (7, False, True, True, False),
    (7, True, False, False, True),
    (97, False, False, False, True),
    (97, True, True, True, False),
    (128, False, True, False, False),
    (128, True, False, True, True),
]


def _check_case(L, reverse, with_init, time_varying, complex_, dtype, seed):
    a, b, x0 = _problem(
        jax.random.PRNGKey(seed),
        2,
        L,
        (3, 2),
        complex_=complex_,
        time_varying=time_varying,
        with_init=with_init,
        dtype=dtype,
    )
    impls = {"lax.scan": _lax_scan(reverse), **_method_impls(reverse)}
    if L <= 7:  # the Python loop is differentiated op by op: only at short lengths
        impls = {"loop": _naive(reverse), **impls}
    else:
        assert_close(_naive(reverse)(a, b, x0), impls["lax.scan"](a, b, x0), name="loop")
    check_equivalent(impls, a, b, x0)


@pytest.mark.parametrize("L,reverse,with_init,time_varying,complex_", CASES)
def test_methods_match_references_float64(x64, L, reverse, with_init, time_varying, complex_):
    _check_case(L, reverse, with_init, time_varying, complex_, jnp.float64, L)


@pytest.mark.parametrize("L,reverse,with_init,time_varying,complex_", CASES[1::2])
def test_methods_match_references_float32(L, reverse, with_init, time_varying, complex_):
    _check_case(L, reverse, with_init, time_varying, complex_, jnp.float32, L + 1)


@pytest.mark.parametrize("reverse", [False, True])
def test_long_sequence(x64, reverse):
    a, b, x0 = _problem(
        jax.random.PRNGKey(7),
        2,
        1000,
        (4,),
        complex_=True,
        time_varying=False,
        with_init=True,
        dtype=jnp.float64,
    )
    impls = {"lax.scan": _lax_scan(reverse), **_method_impls(reverse, chunk_sizes=(64, 333))}
    assert_close(_naive(reverse)(a, b, x0), impls["lax.scan"](a, b, x0), name="loop")
    check_equivalent(impls, a, b, x0)


@settings(max_examples=5)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 16),
    S=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    chunk=st.integers(1, 17),
    reverse=st.booleans(),
    time_varying=st.booleans(),
    complex_=st.booleans(),
    with_init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(B, L, S, chunk, reverse, time_varying, complex_, with_init, seed):
    with jax.enable_x64(True):
        a, b, x0 = _problem(
            jax.random.PRNGKey(seed),
            B,
            L,
            S,
            complex_=complex_,
            time_varying=time_varying,
            with_init=with_init,
            dtype=jnp.float64,
        )
        impls = {"loop": _naive(reverse), **_method_impls(reverse, chunk_sizes=(chunk,))}
        check_equivalent(impls, a, b, x0)


def test_batch_shared_and_broadcast_decays(x64):
    """A decay broadcast within the state (one value per row) and one per batch element."""
    key = jax.random.PRNGKey(3)
    b = jax.random.normal(key, (2, 9, 3, 4))
    for a in [
        0.5 * jnp.ones((3, 1)),
        jnp.linspace(-0.9, 0.9, 2 * 9 * 3).reshape(2, 9, 3, 1),
    ]:
        impls = {"loop": _naive(False), **_method_impls(False, chunk_sizes=(4,))}
        check_equivalent(impls, a, b, None)


def test_step_matches_scan(x64):
    a, b, x0 = _problem(
        jax.random.PRNGKey(5),
        2,
        6,
        (3,),
        complex_=True,
        time_varying=True,
        with_init=True,
        dtype=jnp.float64,
    )
    states, final = linear_scan(a, b, x0)
    x = x0
    for t in range(6):
        x = step(x, a[:, t], b[:, t])
        assert_close(states[:, t], x)
    assert_close(final, x)


def test_zero_decay_and_unit_decay(x64):
    b = jax.random.normal(jax.random.PRNGKey(0), (1, 11, 2))
    for method in METHODS:
        states, _ = linear_scan(jnp.zeros(2), b, method=method, chunk_size=4)
        assert_close(states, b)  # a = 0: no memory
        states, final = linear_scan(jnp.ones(2), b, method=method, chunk_size=4)
        assert_close(states, jnp.cumsum(b, axis=1))  # a = 1: running sum
        assert_close(final, jnp.sum(b, axis=1))


def test_bfloat16_inputs_accumulate_in_float32():
    b = jnp.ones((1, 300, 2), jnp.bfloat16)
    a = jnp.ones(2, jnp.bfloat16)
    for method in METHODS:
        states, final = linear_scan(a, b, method=method)
        assert states.dtype == jnp.bfloat16
        # A bfloat16 running sum would stall at 256; float32 accumulation reaches 300.
        assert float(final[0, 0]) == 300.0


def test_bad_inputs():
    b = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        linear_scan(jnp.ones(3), b, method="fft")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        linear_scan(jnp.ones(3), b, method="chunked", chunk_size=0)
    with pytest.raises(ValueError, match=r"b must have shape \(B, L, \*S\)"):
        linear_scan(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="at least 1"):
        linear_scan(jnp.ones(3), jnp.ones((2, 0, 3)))
    with pytest.raises(ValueError, match="time-varying decay"):
        linear_scan(jnp.ones((2, 4, 3)), b)
    with pytest.raises(ValueError, match="does not broadcast"):
        linear_scan(jnp.ones(4), b)
    with pytest.raises(ValueError, match="constant with a shape broadcastable"):
        linear_scan(jnp.ones((1, 1, 5, 3)), b)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_scan(jnp.ones(3), b, jnp.ones((3,)))
    with pytest.raises(TypeError, match="floating-point"):
        linear_scan(jnp.ones(3, jnp.int32), jnp.ones((2, 5, 3), jnp.int32))


def test_parallel_zero_and_negative_time_varying_decays(x64):
    """The log-space decay matrices of "parallel" with exact zeros (``log 0`` is never taken)
    and negative real decays (sign by parity): real forward, complex in reverse. (Constant
    zero and negative decays are in the cases above.)"""
    rng = np.random.default_rng(11)
    L, S = 13, (2, 3)
    for complex_, reverse in ((False, False), (True, True)):
        a = rng.uniform(-1.2, 1.0, (1, L, *S))
        a[rng.uniform(size=a.shape) < 0.25] = 0.0
        b = rng.normal(size=(2, L, *S))
        if complex_:
            a = a * np.exp(1j * rng.uniform(0, 2 * np.pi, a.shape))
            b = b + 1j * rng.normal(size=b.shape)
        impls = {
            "lax.scan": _lax_scan(reverse),
            "parallel": lambda a, b, x0, r=reverse: linear_scan(
                a, b, x0, reverse=r, method="parallel", chunk_size=4
            ),
        }
        x0 = jnp.asarray(rng.normal(size=(2, *S)))
        check_equivalent(impls, jnp.asarray(a), jnp.asarray(b), x0)


def test_accelerator_decay_gradient_equals_cpu(x64):
    """Under the accelerator rules the decay gradient is a shifted product and a reduction
    (no loop); it equals the CPU rules' loop, with a decay broadcast over the batch and a
    state axis so that both reductions run: constant forward, time-varying in reverse."""
    rng = np.random.default_rng(5)
    L = 11
    b = rng.normal(size=(2, L, 3, 2)) + 1j * rng.normal(size=(2, L, 3, 2))
    x0 = jnp.asarray(rng.normal(size=(2, 3, 2)) + 0j)
    for a_shape, reverse in (((3, 1), False), ((1, L, 3, 1), True)):
        a = jnp.asarray(rng.uniform(-0.9, 0.9, a_shape))

        def make(backend, reverse=reverse):
            def fn(decay, inputs, init):
                with ssmix.auto_backend(backend):
                    return linear_scan(decay, inputs, init, reverse=reverse, method="sequential")

            return fn

        check_equivalent({"cpu": make("cpu"), "gpu": make("gpu")}, a, jnp.asarray(b), x0)


def _grad_loops(backend, method="auto", L=16384, time_varying=False):
    """Loop iterations of the scan's forward + backward, traced (not run) at length ``L``."""
    a = jax.ShapeDtypeStruct((1, L, 32) if time_varying else (32,), jnp.complex64)
    b = jax.ShapeDtypeStruct((2, L, 32), jnp.complex64)
    x0 = jax.ShapeDtypeStruct((2, 32), jnp.complex64)

    def loss(a, b, x0):
        states, final = linear_scan(a, b, x0, method=method)
        return jnp.sum(jnp.abs(states) ** 2) + jnp.sum(jnp.abs(final) ** 2)

    with ssmix.auto_backend(backend):
        return trace_stats(jax.grad(loss, argnums=(0, 1, 2)), a, b, x0)


def test_accelerator_rules_have_no_loops():
    """ "auto" is "parallel" with a loop-free backward on GPU / TPU, "chunked" on CPU; the
    decay gradient stops looping for every method; the backend is resolved per call (no jit
    cache hit carries one backend's form into another's)."""
    assert auto_method("cpu") == "chunked"
    assert auto_method("gpu") == auto_method("tpu") == "parallel"
    for backend in ("gpu", "tpu"):
        for time_varying in (False, True):
            stats = _grad_loops(backend, time_varying=time_varying)
            assert stats.loop_iterations == 0 and stats.unknown_loops == 0
            assert stats.largest_bytes <= 256 * 2**20
    assert _grad_loops("gpu", "associative").loop_iterations == 0
    assert _grad_loops("cpu", "associative").loop_iterations == 16383  # the decay gradient
    assert _grad_loops("cpu").loop_iterations > 16384  # chunked, as before the rules


def test_default_method_on_cpu_is_chunked_64():
    """Calls without ``method=`` trace exactly as before the backend rules on CPU."""
    a, b = jnp.full((3,), 0.5), jnp.ones((2, 100, 3))
    with ssmix.auto_backend("cpu"):
        default = jax.make_jaxpr(lambda a, b: linear_scan(a, b))(a, b)
        chunked = jax.make_jaxpr(lambda a, b: linear_scan(a, b, method="chunked", chunk_size=64))
        assert str(default) == str(chunked(a, b))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_parallel_forward_backward_lowers(platform):
    """The loop-free forward + backward (constant and time-varying, complex) lowers for the
    accelerators from a CPU host, without a while loop."""

    def loss(a, b, x0):
        states, final = linear_scan(a, b, x0, method="parallel", chunk_size=4, reverse=True)
        return jnp.sum(jnp.abs(states) ** 2) + jnp.sum(jnp.abs(final) ** 2)

    b = jnp.ones((2, 13, 3), jnp.complex64)
    x0 = jnp.ones((2, 3), jnp.complex64)
    for a in (jnp.full((3,), 0.5 + 0.1j), jnp.full((1, 13, 3), 0.5 - 0.2j)):
        with ssmix.auto_backend("gpu"):
            traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(a, b, x0)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.while" not in text
