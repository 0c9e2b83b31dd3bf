"""Packed sequences (``segment_ids``) in softmax attention: the kernel's materialized and
blocked forms, the :class:`~ssmix.layers.Attention` layer and a token model built on it.

Every packed row (causal and not, with and without right padding) against each of its
segments run alone as a right-padded, masked row of its own (float64); gradients of the
blocked form (hand-written backward) against the materialized one; the weights are exactly 0
across segments and each valid row sums to 1; input errors.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.blocks import ResidualBlock, SequenceModel
from ssmix.kernels.attention import softmax_attention, softmax_attention_weights
from ssmix.layers import Attention, KroneckerAttention, TensorAttention
from ssmix.testing import assert_close, trace_stats

L, BLOCK, H, D, DV = 13, 3, 2, 3, 2
# Row 0: segments [0, 3) [3, 6) [6, 7) [7, 13): boundaries on block edges (3, 6), inside a
# block (7), a segment of length 1. Row 1: [0, 4) [4, 8) [8, 13), the id 5 repeated after 6
# (a new segment), boundaries inside blocks.
IDS = np.array([[0] * 3 + [1] * 3 + [2] + [3] * 6, [5] * 4 + [6] * 4 + [5] * 5], np.int32)
# Right padding: row 0 valid up to 11 (its id changes inside the padding), row 1 full.
LENGTHS_PAD = np.array([11, L])
IDS_PAD = IDS.copy()
IDS_PAD[0, 11:] = 9
MASK = np.arange(L)[None, :] < LENGTHS_PAD[:, None]
CASES = {  # name: (segment_ids, mask, valid lengths)
    "full": (IDS, None, np.array([L, L])),
    "padded": (IDS_PAD, MASK, LENGTHS_PAD),
}


def _layout(ids, lengths):
    """Every segment (cut to the valid length) as a row of its own, at the start,
    right-padded. Returns numpy ``rows, times, valid (K, L)`` and the segments as
    ``(packed row, start, stop, alone row)``."""
    rows, times, valid, segments = [], [], [], []
    for r, row in enumerate(ids):
        n = lengths[r]
        cuts = [0] + [t for t in range(1, n) if row[t] != row[t - 1]] + [n]
        for s0, s1 in zip(cuts[:-1], cuts[1:], strict=True):
            t_idx = np.zeros(L, np.int32)
            t_idx[: s1 - s0] = np.arange(s0, s1)
            segments.append((r, s0, s1, len(rows)))
            rows.append(r)
            times.append(t_idx)
            valid.append(np.arange(L) < s1 - s0)
    return np.array(rows), np.array(times), np.array(valid), segments


def _alone(x, rows, times):
    """``x (B, H, L, c)`` -> each segment's positions as a row ``(K, H, L, c)``."""
    return jnp.swapaxes(jnp.swapaxes(x, 1, 2)[rows[:, None], times], 1, 2)


