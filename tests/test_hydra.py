"""Hydra layer: modes agree, padding never leaks, the materialised matrices, the backend
rule and the accelerator shape of its default, errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ssmix
from ssmix.kernels.ssd import quasiseparable
from ssmix.layers import Hydra
from ssmix.layers.hydra import auto_mode
from ssmix.testing import assert_close, check_equivalent, trace_stats

#: Every concrete mode, the materialized oracle first.
MODES = ("materialized", "chunked", "parallel", "sequential")


def small_hydra(*, ngroups=2, learnable_init_states=True, seed=0, **kw):
    """d_model 8, expand 2 -> 4 heads of 4 channels, d_state 4; random initial states."""
    layer = Hydra(
        8,
        d_state=4,
        headdim=4,
        ngroups=ngroups,
        chunk_size=4,
        learnable_init_states=learnable_init_states,
        rngs=nnx.Rngs(seed),
        **kw,
    )
    if learnable_init_states:
        # Non-zero states make the start of the backward scan observable.
        shape = layer.init_states.shape
        layer.init_states = nnx.Param(jax.random.normal(jax.random.PRNGKey(seed + 1), shape))
    return layer


def split64(layer):
    """Graph and float64 state of a layer, so that the state can be a differentiated argument."""
    graph, state = nnx.split(layer)
    state = jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    return graph, state


def with_mode(graph, mode, mask=None):
    """``(state, x) -> layer(x, mask)`` in ``mode``, jitted as one program (compiling one
    program is far cheaper than differentiating op by op)."""

    def run(state, x):
        layer = nnx.merge(graph, state)
        layer.mode = mode
        return layer(x, mask)

    return jax.jit(run)


def padded_batch(lengths, L, d=8, seed=0, dtype=jnp.float64):
    """Inputs with large garbage at the padded positions and the matching mask."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (len(lengths), L, d), dtype)
    mask = jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]
    return jnp.where(mask[..., None], x, 1e3), mask


def test_hydra_modes_agree_float64_with_padding(x64):
    graph, state = split64(small_hydra())
    x, mask = padded_batch([11, 6], 11)
    check_equivalent({m: with_mode(graph, m, mask) for m in MODES}, state, x)


def test_hydra_chunked_matches_sequential_float32():
    layer = small_hydra(ngroups=1, learnable_init_states=False, seed=3)
    graph, state = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 37, 8))
    impls = {m: with_mode(graph, m) for m in ("sequential", "chunked")}
    check_equivalent(impls, state, x, grads=False)


def test_hydra_padding_equals_per_sequence_runs(x64):
    # Valid outputs of a padded batch equal those of each sequence run alone: nothing leaks
    # through the convolution, the backward scan or its (non-zero) initial state. Gradients
    # under padding are compared between all three modes above.
    lengths = [9, 4, 1]
    layer = nnx.merge(*split64(small_hydra()))
    x, mask = padded_batch(lengths, 9)
    y = layer(x, mask)
    for i, n in enumerate(lengths[1:], start=1):
        assert_close(layer(x[i : i + 1, :n])[0], y[i, :n], name=f"length {n}")


def test_hydra_materialize_is_the_mixing_matrix(x64):
    graph, state = split64(small_hydra(learnable_init_states=False))
    layer = nnx.merge(graph, state)
    x, mask = padded_batch([10, 7], 10)
    M = layer.materialize(x, mask)
    assert M.shape == (2, layer.nheads, 10, 10)
    _, args = layer._mixer_inputs(x, mask)
    y = quasiseparable(*args, chunk_size=4)
    assert_close(y, jnp.einsum("bhts,bshp->bthp", M, args[0]))
    # The valid block of a padded sequence's matrix is the matrix of the sequence alone.
    assert_close(M[1:, :, :7, :7], layer.materialize(x[1:, :7]))


def test_hydra_auto_mode_per_backend():
    assert auto_mode(4096, "cpu") == "chunked"
    assert auto_mode(4096, "gpu") == auto_mode(1, "tpu") == "parallel"
    with ssmix.auto_backend("gpu"):
        assert auto_mode(16384) == "parallel"
    with pytest.raises(ValueError, match="backend must be one of"):
        auto_mode(16, "metal")
    with pytest.raises(ValueError, match="L must be a positive integer"):
        auto_mode(0)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_hydra_default_meets_the_accelerator_targets(backend):
    # Forward + gradient (parameters and input) of the default layer at B = 2, L = 16384,
    # d_model 64, traced (nothing runs): at most 64 loop iterations and no array over
    # 256 MiB (benchmarks/accelerator.py's targets). The SSD part adds no loop at all.
    with ssmix.auto_backend(backend):
        graph, state = nnx.split(Hydra(64, rngs=nnx.Rngs(0)))

        def loss(state, x):
            return jnp.sum(nnx.merge(graph, state)(x) ** 2)

        x = jax.ShapeDtypeStruct((2, 16384, 64), jnp.float32)
        stats = trace_stats(jax.grad(loss, argnums=(0, 1)), state, x)
    assert stats.loop_iterations <= 64, stats.loops
    assert stats.largest_bytes <= 256 * 2**20, stats.largest


def test_hydra_rejects_bad_configuration_and_inputs():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        Hydra(8, mode="fft", rngs=rngs)
    with pytest.raises(ValueError, match="divisible by headdim"):
        Hydra(8, headdim=5, rngs=rngs)
    with pytest.raises(ValueError, match="ngroups = 3 must divide"):
        Hydra(8, headdim=4, ngroups=3, rngs=rngs)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        Hydra(8, headdim=4, chunk_size=0, rngs=rngs)
    layer = small_hydra()
    x = jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, d_model=8\)"):
        layer(x[0])
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, d_model=8\); got"):
        layer(x[..., :4])
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        layer(x, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\)"):
        layer(x, jnp.ones((2, 4), bool))
