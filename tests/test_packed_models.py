"""Packed sequences through whole models: ``SequenceModel(head="token")`` with
``segment_ids`` equals running each document alone (eval mode, float64), for a causal stack
of S4D and Mamba2 blocks with sinusoidal positions; clear errors where packing cannot apply."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.blocks import ResidualBlock, SequenceModel
from ssmix.layers import S4D, Mamba2, TensorAttention
from ssmix.testing import assert_close

L = 11
IDS = np.array([[0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6]])


def _model(head="token"):
    layers = [
        functools.partial(S4D, d_state=4, mode="chunked", chunk_size=4, param_dtype=jnp.float64),
        functools.partial(Mamba2, d_state=4, headdim=4, chunk_size=4),
    ]
    model = SequenceModel(
        lambda d, rngs: layers.pop(0)(d, rngs=rngs), n_layers=2, d_model=8, n_classes=5,
        vocab_size=13, head=head, positional="sinusoidal", norm="layer", prenorm=True,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    model.eval()
    # The rest of the model (Mamba2, embedding, norms, head) in float64 too.
    state = nnx.state(model)
    nnx.update(
        model, jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    )
    return model


def test_packed_rows_equal_each_document_alone(x64):
    """Each document alone = its own row, right-padded and masked (one batched call)."""
    model = _model()
    graph, state = nnx.split(model)
    run = jax.jit(lambda state, *args, **kw: nnx.merge(graph, state)(*args, **kw))
    tokens = jax.random.randint(jax.random.key(1), (2, L), 1, 13)
    packed = run(state, tokens, segment_ids=jnp.asarray(IDS, jnp.int32))
    docs = [(b, np.nonzero(IDS[b] == seg)[0]) for b in range(2) for seg in np.unique(IDS[b])]
    alone_tokens = np.zeros((len(docs), L), np.int32)
    alone_mask = np.zeros((len(docs), L), bool)
    for k, (b, where) in enumerate(docs):
        alone_tokens[k, : len(where)] = np.asarray(tokens)[b, where]
        alone_mask[k, : len(where)] = True
    alone = run(state, jnp.asarray(alone_tokens), jnp.asarray(alone_mask))
    for k, (b, where) in enumerate(docs):
        assert_close(alone[k, : len(where)], packed[b, where], atol=1e-12, ratio=1e-10)


def test_packing_errors(x64):
    tokens = jnp.ones((2, L), jnp.int32)
    ids = jnp.asarray(IDS, jnp.int32)
    with pytest.raises(ValueError, match="needs head='token'"):
        _model(head="pooled")(tokens, segment_ids=ids)
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        _model()(tokens, segment_ids=ids.astype(jnp.float32))
    block = ResidualBlock(TensorAttention(8, rngs=nnx.Rngs(0)), 8, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="not supported by the mixer TensorAttention"):
        block(jnp.ones((2, L, 8)), segment_ids=ids)
