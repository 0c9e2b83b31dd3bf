"""linear_scan(method="pallas"): the fused Pallas kernel against the Python-loop reference in
Pallas's interpreter (states, final state, gradients w.r.t. a, b and the initial state), both
variants (TPU layout with the carry across sequential time blocks; GPU layout with one loop
over the whole length), and lowering of forward + backward for cuda (Triton) and tpu (Mosaic).

"pallas" is not in ``METHODS`` (which tests/test_scan.py iterates over): interpret mode is
slow, so it is tested here on tiny shapes only.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmix
from ssmix.kernels.scan import (
    EXPLICIT_METHODS,
    METHODS,
    auto_method,
    linear_scan,
    linear_scan_naive,
)
from ssmix.testing import assert_close, check_equivalent


def _problem(L, *, complex_, time_varying, with_init, dtype, B=2, S=(3, 5), seed=0):
    # NumPy draws: jax.random would compile its generator anew for every shape (seconds).
    rng = np.random.default_rng(seed)
    shape_a = (1, L, *S) if time_varying else S[-1:]
    # |a| < 1 keeps the recurrence bounded, as a stable SSM's discretised decay would be.
    a = 0.95 * np.tanh(rng.standard_normal(shape_a))
    b = rng.standard_normal((B, L, *S))
    x0 = rng.standard_normal((B, *S)) if with_init else None
    if complex_:
        a = a * np.exp(1j * rng.uniform(0, np.pi, shape_a))
        b = b + 1j * rng.standard_normal(b.shape)
        x0 = None if x0 is None else x0 * (1 - 0.5j)
    dtype = jnp.result_type(dtype, 1j) if complex_ else dtype
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    x0 = None if x0 is None else jnp.asarray(x0, dtype)
    return a, b, x0


# (backend whose variant is traced, L, time block, complex, time-varying, reverse, init):
# real and complex, constant and time-varying decays, both directions, with and without an
# initial state, both variants.
# Lengths: 1, a prime, and one that is not a multiple of the time block (several blocks, the
# last one partial, so the carry crosses block boundaries in both directions).
CASES = [
    ("cpu", 1, None, False, False, False, True),
    ("cpu", 7, 3, True, True, True, True),
    ("cpu", 10, 4, False, True, False, False),
    ("gpu", 7, None, True, False, True, True),
]


# The reference compiled as one program: its gradient costs less than op by op.
_naive_jit = jax.jit(linear_scan_naive, static_argnames="reverse")


@pytest.mark.parametrize("backend,L,block,complex_,time_varying,reverse,with_init", CASES)
def test_pallas_matches_naive(x64, backend, L, block, complex_, time_varying, reverse, with_init):
    """float64 through the interpreter: states, final state and every gradient equal the
    reference's to the float64 tolerance."""
    a, b, x0 = _problem(
        L, complex_=complex_, time_varying=time_varying, with_init=with_init, dtype=jnp.float64
    )

    def naive(a, b, x0):
        return _naive_jit(a, b, x0, reverse=reverse)

    def pallas(a, b, x0):
        # interpret=None: the interpreter, since the default backend here is the CPU.
        return linear_scan(a, b, x0, reverse=reverse, method="pallas", chunk_size=block)

    with ssmix.auto_backend(backend):
        check_equivalent({"naive": naive, "pallas": pallas}, a, b, x0)


def test_pallas_bfloat16_accumulates_in_float32():
    """bfloat16 inputs come back as bfloat16, computed in float32: the result is the float32
    scan of the same (exactly representable) values, rounded once."""
    a, b, x0 = _problem(9, complex_=False, time_varying=True, with_init=True, dtype=jnp.float32)
    a, b, x0 = (x.astype(jnp.bfloat16) for x in (a, b, x0))
    states, final = linear_scan(a, b, x0, method="pallas", chunk_size=4, reverse=True)
    assert states.dtype == final.dtype == jnp.bfloat16
    ref_states, ref_final = linear_scan_naive(
        a.astype(jnp.float32), b.astype(jnp.float32), x0.astype(jnp.float32), reverse=True
    )
    np.testing.assert_array_equal(
        np.asarray(states, np.float32), np.asarray(ref_states.astype(jnp.bfloat16), np.float32)
    )
    assert_close(final.astype(jnp.float32), ref_final, atol=1e-2, ratio=1e-2)


def test_pallas_is_explicit_only():
    """ "auto" never picks the kernel before it is measured on a device; "pallas" stays out of
    the tuple the other forms are iterated from."""
    assert "pallas" in EXPLICIT_METHODS and "pallas" not in METHODS
    assert {auto_method(b) for b in ("cpu", "gpu", "tpu")}.isdisjoint(EXPLICIT_METHODS)


@pytest.mark.parametrize(
    "platform,backend,marker",
    [("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_pallas_forward_backward_lowers(platform, backend, marker):
    """Forward + backward (real and complex, constant and time-varying decay, both
    directions) lower for the accelerator from a CPU host: Triton on cuda, Mosaic on tpu, one
    kernel for the forward and one for the adjoint recurrence, and no while loop outside
    them (the decay gradient is the loop-free product under the accelerator rules)."""

    def loss(a, b, x0, reverse):
        states, final = linear_scan(
            a, b, x0, method="pallas", reverse=reverse, interpret=False, chunk_size=8
        )
        return jnp.sum(jnp.abs(states) ** 2) + jnp.sum(jnp.abs(final) ** 2)

    # State shapes: 160 features (one (2, 128) tile on TPU) and 1100 (padded to (16, 128): (8, 128)
    # tiles on TPU, 35 rows of 32 lanes on GPU).
    cases = [
        (jnp.full((1, 20, 4, 40), 0.5, jnp.float32), (4, 40), jnp.float32, False),
        (jnp.full((40,), 0.5 + 0.1j, jnp.complex64), (4, 40), jnp.complex64, True),
        (jnp.full((1100,), 0.5, jnp.float32), (1100,), jnp.float32, True),
    ]
    for a, S, dtype, reverse in cases:
        b = jnp.ones((2, 20, *S), dtype)
        x0 = jnp.ones((2, *S), dtype)
        with ssmix.auto_backend(backend):
            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
            traced = grad.trace(a, b, x0, reverse)
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        targets = re.findall(r"custom_call @([\w$.]+)", text)
        assert targets == [marker, marker], (platform, dtype, targets)
        assert "stablehlo.while" not in text