def _qkv():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    return (
        jax.random.normal(kq, (2, H, L, D), jnp.float64),
        jax.random.normal(kk, (2, H, L, D), jnp.float64),
        jax.random.normal(kv, (2, H, L, DV), jnp.float64),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_packed_equals_each_segment_alone(x64, causal):
    """Materialized and blocked packed outputs equal each segment alone (materialized,
    masked); padded queries (no valid key) output 0; the weights are exactly 0 across
    segments, each valid row sums to 1 and each segment's block equals its weights alone."""
    q, k, v = _qkv()

    @jax.jit
    def forms(q, k, v, ids, mask, alone_q, alone_k, alone_v, alone_mask):
        kw = dict(causal=causal, mask=mask, segment_ids=ids)
        return (
            softmax_attention(q, k, v, **kw),
            softmax_attention(q, k, v, block_size=BLOCK, **kw),
            softmax_attention_weights(q, k, **kw),
            softmax_attention(alone_q, alone_k, alone_v, causal=causal, mask=alone_mask),
            softmax_attention_weights(alone_q, alone_k, causal=causal, mask=alone_mask),
        )

    for ids, mask, lengths in CASES.values():
        rows, times, valid, segments = _layout(ids, lengths)
        mask = jnp.ones((2, L), bool) if mask is None else jnp.asarray(mask)
        packed, blocked, w, alone, w_alone = forms(
            q, k, v, jnp.asarray(ids), mask, *(_alone(t, rows, times) for t in (q, k, v)),
            jnp.asarray(valid),
        )  # fmt: skip
        assert_close(packed, blocked, atol=1e-13, ratio=1e-10)
        w = np.asarray(w)
        for r, s0, s1, a in segments:
            n = s1 - s0
            assert_close(alone[a, :, :n], packed[r, :, s0:s1], atol=1e-13, ratio=1e-10)
            assert_close(w_alone[a, :, :n, :n], w[r, :, s0:s1, s0:s1], atol=1e-14, ratio=1e-12)
            # Nothing outside the segment: exactly zero.
            assert not np.any(w[r, :, s0:s1, :s0]) and not np.any(w[r, :, s0:s1, s1:])
            assert_close(np.ones((H, n)), w[r, :, s0:s1].sum(-1), atol=1e-14, ratio=1e-12)
        for r in range(2):  # padded queries (their segment has no valid key) output 0
            assert not np.any(np.asarray(packed)[r, :, lengths[r] :])
            assert not np.any(np.asarray(blocked)[r, :, lengths[r] :])
            assert not np.any(w[r, :, lengths[r] :])


def test_kernel_blocked_gradients_equal_materialized(x64):
    """The blocked form's hand-written backward with segment_ids (and a mask) equals the
    autodiff of the materialized form, causal and not."""
    q, k, v = _qkv()
    cot = jax.random.normal(jax.random.PRNGKey(1), (2, H, L, DV), jnp.float64)
    ids, mask = jnp.asarray(IDS_PAD), jnp.asarray(MASK)

    @jax.jit
    def grads(q, k, v):
        out = []
        for causal in (False, True):
            for block_size in (None, BLOCK):

                def loss(q, k, v, causal=causal, block_size=block_size):
                    y = softmax_attention(
                        q, k, v, causal=causal, mask=mask, segment_ids=ids, block_size=block_size
                    )
                    return jnp.sum(jnp.sin(y) * cot)

                out.append(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
        return out

    g = grads(q, k, v)
    for ref, blocked in ((g[0], g[1]), (g[2], g[3])):
        for a, b in zip(ref, blocked, strict=True):
            assert_close(a, b, atol=1e-13, ratio=1e-10)
    # The packing matters for the gradients: without segment_ids they differ.
    plain = jax.grad(lambda q: jnp.sum(jnp.sin(softmax_attention(q, k, v, mask=mask)) * cot))(q)
    assert float(jnp.max(jnp.abs(plain - g[0][0]))) > 1e-3


def test_blocked_memory_with_segment_ids():
    """Traced only (nothing runs): the blocked form's forward and backward with segment_ids
    and a mask produce no array larger than one ``(B, H, Lq, block)`` float32 score tile, so
    no ``Lq × Lk`` score, weight or same-segment array (here 4× that tile as bool)."""
    b, n, block = 2, 1024, 128
    q = jax.ShapeDtypeStruct((b, 1, n, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, n), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, n), jnp.bool_)

    def loss(q, k, v, mask, ids):
        y = softmax_attention(q, k, v, causal=True, mask=mask, segment_ids=ids, block_size=block)
        return jnp.sum(y)

    stats = trace_stats(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, mask, ids)
    assert stats.largest_bytes <= b * n * block * 4, str(stats)
    assert stats.loops == (("scan", n // block), ("scan", n // block)), str(stats)


def _float64(module):
    state = nnx.state(module)
    nnx.update(
        module,
        jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state),
    )
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_layer_packed_equals_each_segment_alone(x64, causal):
    """``Attention`` on packed rows (materialized and blocked) equals each segment as its own
    right-padded, masked row; ``materialize`` is zero across segments."""
    layer = _float64(Attention(8, num_heads=2, causal=causal, rngs=nnx.Rngs(0)))
    blocked = nnx.clone(layer)
    blocked.block_size = BLOCK
    x = jax.random.normal(jax.random.PRNGKey(2), (2, L, 8), jnp.float64)

    @nnx.jit
    def forms(layer, blocked, ids, mask, alone_x, alone_mask):
        return (
            layer(x, mask, segment_ids=ids),
            blocked(x, mask, segment_ids=ids),
            layer.materialize(x, mask, segment_ids=ids),
            layer(alone_x, alone_mask),
        )

    for ids, mask, lengths in CASES.values():  # "full": mask=None
        rows, times, valid, segments = _layout(ids, lengths)
        mask = None if mask is None else jnp.asarray(mask)
        packed, packed_blocked, w, alone = forms(
            layer, blocked, jnp.asarray(ids), mask, x[rows[:, None], times], jnp.asarray(valid)
        )
        assert_close(packed, packed_blocked, atol=1e-13, ratio=1e-10)
        w = np.asarray(w)
        for r, s0, s1, a in segments:
            assert_close(alone[a, : s1 - s0], packed[r, s0:s1], atol=1e-13, ratio=1e-10)
            assert not np.any(w[r, :, s0:s1, :s0]) and not np.any(w[r, :, s0:s1, s1:])


def test_token_model_with_attention_packed_equals_each_document_alone(x64):
    """A causal ``Attention`` stack (blocked, sinusoidal positions) with a token head:
    packed rows equal each document run alone (right-padded, masked, one batched call)."""
    model = SequenceModel(
        lambda d, rngs: Attention(d, num_heads=2, causal=True, block_size=BLOCK, rngs=rngs),
        n_layers=2, d_model=8, n_classes=5, vocab_size=13, head="token",
        positional="sinusoidal", rngs=nnx.Rngs(0),
    )  # fmt: skip
    model.eval()
    _float64(model)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, L), 1, 13)
    rows, times, valid, segments = _layout(IDS, np.array([L, L]))

    @nnx.jit
    def run(model, ids, alone_tokens, alone_mask):
        return model(tokens, segment_ids=ids), model(alone_tokens, alone_mask)

    alone_tokens = jnp.where(valid, tokens[rows[:, None], times], 0)
    packed, alone = run(model, jnp.asarray(IDS), alone_tokens, jnp.asarray(valid))
    for r, s0, s1, a in segments:
        assert_close(alone[a, : s1 - s0], packed[r, s0:s1], atol=1e-12, ratio=1e-10)


