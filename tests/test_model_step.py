"""Model-level recurrent inference: ``ResidualBlock`` / ``SequenceModel`` ``init_state`` /
``step`` equal the eval-mode forward pass position by position (float64), for every causal
layer kind (S4, S4D, S5, S4PTD, S5PTD, Mamba2, causal Attention); the token head; causal
``Attention``'s KV cache; attention output dtypes.

Each model stacks two *different* causal layers (the factory alternates), so four small
models cover every kind, pre- and post-norm, the three norms, both heads and both inputs with
one compilation each (forward and recurrent decoding in one jitted function).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.blocks import (
    Norm,
    ResidualBlock,
    RetrievalModel,
    SequenceModel,
    sinusoidal_positions,
    sinusoids,
)
from ssmix.layers import (
    S4,
    S4D,
    S4PTD,
    S5,
    S5PTD,
    Attention,
    KroneckerAttention,
    TensorAttention,
)
from ssmix.layers.mamba2 import Mamba2
from ssmix.testing import assert_close

H, B, L = 8, 2, 7


def alternating(*factories):
    """A mixer factory giving ``factories[i % n]`` to the i-th block."""
    counter = itertools.count()

    def make(d_model, *, rngs):
        return factories[next(counter) % len(factories)](d_model, rngs=rngs)

    return make


# The SSM layers take param_dtype=float64 (their complex state dtype follows it); the rest
# of the model is cast to float64 after construction (``to_float64``). PTD at N/2 = 8 (S4PTD
# d_state 16, S5PTD d_state 8) reads the packaged table: the solver does not run.
f64 = {"param_dtype": jnp.float64}
KINDS = {
    "S4": functools.partial(S4, d_state=8, **f64),
    "S4D": functools.partial(S4D, d_state=8, **f64),
    "S5": functools.partial(S5, d_state=8, **f64),
    "S4PTD": functools.partial(S4PTD, d_state=16, **f64),
    "S5PTD": functools.partial(S5PTD, d_state=8, **f64),
    "Attention": lambda d, *, rngs: Attention(d, num_heads=2, causal=True, rngs=rngs),
    "Mamba2": functools.partial(Mamba2, d_state=4, headdim=4, chunk_size=4),
}

# (block kinds, SequenceModel options): every kind once, prenorm and postnorm, every norm.
CONFIGS = {
    "S4+S4D/prenorm-layer/tokens/mlp": (
        ("S4", "S4D"),
        dict(norm="layer", prenorm=True, vocab_size=11, n_classes=11, head="token",
             mlp_ratio=2.0, glu="full"),
    ),
    "S5+S4PTD/postnorm-batch/features": (
        ("S5", "S4PTD"),
        dict(norm="batch", prenorm=False, d_input=3, n_classes=None, head="token",
             glu="half1", mlp_ratio=1.0),
    ),
    "S5PTD+Attention/prenorm-rms/tokens/sinusoidal": (
        ("S5PTD", "Attention"),
        dict(norm="rms", prenorm=True, vocab_size=11, n_classes=11, head="token",
             positional="sinusoidal", glu="half2"),
    ),
    "Mamba2+S4D/postnorm-layer/pooled-features": (
        ("Mamba2", "S4D"),
        dict(norm="layer", prenorm=False, d_input=3, n_classes=None, glu="none",
             activation="silu"),
    ),
}  # fmt: skip


def to_float64(model):
    """Cast every float32 array of ``model`` (parameters, BatchNorm statistics) to float64."""
    graph, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    return nnx.merge(graph, state)


def randomize_batch_stats(model, key):
    """Running means/variances away from 0/1, so eval-mode BatchNorm is a real test."""
    graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def draw(path, a):
        k = jax.random.fold_in(key, len(jax.tree_util.keystr(path)) * 7 + a.size)
        r = 0.5 * jax.random.normal(k, a.shape, a.dtype)
        return 1.0 + jnp.abs(r) if "var" in jax.tree_util.keystr(path) else r

    stats = jax.tree_util.tree_map_with_path(draw, stats)
    return nnx.merge(graph, params, stats)


@nnx.jit
def forward_and_decode(model, x, prefix_x):
    """Eval-mode ``model(x)``, ``model(prefix_x)`` (``x`` with its later positions changed),
    ``model.encode(x)``, and ``L`` calls of ``model.step`` from ``init_state`` inside one
    ``lax.scan`` (so the state must be a fixed-shape, fixed-dtype carry)."""
    state = model.init_state(x.shape[0], max_len=x.shape[1], dtype=jnp.float64)
    _, outs = jax.lax.scan(model.step, state, jnp.swapaxes(x, 0, 1))
    return model(x), model(prefix_x), model.encode(x), jnp.swapaxes(outs, 0, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_step_equals_forward(name, x64):
    kinds, options = CONFIGS[name]
    model = SequenceModel(
        alternating(*(KINDS[k] for k in kinds)), n_layers=2, d_model=H, rngs=nnx.Rngs(0),
        **options,
    )  # fmt: skip
    assert [type(b.mixer).__name__ for b in model.blocks] == [
        {"S4PTD": "S4D", "S5PTD": "S5"}.get(k, k) for k in kinds
    ]
    model = randomize_batch_stats(to_float64(model), jax.random.key(1))
    model.eval()
    if "vocab_size" in options:
        x = jax.random.randint(jax.random.key(2), (B, L), 0, options["vocab_size"])
        later = jnp.where(jnp.arange(L) > 3, (x + 1) % options["vocab_size"], x)
    else:
        x = jax.random.normal(jax.random.key(2), (B, L, options["d_input"]), jnp.float64)
        later = jnp.where((jnp.arange(L) > 3)[:, None], -x, x)
    y, y_later, h, y_step = forward_and_decode(model, x, later)
    width = options["n_classes"] or H
    assert y_step.shape == (B, L, width) and y_step.dtype == jnp.float64
    if options.get("head") == "token":
        assert y.shape == (B, L, width)
        assert_close(y, y_step, atol=1e-12, ratio=1e-10)
        # Causal: positions 0..3 do not see the changed later inputs.
        assert_close(y[:, :4], y_later[:, :4], atol=1e-12, ratio=1e-10)
        assert float(jnp.abs(y_later[:, 4:] - y[:, 4:]).max()) > 1e-3
    else:
        # The pooled-features model steps per position: its outputs are encode()'s.
        assert y.shape == (B, width)
        assert_close(h, y_step, atol=1e-12, ratio=1e-10)
        assert_close(y, jnp.mean(y_step, axis=1), atol=1e-12, ratio=1e-10)


def test_attention_kv_cache_equals_causal_forward(x64):
    """Layer level, float64: the KV-cache step equals the causal forward at every position
    (a cache longer than the sequence, ``head_dim`` not features / heads), the first step
    equals the forward of one position (L = 1); a step into a full cache raises eagerly and
    gives NaN under jit (never a silent overwrite)."""
    layer = to_float64(Attention(6, num_heads=2, head_dim=5, causal=True, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (B, L, 6), jnp.float64)
    state = layer.init_state(B, max_len=L + 1)
    assert state["k"].shape == state["v"].shape == (B, 2, L + 1, 5)
    assert state["k"].dtype == jnp.float64 and int(state["position"]) == 0
    step, forward = nnx.jit(Attention.step), nnx.jit(Attention.__call__)
    outs = []
    for t in range(L + 1):
        state, y_t = step(layer, state, x[:, t % L])
        outs.append(y_t)
    assert int(state["position"]) == L + 1
    assert_close(forward(layer, x), jnp.stack(outs[:L], axis=1), atol=1e-12, ratio=1e-10)
    assert_close(forward(layer, x[:, :1])[:, 0], outs[0], atol=1e-12, ratio=1e-10)
    with pytest.raises(ValueError, match=r"the KV cache is full: it holds max_len=8 positions"):
        layer.step(state, x[:, 0])
    _, y_over = step(layer, state, x[:, 0])
    assert bool(jnp.all(jnp.isnan(y_over)))


def test_batchnorm_step_uses_running_statistics_in_any_mode():
    """BatchNorm's step normalises with the running statistics, in train mode too (equal to
    the eval-mode call), and leaves them unchanged."""
    x = jax.random.normal(jax.random.key(0), (3, 5, H))
    norm = randomize_batch_stats(Norm(H, "batch", rngs=nnx.Rngs(0)), jax.random.key(1))
    norm.eval()
    y_eval = norm(x)
    norm.train()
    before = jax.tree.map(np.asarray, nnx.state(norm, nnx.BatchStat))
    y_step = jnp.stack([norm.step(x[:, t]) for t in range(x.shape[1])], axis=1)
    assert_close(y_eval, y_step, atol=1e-6)
    after = jax.tree.map(np.asarray, nnx.state(norm, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_sinusoids_of_a_position_are_the_table_rows():
    table = sinusoidal_positions(9, 6)
    assert_close(sinusoids(jnp.arange(9), 6), table, atol=0)
    assert_close(sinusoids(jnp.asarray(4, jnp.int32), 6), table[4], atol=0)


def test_token_head_and_step_errors():
    rngs = nnx.Rngs(0)
    # A mixer that is cheap to build (the errors do not depend on the kind).
    attn = functools.partial(Attention, causal=True)
    common = dict(n_layers=1, d_model=H, vocab_size=5, rngs=rngs)
    with pytest.raises(ValueError, match="head must be one of"):
        SequenceModel(attn, n_classes=5, head="tokens", **common)
    with pytest.raises(ValueError, match="RetrievalModel pools each input"):
        RetrievalModel(attn, n_classes=2, d_model=H, vocab_size=5, head="token", rngs=rngs)
    pooled = SequenceModel(attn, n_classes=5, **common)
    with pytest.raises(ValueError, match="pools the sequence before its classification head"):
        pooled.init_state(2, max_len=4)
    with pytest.raises(ValueError, match="pools the sequence before its classification head"):
        pooled.step({}, jnp.zeros(2, jnp.int32))

    model = SequenceModel(attn, n_classes=5, head="token", **common)
    state = model.init_state(2, max_len=4)
    with pytest.raises(TypeError, match="token input x_t must be an integer array"):
        model.step(state, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"x_t must have shape \(batch,\) integer tokens"):
        model.step(state, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="state must be the dict"):
        model.step(state["blocks"], jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="state holds 2 block states; the model has 1"):
        model.step({**state, "blocks": state["blocks"] * 2}, jnp.zeros(2, jnp.int32))

    features = SequenceModel(attn, n_layers=1, d_model=H, d_input=3, n_classes=None, rngs=rngs)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 3\)"):
        features.step(features.init_state(2, max_len=4), jnp.zeros((2, 4)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: S4D(H, 4, bidirectional=True, rngs=r), "this S4D is bidirectional"),
        (lambda r: Attention(H, causal=False, rngs=r), "this Attention has causal=False"),
        (lambda r: TensorAttention(H, causal=True, rngs=r), "TensorAttention has no step"),
        (lambda r: KroneckerAttention(H, (2, 2), rngs=r), "KroneckerAttention has no step"),
    ],
)
def test_non_causal_mixers_are_refused_by_name(make, match):
    mixer = make(nnx.Rngs(0))
    block = ResidualBlock(mixer, H, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=f"ResidualBlock.step needs causal mixers.*{match}"):
        block.init_state(2)
    with pytest.raises(ValueError, match=match):
        block.step(None, jnp.zeros((2, H)))
    model = SequenceModel(
        lambda d, rngs: make(rngs), n_layers=1, d_model=H, d_input=H, n_classes=None,
        head="token", rngs=nnx.Rngs(2),
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"SequenceModel.step needs causal mixers.*{match}"):
        model.init_state(2, max_len=4)


def test_attention_state_needs_max_len_and_causality():
    layer = Attention(H, num_heads=2, causal=True, rngs=nnx.Rngs(0))
    block = ResidualBlock(layer, H, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"Attention is a cache of max_len positions: pass "):
        block.init_state(2)
    assert block.init_state(2, max_len=5)["k"].shape == (2, 2, 5, H // 2)
    with pytest.raises(ValueError, match=r"state must be the KV cache dict"):
        layer.step({"k": 0}, jnp.zeros((2, H)))
    with pytest.raises(ValueError, match=r"state\['k'\] must have shape"):
        layer.step(layer.init_state(3, 5), jnp.zeros((2, H)))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        layer.init_state(2, 0)
    non_causal = Attention(H, causal=False, rngs=nnx.Rngs(0))
    for call in (lambda: non_causal.init_state(2, 4), lambda: non_causal.step({}, None)):
        with pytest.raises(ValueError, match=r"Attention\(causal=False\) attends to future"):
            call()


@pytest.mark.parametrize(
    "make",
    [
        lambda r: Attention(H, num_heads=2, causal=True, rngs=r),
        lambda r: KroneckerAttention(H, (2, 3), rngs=r),
        lambda r: TensorAttention(H, num_heads=2, method="naive", rngs=r),
    ],
    ids=["Attention", "KroneckerAttention", "TensorAttention"],
)
def test_attention_layers_return_the_input_dtype(make):
    """bfloat16 in, bfloat16 out (the computation runs in float32): close to the float32 run
    on the same (bfloat16-representable) input."""
    layer = make(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, H)).astype(jnp.bfloat16)
    call = nnx.jit(type(layer).__call__)
    y = call(layer, x)
    assert y.dtype == jnp.bfloat16
    y32 = call(layer, x.astype(jnp.float32))
    assert y32.dtype == jnp.float32
    assert_close(y32, y.astype(jnp.float32), atol=2e-2, ratio=2e-2)
