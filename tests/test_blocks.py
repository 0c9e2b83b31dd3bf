"""Residual blocks and model stacks (ssmix.blocks) with a small causal test mixer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.blocks import (
    BATCHNORM_MOMENTUM,
    GLUS,
    NORMS,
    Norm,
    ResidualBlock,
    RetrievalModel,
    SequenceModel,
    pool,
    sinusoidal_positions,
)
from ssmix.layers.base import SSMParam
from ssmix.testing import assert_close


class CausalMeanMixer(nnx.Module):
    """Causal running mean over valid positions, projected: padding never reaches the
    valid outputs (right padding, causal), as the mixer convention requires."""

    def __init__(self, d_model, *, rngs):
        self.log_scale = SSMParam(jnp.zeros(d_model))
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x, mask=None):
        m = jnp.ones(x.shape[:2] + (1,), x.dtype) if mask is None else mask[..., None]
        csum = jnp.cumsum(x * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
        return self.proj(csum) * jnp.exp(self.log_scale[...])


# Eager NNX calls compile every primitive separately; one jit per call shape is cheaper.
call = nnx.jit(lambda module, *args, **kwargs: module(*args, **kwargs))


def _inputs(key, b=3, length=11, h=8):
    x = jax.random.normal(key, (b, length, h))
    lengths = jnp.array([length, 7, 1])[:b]
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    return x, mask


@pytest.mark.parametrize(
    "norm, prenorm, glu",
    [(n, p, GLUS[i % len(GLUS)]) for i, (n, p) in enumerate(
        (n, p) for n in NORMS for p in (True, False))],
)  # fmt: skip
def test_block_padding_does_not_leak(norm, prenorm, glu):
    """Valid outputs (and BatchNorm's statistics) ignore whatever sits in padded positions;
    each norm × pre/post-norm, the GLU variants spread over them."""
    x, mask = _inputs(jax.random.key(0))
    block = ResidualBlock(
        CausalMeanMixer(8, rngs=nnx.Rngs(1)), 8, norm=norm, glu=glu, prenorm=prenorm,
        mlp_ratio=2.0 if glu == "none" else 0.0, rngs=nnx.Rngs(2),
    )  # fmt: skip
    garbage = jnp.where(mask[..., None], x, 100.0 * jax.random.normal(jax.random.key(3), x.shape))
    y1 = call(block, x, mask)
    y2 = call(block, garbage, mask)
    assert y1.shape == x.shape
    assert_close(jnp.where(mask[..., None], y1, 0), jnp.where(mask[..., None], y2, 0), atol=1e-5)


def test_batchnorm_statistics_ignore_padding():
    """Masked BatchNorm equals BatchNorm of the valid positions alone (and so do the running
    statistics it leaves behind)."""
    x, mask = _inputs(jax.random.key(1))
    masked = Norm(8, "batch", rngs=nnx.Rngs(0))
    plain = Norm(8, "batch", rngs=nnx.Rngs(0))
    y = masked(x, mask)
    valid = x[mask]  # (n_valid, H)
    y_ref = plain(valid[None])[0]
    assert_close(y_ref, y[mask], atol=1e-5)
    assert_close(plain.norm.mean[...], masked.norm.mean[...], atol=1e-6)
    assert_close(plain.norm.var[...], masked.norm.var[...], atol=1e-6)


def test_block_forms_match_formulas():
    """Pre-norm ``x + f(norm x)``, post-norm ``norm(x + f(x))`` with each GLU variant."""
    x, _ = _inputs(jax.random.key(2))
    for glu in GLUS:
        for prenorm in (True, False):
            block = ResidualBlock(
                CausalMeanMixer(8, rngs=nnx.Rngs(1)), 8, norm="layer", glu=glu,
                prenorm=prenorm, activation="gelu", rngs=nnx.Rngs(2),
            )  # fmt: skip
            inner = block.norm(x) if prenorm else x
            z = block.mixer(inner)
            a = jax.nn.gelu(z)
            out = block.out(a)
            if glu == "none":
                f = out
            elif glu == "full":
                f = out[..., :8] * jax.nn.sigmoid(out[..., 8:])
            elif glu == "half1":
                f = a * jax.nn.sigmoid(out)
            else:
                f = z * jax.nn.sigmoid(out)
            expected = x + f if prenorm else block.norm(x + f)
            assert_close(expected, block(x), atol=1e-5, name=f"{glu} prenorm={prenorm}")


def test_dropout_is_tied_across_length_and_off_in_eval():
    block = ResidualBlock(
        CausalMeanMixer(16, rngs=nnx.Rngs(1)), 16, norm="layer", glu="none", dropout=0.5,
        activation="identity", rngs=nnx.Rngs(2),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (4, 9, 16))
    mask = block.dropout(jnp.ones_like(x), rngs=nnx.Rngs(dropout=0))
    zeros = mask == 0
    # Each (example, feature) is dropped at every position or at none.
    assert bool(jnp.all(zeros == zeros[:, :1, :]))
    assert 0 < int(zeros[:, 0].sum()) < zeros[:, 0].size
    y_train = block(x, rngs=nnx.Rngs(dropout=0))
    block.eval()
    y_eval = block(x)
    # Reference: the same parameters (same init keys) in a block without dropout.
    plain = ResidualBlock(
        CausalMeanMixer(16, rngs=nnx.Rngs(1)), 16, norm="layer", glu="none", dropout=0.0,
        activation="identity", rngs=nnx.Rngs(2),
    )  # fmt: skip
    assert_close(plain(x), y_eval, exact=True, name="eval = no dropout")
    assert not np.allclose(np.asarray(y_train), np.asarray(y_eval))


def test_pool():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[True, True, False, False], [True, True, True, True]])
    assert_close(x.mean(1), pool(x, mask, "mean"), exact=True)
    assert_close(jnp.stack([x[0, :2].mean(0), x[1].mean(0)]), pool(x, mask, "masked_mean"))
    assert_close(jnp.stack([x[0, 1], x[1, 3]]), pool(x, mask, "last"), exact=True)
    assert_close(x[:, -1], pool(x, None, "last"), exact=True)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(x, mask, "max")


def test_sinusoidal_positions():
    pe = sinusoidal_positions(5, 7)
    assert pe.shape == (5, 7)
    assert_close(jnp.sin(jnp.arange(5.0)), pe[:, 0])
    assert_close(jnp.cos(jnp.arange(5.0) / 10000 ** (2 / 7)), pe[:, 3])


@pytest.mark.parametrize("pooling", ["mean", "masked_mean", "last"])
def test_sequence_model_tokens_and_padding(pooling):
    factory = CausalMeanMixer
    model = SequenceModel(
        factory, n_layers=2, d_model=8, n_classes=5, vocab_size=11, pooling=pooling,
        norm="batch", prenorm=True, positional="sinusoidal", rngs=nnx.Rngs(0),
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(0), (3, 10), 1, 11)
    mask = jnp.arange(10)[None] < jnp.array([10, 6, 3])[:, None]
    logits = call(model, tokens, mask)
    assert logits.shape == (3, 5)
    if pooling != "mean":
        other = jnp.where(mask, tokens, 7)
        assert_close(logits, call(model, other, mask), atol=1e-5)
    # Each example alone (no padding) gives the same logits in eval mode.
    model.eval()
    full = call(model, tokens, mask)
    if pooling != "mean":
        for i, n in enumerate([10, 6, 3]):
            alone = call(model, tokens[i : i + 1, :n])
            assert_close(full[i : i + 1], alone, atol=1e-5)


def test_sequence_model_features_and_errors():
    model = SequenceModel(
        CausalMeanMixer, n_layers=1, d_model=8, n_classes=None, d_input=3, norm="rms",
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jnp.ones((2, 5, 3))
    assert model(x).shape == (2, 8)
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        SequenceModel(CausalMeanMixer, n_layers=1, d_model=8, n_classes=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, 3\)"):
        model(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="3 input features"):
        model(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(x, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="norm must be one of"):
        ResidualBlock(CausalMeanMixer(8, rngs=nnx.Rngs(0)), 8, norm="group", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout must be in"):
        ResidualBlock(CausalMeanMixer(8, rngs=nnx.Rngs(0)), 8, dropout=1.0, rngs=nnx.Rngs(0))
    tok_model = SequenceModel(
        CausalMeanMixer, n_layers=1, d_model=8, n_classes=2, vocab_size=4, rngs=nnx.Rngs(0)
    )
    with pytest.raises(TypeError, match="integer array"):
        tok_model(jnp.ones((2, 5)))


def test_retrieval_model_features():
    """Logits equal the MLP of [u, v, u - v, u * v] with u, v the shared encoder's features."""
    model = RetrievalModel(
        functools.partial(CausalMeanMixer), n_classes=2, d_model=8, n_layers=1,
        vocab_size=9, norm="layer", mlp_dim=16, rngs=nnx.Rngs(0),
    )  # fmt: skip
    x1 = jax.random.randint(jax.random.key(1), (2, 6), 1, 9)
    x2 = jax.random.randint(jax.random.key(2), (2, 6), 1, 9)
    m1 = jnp.arange(6)[None] < jnp.array([6, 4])[:, None]
    m2 = jnp.arange(6)[None] < jnp.array([3, 6])[:, None]

    @nnx.jit
    def both(model, x1, x2, m1, m2):
        u, v = model.encoder(x1, m1), model.encoder(x2, m2)
        h = jnp.concatenate([u, v, u - v, u * v], -1)
        return model(x1, x2, m1, m2), model.mlp_out(jax.nn.gelu(model.mlp_in(h)))

    logits, expected = both(model, x1, x2, m1, m2)
    assert_close(expected, logits, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        model(x1, x2[:, :5])
    with pytest.raises(ValueError, match="both mask1 and mask2"):
        model(x1, x2, m1)


def test_block_passes_rngs_to_a_mixer_with_kernel_dropout():
    from ssmix.layers import S4D

    block = ResidualBlock(S4D(8, 4, drop_kernel=0.5, rngs=nnx.Rngs(0)), 8, rngs=nnx.Rngs(1))
    assert block.mixer_takes_rngs
    x = jax.random.normal(jax.random.key(0), (2, 11, 8))
    y1, y2 = block(x, rngs=nnx.Rngs(dropout=0)), block(x, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(np.asarray(y1), np.asarray(y2))
    block.eval()
    # Reference: the same parameters in a block whose S4D has no kernel dropout.
    plain = ResidualBlock(S4D(8, 4, rngs=nnx.Rngs(0)), 8, rngs=nnx.Rngs(1))
    assert_close(plain(x), block(x), exact=True, name="eval = no kernel dropout")
    assert not np.allclose(np.asarray(plain(x)), np.asarray(y1))
    assert not ResidualBlock(
        CausalMeanMixer(8, rngs=nnx.Rngs(1)), 8, rngs=nnx.Rngs(2)
    ).mixer_takes_rngs


def _batchnorms(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]


def test_final_norm_off_pools_the_last_block_output():
    """``final_norm=False`` (S5's model): pooling sees the last block's output itself; the
    default keeps a final norm after a pre-norm stack."""
    kw = dict(n_layers=2, d_model=8, n_classes=3, d_input=4, norm="layer", prenorm=True)
    with_norm = SequenceModel(CausalMeanMixer, rngs=nnx.Rngs(0), **kw)
    assert isinstance(with_norm.final_norm, Norm)
    model = SequenceModel(CausalMeanMixer, final_norm=False, rngs=nnx.Rngs(0), **kw)
    assert model.final_norm is None
    x, mask = _inputs(jax.random.key(4), h=4)

    @nnx.jit
    def both(model, x, mask):
        h = x @ model.encoder.kernel[...] + model.encoder.bias[...]
        for block in model.blocks:
            h = block(h, mask)
        return model(x, mask), model.head(pool(h, mask, "masked_mean"))

    got, ref = both(model, x, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="final_norm must be a bool"):
        SequenceModel(CausalMeanMixer, final_norm="no", rngs=nnx.Rngs(0), **kw)


def test_norm_momentum_reaches_every_batchnorm():
    """``norm_momentum`` sets every BatchNorm of the stack (blocks, MLP sub-blocks, final
    norm, the retrieval encoder); default 0.9. A running mean after one training call is
    ``(1 − momentum)·batch mean``."""
    kw = dict(n_layers=2, d_model=8, n_classes=3, d_input=4, norm="batch", mlp_ratio=1.0)
    default = SequenceModel(CausalMeanMixer, rngs=nnx.Rngs(0), **kw)
    assert BATCHNORM_MOMENTUM == 0.9
    assert {bn.momentum for bn in _batchnorms(default)} == {0.9}
    model = SequenceModel(CausalMeanMixer, norm_momentum=0.95, rngs=nnx.Rngs(0), **kw)
    assert len(_batchnorms(model)) == 5  # 2 blocks × (mixer + MLP) + final
    assert {bn.momentum for bn in _batchnorms(model)} == {0.95}
    retrieval = RetrievalModel(
        CausalMeanMixer, n_classes=2, d_model=8, n_layers=1, d_input=4, norm="batch",
        norm_momentum=0.5, final_norm=False, rngs=nnx.Rngs(0),
    )  # fmt: skip
    assert {bn.momentum for bn in _batchnorms(retrieval)} == {0.5}
    assert len(_batchnorms(retrieval)) == 1  # no final norm
    x, mask = _inputs(jax.random.key(5))
    norm = Norm(8, "batch", momentum=0.75, rngs=nnx.Rngs(0))
    norm(x, mask)
    assert_close(0.25 * x[mask].mean(0), norm.norm.mean[...], atol=1e-6)
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="norm_momentum must be"):
            SequenceModel(CausalMeanMixer, norm_momentum=bad, rngs=nnx.Rngs(0), **kw)
