"""SSD / quasiseparable ``method="pallas"``: the fused kernel in Pallas interpret mode against
the materialized form (outputs, final states, gradients; both kernel variants, both
directions, awkward lengths, bfloat16 inputs), and its lowering for cuda (Triton) and tpu
(Mosaic), forward + backward.

"pallas" is deliberately not in ``tests/test_ssd.py``'s ``METHODS``: interpret mode is slow,
so these tests use their own tiny shapes and few cases (:data:`PALLAS`).
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

import ssmix
from ssmix._backend import pallas_interpret, pallas_variant
from ssmix.kernels.ssd import METHODS, auto_method, quasiseparable, ssd
from ssmix.testing import check_equivalent

#: The method under test, kept apart from test_ssd.METHODS (see the module docstring).
PALLAS = "pallas"


def make_ssd(b=2, L=13, H=4, P=3, G=2, N=5, seed=0, dtype=jnp.float64):
    """Random SSD inputs ``(x, dt, A, B, C, h0)`` (as in tests/test_ssd.py)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (b, L, H, P), dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, L, H), dtype) - 1)
    A = -jnp.exp(jax.random.normal(k[2], (H,), dtype))
    B = jax.random.normal(k[3], (b, L, G, N), dtype)
    C = jax.random.normal(k[4], (b, L, G, N), dtype)
    h0 = jax.random.normal(k[5], (b, H, P, N), dtype)
    return x, dt, A, B, C, h0


def make_qs(b=2, L=11, H=4, P=3, G=2, N=5, seed=0, dtype=jnp.float64):
    """Quasiseparable inputs and the two initial states (as in tests/test_ssd.py)."""
    x, dt_fw, A, B_fw, C_fw, h_fw = make_ssd(b, L, H, P, G, N, seed, dtype)
    _, dt_bw, _, B_bw, C_bw, h_bw = make_ssd(b, L, H, P, G, N, seed + 100, dtype)
    diag = jax.random.normal(jax.random.PRNGKey(seed + 7), (b, L, H), dtype)
    return (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag), (h_fw, h_bw)


def ssd_both_directions(method, chunk_size, backend=None):
    """Both directions with an initial state from one jitted call; ``backend`` (traced under
    :func:`ssmix.auto_backend`) picks the Pallas kernel variant."""

    def f(x, dt, A, B, C, h0):
        kw = dict(chunk_size=chunk_size, initial_state=h0, method=method)
        with contextlib.nullcontext() if backend is None else ssmix.auto_backend(backend):
            return ssd(x, dt, A, B, C, **kw), ssd(x, dt, A, B, C, reverse=True, **kw)

    return jax.jit(f)


def test_pallas_is_explicit_only_and_interprets_on_cpu():
    assert PALLAS in METHODS
    for backend in ("cpu", "gpu", "tpu"):
        assert auto_method(backend) != PALLAS
    assert pallas_interpret(None) is (jax.default_backend() == "cpu")
    assert pallas_interpret(False) is False
    assert [pallas_variant(b) for b in ("cpu", "gpu", "tpu")] == ["tpu", "gpu", "tpu"]


@pytest.mark.parametrize(
    "backend, L, G",
    [
        ("tpu", 13, 2),  # chunk axis on the grid; prime L, not a multiple of the chunk, G < Hh
        ("gpu", 1, 1),  # chunk loop inside the kernel; L = 1 < chunk (padded), one group
    ],
)
def test_ssd_pallas_matches_materialized_float64(x64, backend, L, G):
    # Forward and reverse, with an initial state: outputs, final states and the gradients of
    # every input (the backward kernel) against the O(L²) oracle, in interpret mode.
    impls = {
        "materialized": ssd_both_directions("materialized", 4),
        PALLAS: ssd_both_directions(PALLAS, 4, backend),
    }
    check_equivalent(impls, *make_ssd(b=1, L=L, H=4 if G == 2 else 2, G=G))


def test_ssd_pallas_bfloat16_inputs_with_strong_decay():
    # bfloat16 inputs accumulate in float32: y comes back in bfloat16, the state in float32,
    # both as the materialized form computes them from the same inputs. Decay rates up to 300
    # underflow exp(A·Σdt) inside a chunk; masked before the exponential, nothing overflows.
    # Outputs and final states (the gradients run the float32 kernel the tests above check).
    x, dt, A, B, C, h0 = make_ssd(b=1, L=19, H=2, P=2, N=3, G=1, dtype=jnp.float32, seed=3)
    A = -jnp.array([1.0, 300.0], jnp.float32)
    args = [v.astype(jnp.bfloat16) for v in (x, dt, A, B, C, h0)]
    impls = {m: ssd_both_directions(m, 8) for m in ("materialized", PALLAS)}
    (y, h), _ = impls[PALLAS](*args)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    check_equivalent(impls, *args, grads=False)


def qs(method, chunk_size):
    def f(*a):
        return quasiseparable(*a[:9], chunk_size=chunk_size, initial_states=a[9:], method=method)

    return jax.jit(f)


def test_quasiseparable_pallas_matches_materialized_float64(x64):
    # Both directions stacked in one kernel call, initial states of both, L not a multiple
    # of the chunk.
    args, states = make_qs(b=1, L=11, G=2)
    impls = {m: qs(m, 4) for m in ("materialized", PALLAS)}
    check_equivalent(impls, *args, *states)


CUSTOM_CALL = {"cuda": r"xla\.gpu\.triton", "tpu": r"tpu_custom_call"}


@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_pallas_ssd_and_quasiseparable_lower_for_cuda_and_tpu(backend, platform):
    # Forward + backward of ssd (both directions) and quasiseparable, compiled (not
    # interpreted) kernels: Triton on cuda, Mosaic on tpu. Triton needs power-of-two
    # Q, P, N of at least 16; L = 100 is padded to 4 chunks of 32.
    x, dt, A, B, C, h0 = make_ssd(b=1, L=100, H=2, P=16, G=1, N=16, dtype=jnp.float32)
    args, states = make_qs(b=1, L=100, H=2, P=16, G=1, N=16, dtype=jnp.float32)

    def loss_ssd(*a):
        kw = dict(chunk_size=32, initial_state=a[5], method=PALLAS, interpret=False)
        (y1, h1), (y2, h2) = (ssd(*a[:5], **kw), ssd(*a[:5], reverse=True, **kw))
        return jnp.sum(y1 * y2) + jnp.sum(h1 * h2)

    def loss_qs(*a):
        y = quasiseparable(
            *a[:9], chunk_size=32, initial_states=a[9:], method=PALLAS, interpret=False
        )
        return jnp.sum(y**2)

    with ssmix.auto_backend(backend):
        cases = ((loss_ssd, (x, dt, A, B, C, h0), 4), (loss_qs, (*args, *states), 2))
        for loss, inputs, expected in cases:
            grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
            text = grad.trace(*inputs).lower(lowering_platforms=(platform,)).as_text()
            # the forward and the backward kernel of each direction (ssd: two calls;
            # quasiseparable: both directions stacked in one call)
            assert len(re.findall(CUSTOM_CALL[platform], text)) == expected
