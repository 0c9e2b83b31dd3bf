"""The accelerator rules, judged from a CPU host: backend override, loop counts, memory, lowering.

Every layer's default configuration is traced (nothing runs) under ``auto_backend("gpu")`` and
``("tpu")`` at the issue's shape B = 2, L = 16384, H = 64: its forward + backward must have at
most 64 sequential loop iterations and no array over 256 MiB. The same forward + backward
must lower for ``cuda`` and ``tpu`` (small shapes). The rows are the ones
``benchmarks/accelerator.py`` prints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax

import ssmix
from benchmarks.accelerator import MAX_BYTES, MAX_LOOPS, MEMORY_ONLY, layer_cases, train_step_stats
from ssmix.testing import trace_stats

LONG = 16384
PLATFORM = {"gpu": "cuda", "tpu": "tpu"}


# --------------------------------------------------------------------------------------
# auto_backend


def test_auto_backend_defaults_to_the_device_and_nests():
    assert ssmix.auto_backend() == "cpu"  # the suite runs on a CPU host
    with ssmix.auto_backend("gpu") as name:
        assert name == "gpu" and ssmix.auto_backend() == "gpu"
        with ssmix.auto_backend("tpu"):
            assert ssmix.auto_backend() == "tpu"
        assert ssmix.auto_backend() == "gpu"
    assert ssmix.auto_backend() == "cpu"


def test_auto_backend_is_restored_after_an_exception():
    with pytest.raises(RuntimeError), ssmix.auto_backend("tpu"):
        raise RuntimeError("boom")
    assert ssmix.auto_backend() == "cpu"


@pytest.mark.parametrize("bad", ["cuda", "GPU", "", 3])
def test_auto_backend_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        ssmix.auto_backend(bad)


# --------------------------------------------------------------------------------------
# trace_stats


def test_trace_stats_counts_nested_loops_and_fori_loops():
    def f(x):
        def outer(c, _):
            inner, _ = lax.scan(lambda d, _: (d * 2.0, None), c, None, length=5)
            return inner, None

        y, _ = lax.scan(outer, x, None, length=3)  # 3 · (1 + 5)
        # Inside a jitted call (a pjit equation): still an outermost loop.
        return jax.jit(lambda y: lax.fori_loop(0, 7, lambda i, c: c + 1.0, y))(y)  # 7

    stats = trace_stats(f, jnp.ones(4))
    assert stats.loop_iterations == 3 * 6 + 7
    assert [trip for _, trip in stats.loops] == [3, 7]
    assert stats.unknown_loops == 0


def test_trace_stats_flags_while_loops_of_unknown_length():
    def f(x):
        return lax.while_loop(lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1]), (0, x))[0]

    stats = trace_stats(f, jax.ShapeDtypeStruct((), jnp.int32))
    assert stats.unknown_loops == 1 and stats.loops == (("while", None),)


def test_trace_stats_finds_the_largest_array_without_running():
    def f(x):
        return jnp.sum(x[:, :, None] * x[:, None, :])  # (4096, 4096, 4096) f32: 256 GiB

    stats = trace_stats(f, jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
    assert stats.largest_bytes == 4096**3 * 4
    assert "4096,4096,4096" in stats.largest and stats.loop_iterations == 0


# --------------------------------------------------------------------------------------
# Every layer's default under the accelerator rules

CASES = list(layer_cases(LONG, 64))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", CASES)
def test_layer_default_is_loop_free_and_bounded_on_accelerators(name, backend):
    stats = train_step_stats(layer_cases(LONG, 64)[name], 2, LONG, 64, backend)
    assert stats.largest_bytes <= MAX_BYTES, f"{name} under {backend} rules: {stats}"
    if name not in MEMORY_ONLY:
        assert stats.unknown_loops == 0, f"{name} under {backend} rules: {stats}"
        assert stats.loop_iterations <= MAX_LOOPS, f"{name} under {backend} rules: {stats}"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", [n for n in CASES if n not in MEMORY_ONLY])
def test_layer_default_lowers_for_the_accelerator(name, backend):
    # 289 = 17²: a square for KroneckerAttention, not a multiple of any chunk or block.
    L, H = 289, 32  # H = 32: one head of 64 in Hydra and the matrix mixers
    with ssmix.auto_backend(backend):
        graphdef, state = nnx.split(layer_cases(L, H)[name]())

        def loss(state, x):
            return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x)))

        x = jax.ShapeDtypeStruct((2, L, H), jnp.float32)
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        lowered = step.trace(state, x).lower(lowering_platforms=(PLATFORM[backend],))
    assert "func.func public @main" in lowered.as_text()
