"""The accelerator form of the chunk-state passing in the S4-family chunked convolutions.

Under the CPU rule the states between chunks come from a ``lax.scan`` over the chunks; under
the GPU / TPU rules from a loop-free doubling prefix scan
(:func:`ssmix.kernels.vandermonde._pass_states`). Checked from this CPU host: packed S4D and
S4 layers (causal with a state in and out, bidirectional) and the unpacked chunked forms that
share the state passing give the CPU rule's values and gradients under
``auto_backend("gpu")`` (float64); the packed S4D / S4 forward + backward has no loop there
(and has the chunk scan under the CPU rule); it lowers for cuda and tpu without a while loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssmix
from ssmix.kernels import vandermonde as V
from ssmix.layers import S4, S4D
from ssmix.testing import assert_close, trace_stats

H, N, L, CHUNK = 2, 4, 15, 2  # 8 chunks, the last one partial: doubling levels 1, 2, 4
# Row 0: starts at 2 (a chunk edge), 3 (inside a chunk) and 11; row 1: one start at 4, then
# 6 chunks without a reset, which the level-4 step carries across.
IDS = np.array([[0] * 2 + [1] + [2] * 8 + [3] * 4, [4] * 4 + [5] * 11], np.int32)


def _make(cls, dtype=jnp.float64):
    def make(bidirectional):
        kw = {"chunk_size": CHUNK, "mode": "chunked", "param_dtype": dtype, "rngs": nnx.Rngs(0)}
        return cls(H, N, bidirectional=bidirectional, **kw)

    return make


LAYERS = {"S4D": _make(S4D), "S4": _make(S4)}


def _inputs(layer):
    kx, kr, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, L, H))
    x0 = layer.init_state(2)
    noise = jax.random.normal(kr, x0.shape) + 1j * jax.random.normal(ki, x0.shape)
    return x.astype(layer.param_dtype), (x0 + noise).astype(x0.dtype)


def _losses(make):
    """``loss(params_c, params_b, x, x0) → (scalar, outputs)`` over the packed causal (state
    in and out) and bidirectional calls and, for S4D, the unpacked chunked causal call (state
    in and out; S4's packed state out already runs the unpacked chunk states, in
    ``chunked_state_forward``)."""
    causal, bidir = make(False), make(True)
    graph_c, params_c = nnx.split(causal)
    graph_b, params_b = nnx.split(bidir)
    cot = jax.random.normal(jax.random.PRNGKey(1), (2, L, H)).astype(causal.param_dtype)
    ids = jnp.asarray(IDS)
    unpacked = isinstance(causal, S4D)

    def loss(params_c, params_b, x, x0):
        c, b = nnx.merge(graph_c, params_c), nnx.merge(graph_b, params_b)
        outs = [*c(x, state=x0, return_state=True, segment_ids=ids), b(x, segment_ids=ids)]
        if unpacked:
            outs += c(x, state=x0, return_state=True)
        total = sum(jnp.sum(jnp.abs(y) ** 2 if jnp.iscomplexobj(y) else y * cot) for y in outs)
        return total, outs

    return loss, (params_c, params_b, *_inputs(causal))


def _run(f, *args):
    """``jax.jit(f)(*args)`` at XLA's lowest CPU optimisation level (tiny shapes: compiling
    is all the cost)."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(f).lower(*args).compile(compiler_options=options)(*args)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_accelerator_rule_equals_cpu_rule(name, x64, monkeypatch):
    """Values and gradients (both layers' parameters, input, incoming state) under the GPU
    rule equal the CPU rule's, in one program traced under both rules. The in-chunk product
    is the same under both rules: cut to its 1-pass and masked branches (of 5) to compile
    less (CHUNK = 2 holds at most 2 pieces, so both run)."""
    monkeypatch.setattr(V, "PACKED_PASSES", 1)
    loss, args = _losses(LAYERS[name])
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)

    def program(*args):
        cpu = grad(*args)
        with ssmix.auto_backend("gpu"):
            gpu = grad(*args)
        return cpu, gpu

    cpu, gpu = _run(program, *args)
    assert_close(cpu, gpu, name=f"{name} gpu rule")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_packed_forward_backward_is_loop_free_on_accelerators(name, x64):
    """The packed layer's forward + backward (causal with a state in and out, and
    bidirectional) traces with no loop under the GPU and TPU rules; under the CPU rule the
    chunk scan is there (8 chunks, forward and backward)."""
    causal, bidir = LAYERS[name](False), LAYERS[name](True)
    x, x0 = _inputs(causal)
    ids = jnp.asarray(IDS)

    def loss(x, x0):
        y, s = causal(x, state=x0, return_state=True, segment_ids=ids)
        return jnp.sum(y**2) + jnp.sum(jnp.abs(s) ** 2) + jnp.sum(bidir(x, segment_ids=ids) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    assert trace_stats(grad, x, x0).loop_iterations >= 2 * 8
    for backend in ("gpu", "tpu"):
        with ssmix.auto_backend(backend):
            stats = trace_stats(grad, x, x0)
        assert stats.loop_iterations == 0 and stats.unknown_loops == 0, stats.loops


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_packed_lowers_for_accelerators(platform):
    """Packed S4D and S4, forward + backward in float32, lower for the accelerator from this
    host without a while loop."""
    ids = jnp.asarray(IDS)
    makes = [_make(S4D, jnp.float32), _make(S4, jnp.float32)]
    layers = [(m(False), m(True)) for m in makes]
    x, _ = _inputs(layers[0][0])

    def loss(x):
        total = 0.0
        for causal, bidir in layers:
            y, s = causal(x, return_state=True, segment_ids=ids)
            total += jnp.sum(y**2) + jnp.sum(jnp.abs(s) ** 2)
            total += jnp.sum(bidir(x, segment_ids=ids) ** 2)
        return total

    with ssmix.auto_backend("gpu" if platform == "cuda" else "tpu"):
        traced = jax.jit(jax.grad(loss)).trace(x)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" not in text


def test_pass_states_doubling_equals_scan(x64):
    """The doubling prefix scan against the chunk scan directly, diagonal and dense, with
    resets per feature (the bidirectional layout), shared resets, none, and zero inputs (the
    form of ``chunked_state_output``), for chunk counts 1, 2, 5 and 8 (one program)."""
    rng = np.random.default_rng(0)
    S, B, T = 4, 2, 3
    log_dA = jnp.asarray(-rng.uniform(0.05, 0.3, (H, S // 2)) + 1j * rng.normal(size=(H, S // 2)))
    diag = V.ChunkOps(None, None, None, log_dA, None)
    dense = V.ChunkOps(None, None, None, None, jnp.asarray(rng.normal(size=(H, S, S)) * 0.4))
    x0 = jnp.asarray(rng.normal(size=(H, B, S)))
    cases = []
    for nc in (1, 2, 5, 8):
        s = jnp.asarray(rng.normal(size=(nc, H, B, S)))
        cases += [(nc, s, None), (nc, None, None)]
        cases += [(nc, s, jnp.asarray(rng.uniform(size=(nc, k, B)) < 0.4)) for k in (1, H)]

    def program(x0):
        out = []
        for ops in (diag, dense):
            for nc, s_k, reset in cases:
                ref = V._pass_states(ops, T, x0, s_k, reset, length=nc)
                with ssmix.auto_backend("tpu"):
                    out.append((ref, V._pass_states(ops, T, x0, s_k, reset, length=nc)))
        return out

    for ref, got in _run(program, x0):
        assert_close(ref, got)
