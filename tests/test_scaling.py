"""Scaling and memory regression tests, read off XLA's own cost and memory analyses.

Each computation is compiled (never run) at two sizes and the FLOP counts of
``jax.jit(f).lower(...).compile().cost_analysis()`` or the temporary-buffer sizes of
``.memory_analysis()`` are compared: deterministic numbers, no timing. On the CPU backend of
jax 0.10.2 ``cost_analysis()`` returns one dict (``"flops"``, ``"transcendentals"``,
``"bytes accessed"``, ...) and ``memory_analysis()`` a ``CompiledMemoryStats`` whose
``temp_size_in_bytes`` is the scratch memory the program needs beyond its arguments and
outputs.

XLA's cost analysis counts the body of a ``while`` loop (``lax.scan``, ``fori_loop``) once,
whatever its trip count, so a FLOP ratio is only meaningful for a program without loops of
more than one iteration. :func:`_flops` checks that with :func:`ssmix.testing.trace_stats`,
which is why the sequential forms (S5 ``"sequential"``, blocked tensor attention) are not
measured here. Every test also measures a form that *does* grow faster (the materialized or
naive reference), so each assertion is one the measure can fail.
"""

import jax
import jax.numpy as jnp

from ssmix.kernels.attention.tensor import tensor_attention
from ssmix.kernels.s5 import discretize, s5_matrix, s5_ssm
from ssmix.kernels.ssd import quasiseparable
from ssmix.kernels.vandermonde import diag_ssm_kernel, diag_ssm_kernel_naive
from ssmix.testing import trace_stats


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn(*args)``, after checking that no loop hides work from it."""
    stats = trace_stats(fn, *args)
    assert stats.unknown_loops == 0 and all(trip == 1 for _, trip in stats.loops), stats
    assert stats.loop_iterations == len(stats.loops), stats  # no nested multi-step loop
    cost = _compile(fn, *args).cost_analysis()
    return float(cost["flops"])


def _temp_bytes(fn, *args) -> int:
    """XLA's scratch memory (beyond arguments and outputs) for ``fn(*args)``."""
    return int(_compile(fn, *args).memory_analysis().temp_size_in_bytes)


def _flop_ratio(fn_of_length, L: int) -> float:
    """FLOPs at ``2L`` over FLOPs at ``L``; ``fn_of_length(L)`` returns ``(fn, args)``."""
    (fn_2l, args_2l), (fn_l, args_l) = fn_of_length(2 * L), fn_of_length(L)
    return _flops(fn_2l, *args_2l) / _flops(fn_l, *args_l)


def test_tensor_attention_approx_flops_linear_exact_cubic():
    def at(method):
        def fn_of_length(n):
            x = jnp.ones((1, n, 4), jnp.float32)
            # One chunk of n positions: no loop, so the cost analysis sees every FLOP.
            block = n if method == "approx" else None

            def fn(q, k1, k2, v1, v2):
                return tensor_attention(q, k1, k2, v1, v2, method=method, block_size=block)

            return fn, (x, x, x, x, x)

        return fn_of_length

    approx = _flop_ratio(at("approx"), 64)
    naive = _flop_ratio(at("naive"), 64)
    assert 1.8 < approx < 2.2, approx  # linear in n (O(n·D·dv)); sub-quadratic means < 4
    assert naive > 7.0, naive  # the exact pair softmax: n³


def test_hydra_quasiseparable_flops_linear_in_length():
    def at(method):
        def fn_of_length(L):
            x = jnp.ones((1, L, 2, 4), jnp.float32)
            dt = jnp.full((1, L, 2), 0.1, jnp.float32)
            BC = jnp.ones((1, L, 1, 4), jnp.float32)
            A = -jnp.ones((2,), jnp.float32)

            def fn(x, dt, A, BC, diag):
                return quasiseparable(
                    x, dt, dt, A, BC, BC, BC, BC, diag, chunk_size=16, method=method
                )

            return fn, (x, dt, A, BC, dt)

        return fn_of_length

    # The parallel form (the chunked one walks the chunks in a loop the analysis counts once).
    # Linear but for the (L/Q)² inter-chunk term, small at L/Q = 8.
    ratio = _flop_ratio(at("parallel"), 64)
    assert 1.8 < ratio < 2.25, ratio
    # The (L, L) quasiseparable matrix: the measure sees quadratic growth.
    assert _flop_ratio(at("materialized"), 64) > 3.2


def test_s5_flops_linear_in_length():
    H, P = 8, 4
    Lambda = jnp.full((P,), -0.5 + 1j, jnp.complex64)
    B = jnp.ones((P, H), jnp.complex64)
    C = jnp.ones((H, P), jnp.complex64)
    D = jnp.ones((H,), jnp.float32)
    step = jnp.full((P,), 0.1, jnp.float32)

    def at(method):
        def fn_of_length(L):
            u = jnp.ones((1, L, H), jnp.float32)
            if method == "materialized":

                def fn(u):
                    Lambda_bar, B_bar = discretize(Lambda, B, step)
                    M = s5_matrix(Lambda_bar, B_bar, C, D, L)  # (H, H, L, L)
                    return jnp.einsum("ijts,bsj->bti", M, u)
            else:

                def fn(u):
                    return s5_ssm(Lambda, B, C, D, step, u, method=method, chunk_size=16)

            return fn, (u,)

        return fn_of_length

    # The loop-free scan forms (the sequential and chunked ones loop over L or the chunks).
    for method in ("associative", "parallel"):
        ratio = _flop_ratio(at(method), 64)
        # a + b·L FLOPs: the ratio is below 2 by the share of the L-independent part.
        assert 1.6 < ratio < 2.2, (method, ratio)
    # The (H, H, L, L) mixing matrices: the measure sees quadratic growth.
    assert _flop_ratio(at("materialized"), 64) > 3.2


def _kernel_grad_temp(kernel, H: int, N2: int, L: int) -> int:
    """Scratch bytes of the forward and backward pass of a diagonal SSM kernel of length L."""
    A = jnp.full((H, N2), -0.5 + 1j, jnp.complex64)
    B = C = jnp.ones((H, N2), jnp.complex64)
    dt = jnp.full((H,), 0.01, jnp.float32)
    cot = jnp.ones((H, L), jnp.float32)

    def loss(A, B, C, dt):
        return jnp.sum(kernel(A, B, C, dt, L) * cot)

    return _temp_bytes(jax.grad(loss, argnums=(0, 1, 2, 3)), A, B, C, dt)


def test_vandermonde_kernel_memory_sublinear_in_state_times_length():
    H, N2 = 2, 32
    tensor_bytes = H * N2 * 4096 * 8  # the complex64 (H, N/2, L) Vandermonde tensor at 4L
    fast = [_kernel_grad_temp(diag_ssm_kernel, H, N2, L) for L in (1024, 4096)]
    naive = [_kernel_grad_temp(diag_ssm_kernel_naive, H, N2, L) for L in (1024, 4096)]
    # Tiled as Ā^(qT + r) with T = ⌈√L⌉: O(H·N·√L + H·L), so 4× the length costs ~2.3×
    # (√L term 2×, H·L term 4×); the naive (H, N/2, L) tensor costs 4×.
    assert fast[1] / fast[0] < 2.7, fast
    assert naive[1] / naive[0] > 3.8, naive
    # And far below the (H, N/2, L) tensor the naive form materialises (about its size).
    assert fast[1] < 0.2 * tensor_bytes, (fast, tensor_bytes)
    assert naive[1] > tensor_bytes, (naive, tensor_bytes)