def test_segment_ids_errors(x64):
    q, k, v = _qkv()
    ids = jnp.asarray(IDS)
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        softmax_attention(q, k, v, segment_ids=ids.astype(jnp.float32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        softmax_attention_weights(q, k, segment_ids=np.asarray(IDS, np.float64))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 13\)"):
        softmax_attention(q, k, v, segment_ids=ids[:, :-1], block_size=BLOCK)
    with pytest.raises(ValueError, match="needs as many queries as keys; got Lq=12, Lk=13"):
        softmax_attention(q[:, :, :-1], k, v, segment_ids=ids)
    with pytest.raises(ValueError, match="needs as many queries as keys; got Lq=12, Lk=13"):
        softmax_attention_weights(q[:, :, :-1], k, segment_ids=ids)
    layer = Attention(8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        layer(jnp.ones((2, L, 8)), segment_ids=ids.astype(jnp.float32))
    # Kronecker and tensor attention take no segment_ids: the block says so.
    for mixer in (
        KroneckerAttention(8, (1, L), rngs=nnx.Rngs(0)),
        TensorAttention(8, method="naive", rngs=nnx.Rngs(0)),
    ):
        assert "segment_ids" not in inspect.signature(mixer.__call__).parameters
        block = ResidualBlock(mixer, 8, rngs=nnx.Rngs(1))
        with pytest.raises(ValueError, match=f"not supported by the mixer {type(mixer).__name__}"):
            block(jnp.ones((2, L, 8)), segment_ids=ids)
