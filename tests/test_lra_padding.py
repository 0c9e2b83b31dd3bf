"""Padding a batch to its longest sequence (rounded up to a small ``pad_multiple``, with
length-grouped batches) instead of to ``max_len`` changes no result.

Tiny real models (S4D bidirectional and S5 bidirectional, post-norm BatchNorm, masked mean
pooling) are evaluated on ListOps-like data with ``pad_multiple = max_len`` (every batch
64 long) and ``pad_multiple = 8`` (batches of 16 to 64 positions), from one shared state
whose BatchNorm running statistics are set away from 0 / 1. Everything runs in float64
(parameters, statistics and the embedding's output dtype): padding changes the FFT / scan
lengths, so the two runs round differently; in float32 that is ~1e-7 of the loss (enough to
flip the argmax of a near-tie), in float64 ~1e-15. The tolerance 1e-12 sits far above that
rounding and far below a real leak from padded positions (1e-3 and more; see
:func:`test_a_leak_would_show`). Accuracies must be equal exactly. Hydra, S4 and attention
were checked the same way by hand (equal); they are left out to keep the suite short.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lra import train as lra_train
from experiments.lra.configs import make_config
from experiments.lra.listops import write_listops

MAX_LEN = 64


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops_pad")
    return write_listops(root, n_train=32, n_val=24, n_test=8, seed=5, min_length=6,
                         max_length=MAX_LEN - 4)  # fmt: skip


def _config(model, data_dir, pad_multiple, **extra):
    mixer = {
        "s4d": {"d_state": 4, "bidirectional": True, "mode": "fft", "init": "legs"},
        "s5": {"d_state": 4, "blocks": 2, "bidirectional": True},
        "hydra": {"d_state": 4, "headdim": 4, "chunk_size": 8},
    }[model]
    values = dict(
        data_dir=str(data_dir), mixer=mixer, d_model=8, n_layers=2, norm="batch",
        prenorm=False, pooling="masked_mean", batch_size=8, eval_batch_size=8,
        max_len=MAX_LEN, pad_multiple=pad_multiple, length_grouping=2, dropout=0.0,
        progress=False, lr=0.05, ssm_lr=0.05, warmup_ratio=0.0,
    )  # fmt: skip
    values.update(extra)
    return make_config("listops", model, "demo", values)


def _to_float64(tree):
    def cast(x):
        if x.dtype == jnp.float32:
            return x.astype(jnp.float64)
        if x.dtype == jnp.complex64:
            return x.astype(jnp.complex128)
        return x

    return jax.tree.map(cast, tree)


def _statistics(rest, seed=0):
    """BatchNorm running statistics away from their initial 0 / 1: means ~N(0, 0.5²),
    variances in [0.5, 2] (eval mode then tests more than the identity)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['mean']"):
            return jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype)
        if name.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(draw, rest)


def _experiments(model, data_dir, **extra):
    """Two experiments, batches padded to max_len and to the batch maximum (multiple of 8),
    sharing one float64 state with non-trivial BatchNorm statistics."""
    cfgs = [_config(model, data_dir, p, **extra) for p in (MAX_LEN, 8)]
    data = lra_train.load_data(cfgs[0])
    full, short = (lra_train.Experiment(c, data) for c in cfgs)
    state = _to_float64(full.state)
    state = {**state, "rest": _statistics(state["rest"])}
    for exp in (full, short):
        exp.state = state
        # nnx.Embed fixes its output dtype (float32) at construction: make it float64 too,
        # so that the whole forward pass runs in float64.
        for name in ("graph_train", "graph_eval"):
            model = nnx.merge(getattr(exp, name), state["params"], state["rest"])
            model.encoder.dtype = jnp.float64
            setattr(exp, name, nnx.split(model, nnx.Param, ...)[0])
    return full, short


@pytest.mark.parametrize("model", ["s4d", "s5"])
def test_padding_to_batch_max_gives_identical_evaluation(model, listops_dir):
    with jax.enable_x64(True):
        full, short = _experiments(model, listops_dir)
        shapes = [b["x"].shape[1] for b in lra_train.eval_batches(
            short.data, short.data.val, 8, pad_multiple=8)]  # fmt: skip
        assert len(set(shapes)) > 1 and max(shapes) < MAX_LEN, shapes
        a, b = full.evaluate("val"), short.evaluate("val")
        assert a["count"] == b["count"] == 24 and a["accuracy"] == b["accuracy"], (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * abs(a["loss"]), (a, b)


def test_a_leak_would_show(listops_dir):
    """The comparison is sensitive: with plain mean pooling (padding averaged in) the two
    paddings disagree by far more than the tolerance above."""
    with jax.enable_x64(True):
        full, short = _experiments("s4d", listops_dir, pooling="mean")
        a, b = full.evaluate("val"), short.evaluate("val")
        assert abs(a["loss"] - b["loss"]) > 1e-6 * abs(a["loss"]), (a, b)


def test_training_gradients_match(listops_dir):
    """The training loss, its gradient and the new BatchNorm statistics (train mode: masked
    statistics over the valid positions) of one batch are the same padded to its maximum
    as padded to max_len. (Gradients, not parameters after an Adam step: Adam divides by
    |g|, which turns the rounding of a near-zero gradient into a visible update change.)"""
    with jax.enable_x64(True):
        exps = _experiments("s4d", listops_dir)
        batches = [e.train_batch(0) for e in exps]
        assert batches[1]["x"].shape[1] < batches[0]["x"].shape[1] == MAX_LEN
        results = []
        for exp, batch in zip(exps, batches, strict=True):
            state, device_batch = exp.state, exp.device_batch(batch)

            def loss_fn(params, exp=exp, state=state, batch=device_batch):
                logits, rest = exp._forward(exp.graph_train, params, state["rest"], batch, None)
                total, _, count = exp._scores(logits, batch)
                return total / count, rest

            (loss, rest), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
                state["params"]
            )
            results.append(jax.device_get((loss, rest, grads)))
        (loss_a, rest_a, grads_a), (loss_b, rest_b, grads_b) = results
        assert abs(loss_a - loss_b) <= 1e-12 * abs(loss_a)
        for x, y in zip(jax.tree.leaves(rest_a), jax.tree.leaves(rest_b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
        for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-10 * np.abs(x).max())
