"""The Mamba2 layer: every mode against the materialized one (outputs and gradients), stepping
against the full forward pass, packed sequences against each segment alone, the SSD core
against a numpy re-implementation of state-spaces/mamba's ``ssd_minimal_discrete``, padding
isolation, the materialized matrices and bad input. Tiny shapes, float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssmix.kernels.ssd import ssd
from ssmix.layers.mamba2 import Mamba2
from ssmix.testing import assert_close
from tests.test_packed import check_outputs, check_vjp

MODES = ("materialized", "sequential", "chunked", "parallel", "pallas")
IDS = np.array([[0] * 4 + [1] + [2] * 3 + [3] * 5, [5] + [6] * 6 + [5] * 6], np.int32)


def _split64(**kwargs):
    """A tiny layer (d_model 8, headdim 4, d_state 4: 4 heads) split into graph and float64
    state."""
    model = Mamba2(8, d_state=4, headdim=4, chunk_size=4, rngs=nnx.Rngs(0), **kwargs)
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(lambda v: v.astype(jnp.float64), state)


def _runner(graphdef, mode="chunked"):
    """``(state, x, mask=None, segment_ids=None) -> y`` of the layer in ``mode``."""

    def run(state, x, mask=None, segment_ids=None):
        model = nnx.merge(graphdef, state)
        model.mode = mode
        return model(x, mask, segment_ids=segment_ids)

    return run


def _x(L, seed=0, batch=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, L, 8)))


def test_every_mode_equals_materialized(x64):
    """Outputs and gradients at L = 13 (a prime: a partial last chunk); outputs at L = 1
    (shorter than the convolution and the chunk), every mode in one compiled program."""
    graphdef, state = _split64(ngroups=2)
    impls = {mode: _runner(graphdef, mode) for mode in MODES}
    check_vjp(impls, state, _x(13, seed=7))
    check_outputs(impls, state, _x(1))


def test_step_equals_forward(x64):
    graphdef, state = _split64(ngroups=2)
    x = _x(7, seed=1)
    full = jax.jit(_runner(graphdef))(state, x)

    @jax.jit
    def step(state, carry, x_t):
        return nnx.merge(graphdef, state).step(carry, x_t)

    carry = nnx.merge(graphdef, state).init_state(2)  # the float64 parameters' dtype
    assert [c.dtype for c in carry] == [jnp.float64, jnp.float64]
    outs = []
    for t in range(x.shape[1]):
        carry, y_t = step(state, carry, x[:, t])
        outs.append(y_t)
    assert_close(full, jnp.stack(outs, axis=1))
    assert carry[0].shape == (2, 3, 16 + 2 * 2 * 4) and carry[1].shape == (2, 4, 4, 4)


def test_packed_equals_per_segment(x64):
    """Packed rows against every segment run alone, as a right-padded row of its own (the
    padding rule, checked against unpadded runs in :func:`test_padding_isolation`)."""
    graphdef, state = _split64()
    ids = jnp.asarray(IDS)
    x = _x(13, seed=2)
    segs = []
    for r in range(2):
        cuts = [0] + [t for t in range(1, 13) if IDS[r, t] != IDS[r, t - 1]] + [13]
        segs += [(r, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    rows = np.array([[r] * 13 for r, _, _ in segs])
    times = np.array([np.minimum(np.arange(13) + a, 12) for _, a, _ in segs])
    valid = np.array([np.arange(13) < b - a for _, a, b in segs])
    back_k, back_pos = np.zeros((2, 13), int), np.zeros((2, 13), int)
    for k, (r, a, b) in enumerate(segs):
        back_k[r, a:b], back_pos[r, a:b] = k, np.arange(b - a)
    run = _runner(graphdef)

    def per_segment(state, x):
        return run(state, x[rows, times], jnp.asarray(valid))[back_k, back_pos]

    def packed(mode):
        return lambda state, x: _runner(graphdef, mode)(state, x, None, ids)

    impls = {"per_segment": per_segment} | {m: packed(m) for m in ("materialized", "chunked")}
    check_vjp(impls, state, x)


def _segsum(a):
    """``out[..., i, j] = Σ_{j < k ≤ i} a[..., k]`` for ``j ≤ i``, −inf above the diagonal."""
    T = a.shape[-1]
    rep = np.where(np.tril(np.ones((T, T), bool), -1), a[..., :, None], 0.0)
    return np.where(np.tril(np.ones((T, T), bool)), np.cumsum(rep, axis=-2), -np.inf)


def _ssd_minimal_numpy(X, A, B, C, block, h0):
    """Numpy re-implementation of the semantics of ``ssd_minimal_discrete`` (state-spaces/mamba
    ``mamba_ssm/modules/ssd_minimal.py``): ``X (b, l, h, p)`` already multiplied by ``dt``,
    ``A (b, l, h)`` the log-decays ``dt·A``, ``B, C (b, l, h, n)``, chunks of ``block``."""
    b, l, h, p = X.shape
    c = l // block
    X, A, B, C = (v.reshape(b, c, block, *v.shape[2:]) for v in (X, A, B, C))
    A = A.transpose(0, 3, 1, 2)  # (b, h, c, block)
    A_cs = np.cumsum(A, axis=-1)
    y_diag = np.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, np.exp(_segsum(A)), X)
    decay_states = np.exp(A_cs[..., -1:] - A_cs)
    states = np.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = np.concatenate([h0[:, None], states], axis=1)
    decay_chunk = np.exp(_segsum(np.pad(A_cs[..., -1], ((0, 0), (0, 0), (1, 0)))))
    new_states = np.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    y_off = np.einsum("bclhn,bchpn,bhcl->bclhp", C, states, np.exp(A_cs))
    return (y_diag + y_off).reshape(b, l, h, p), final


def test_ssd_core_equals_ssd_minimal_discrete(x64):
    rng = np.random.default_rng(3)
    b, L, H, P, G, N = 2, 12, 4, 3, 2, 5
    x = rng.normal(size=(b, L, H, P))
    dt = rng.uniform(0.05, 0.8, size=(b, L, H))
    A = -rng.uniform(1.0, 16.0, size=(H,))
    B = rng.normal(size=(b, L, G, N))
    C = rng.normal(size=(b, L, G, N))
    h0 = rng.normal(size=(b, H, P, N))
    per_head = lambda v: np.repeat(v, H // G, axis=2)  # noqa: E731
    y_ref, final_ref = _ssd_minimal_numpy(
        x * dt[..., None], dt * A, per_head(B), per_head(C), 4, h0
    )
    for method in ("chunked", "parallel", "sequential", "materialized"):
        got = ssd(
            *map(jnp.asarray, (x, dt, A, B, C)),
            initial_state=jnp.asarray(h0),
            chunk_size=4,
            method=method,
        )
        assert_close((y_ref, final_ref), got, name=method)


def test_padding_isolation(x64):
    """NaN at padded positions reaches no valid output and no parameter gradient; valid
    outputs equal the unpadded sequence's (the layer is causal: the first 4 outputs of a
    length-7 row are those of its first 4 positions run alone)."""
    graphdef, state = _split64()
    run = _runner(graphdef)
    x = _x(7, seed=4)
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]])
    x_nan = jnp.where(mask[..., None], x, jnp.nan)

    @jax.jit
    def masked(state):
        def loss(state):
            y = run(state, x_nan, mask)
            return jnp.sum(jnp.where(mask[..., None], y, 0) ** 2), y

        return jax.grad(loss, has_aux=True)(state)

    grads, y = masked(state)
    assert np.all(np.isfinite(np.asarray(y)[np.asarray(mask)]))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    alone = jax.jit(run)(state, x)
    assert_close(alone[0], y[0])
    assert_close(alone[1, :4], y[1, :4])


def test_materialize_reproduces_the_mixer(x64):
    graphdef, state = _split64(ngroups=2)
    model = nnx.merge(graphdef, state)
    x = _x(7, seed=5)
    ids = jnp.asarray(IDS[:, :7])
    for seg in (None, ids):
        M = model.materialize(x, segment_ids=seg)
        assert M.shape == (2, 4, 7, 7)
        assert np.all(np.asarray(M)[..., np.triu_indices(7, 1)[0], np.triu_indices(7, 1)[1]] == 0)
        _, (xs, dt, A, B, C) = model._mixer_inputs(x, None, seg)
        y, _ = ssd(xs, dt, A, B, C, method="materialized", segment_ids=seg)
        y = y + model.D[...][:, None] * xs
        assert_close(y, jnp.einsum("bhts,bshp->bthp", M, xs))
    # Row 0 of the ids has a boundary at 4: no weight crosses it.
    assert np.all(np.asarray(M)[0, :, 4:, :4] == 0)


def test_dtype_policy():
    """``dtype=bfloat16`` on float32 input: activations in bfloat16, the SSD in float32, the
    output in float32, close to the float32 layer at bfloat16 accuracy."""
    kwargs = dict(d_state=4, headdim=4, chunk_size=4)
    ref = Mamba2(8, rngs=nnx.Rngs(0), **kwargs)
    low = Mamba2(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kwargs)  # the same parameters
    x = _x(5, seed=6).astype(jnp.float32)
    y_ref, y = jax.jit(lambda x: (ref(x), low(x)))(x)
    assert y.dtype == jnp.float32
    assert_close(y_ref, y, ratio=5e-2, atol=5e-2)


def test_bad_input():
    model = Mamba2(8, d_state=4, headdim=4, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 5, 8))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        model(jnp.ones((2, 5, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, d_model=8\)"):
        model(jnp.ones((2, 5, 7)))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        model(x, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        model(x, segment_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, L\) = \(2, 5\)"):
        model(x, segment_ids=jnp.zeros((2, 6), jnp.int32))
    model.mode = "fast"
    with pytest.raises(ValueError, match="mode must be one of"):
        model(x)
    state = model.init_state(2)
    assert [s.dtype for s in state] == [jnp.float32, jnp.float32]
    half = Mamba2(8, headdim=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).init_state(1)
    assert [s.dtype for s in half] == [jnp.bfloat16, jnp.float32]  # window; SSM state in f32
    with pytest.raises(ValueError, match=r"state must be the pair \(conv_state"):
        model.step(state[1], x[:, 0])
    with pytest.raises(ValueError, match=r"state must be the pair \(conv_state"):
        model.step(model.init_state(3), x[:, 0])
    with pytest.raises(TypeError, match="x_t must be a floating-point array"):
        model.step(state, jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="must be divisible by headdim"):
        Mamba2(8, headdim=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ngroups = 3 must divide the number of heads 4"):
        Mamba2(8, headdim=4, ngroups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="A_init_range must satisfy"):
        Mamba2(8, headdim=4, A_init_range=(0.0, 4.0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        Mamba2(8, headdim=4, mode="fft", rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"dtype must be None or a floating dtype \(.*\); got int32"
    ):
        Mamba2(8, headdim=4, dtype=jnp.int32, rngs=nnx.Rngs(0))
