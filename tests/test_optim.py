"""Optimiser groups (ssmix.optim): labels by variable type and name, per-group lr and weight
decay, the warmup + cosine schedule, and use through nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssmix.layers.base import SSMParam
from ssmix.optim import make_optimizer, param_labels, warmup_cosine
from ssmix.testing import assert_close


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.A = SSMParam(jnp.full((3,), 2.0))
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs)])
        self.gamma = nnx.Param(jnp.full((3,), 2.0))

    def __call__(self, x):
        return self.layers[0](self.norm(self.lin(x) * self.A[...])) * self.gamma[...]


def test_labels_by_type_and_name():
    labels = param_labels(Toy(nnx.Rngs(0)), ssm_names=("gamma",), no_decay_names=("bias",))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(labels)}
    assert flat == {
        "A": "ssm",
        "gamma": "ssm",
        "lin/bias": "no_decay",
        "lin/kernel": "default",
        "layers/0/bias": "no_decay",
        "layers/0/kernel": "default",
        "norm/bias": "no_decay",
        "norm/scale": "default",
    }
    with pytest.raises(TypeError, match="variable state"):
        param_labels(nnx.as_pure(nnx.state(Toy(nnx.Rngs(0)), nnx.Param)))
    with pytest.raises(TypeError, match="nnx.Module or"):
        param_labels({"a": jnp.ones(2)})


def test_schedule():
    sched = warmup_cosine(1.0, warmup_steps=10, total_steps=110, end_ratio=0.1)
    assert float(sched(0)) == 0.0
    assert_close(jnp.float32(0.5), sched(5))
    assert_close(jnp.float32(1.0), sched(10))
    assert_close(jnp.float32(0.1 + 0.9 * 0.5), sched(60))  # half-way through the cosine
    assert_close(jnp.float32(0.1), sched(110))
    assert_close(jnp.float32(0.1), sched(500))
    with pytest.raises(ValueError, match="smaller than total_steps"):
        warmup_cosine(1.0, 10, 10)
    with pytest.raises(ValueError, match="non-negative integer"):
        warmup_cosine(1.0, -1, 10)


def test_groups_lr_and_weight_decay():
    """With zero gradients only decoupled weight decay moves a parameter: the default group
    shrinks by lr·wd, the SSM and no-decay groups stay put. With a unit gradient the first
    Adam step moves each group by its own learning rate."""
    model = Toy(nnx.Rngs(0))
    lr, ssm_lr, wd = 0.1, 0.01, 0.5
    tx = make_optimizer(
        model, lr=lr, ssm_lr=ssm_lr, weight_decay=wd, warmup_steps=0, total_steps=1000,
        no_decay_names=("bias",),
    )  # fmt: skip
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    assert_close(jnp.zeros(3), updates["A"], exact=True)
    assert_close(jnp.zeros(3), updates["lin"]["bias"], exact=True)
    assert_close(-lr * wd * params["lin"]["kernel"], updates["lin"]["kernel"], atol=1e-7)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, state, params)
    assert_close(jnp.full(3, -ssm_lr), updates["A"], atol=1e-6)  # Adam: |step| = lr
    assert_close(jnp.full(3, -lr), updates["lin"]["bias"], atol=1e-6)


def test_with_nnx_optimizer_and_clipping():
    model = Toy(nnx.Rngs(0))
    tx = make_optimizer(
        model, lr=1e-2, ssm_lr=1e-3, weight_decay=0.1, warmup_steps=2, total_steps=20,
        grad_clip_norm=1.0,
    )  # fmt: skip
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert int(optimizer.step[...]) == 15
    assert losses[-1] < losses[0]
    assert np.all(np.isfinite(losses))
    with pytest.raises(ValueError, match="grad_clip_norm must be positive"):
        make_optimizer(
            model, lr=1.0, ssm_lr=1.0, weight_decay=0.0, warmup_steps=0, total_steps=2,
            grad_clip_norm=0.0,
        )  # fmt: skip


def test_schedule_is_inside_the_optimizer_state():
    """The step count lives in the optax state: the same jitted update yields the schedule's
    learning rate at every step without host-side mutation."""
    model = Toy(nnx.Rngs(0))
    tx = make_optimizer(model, lr=1.0, ssm_lr=0.1, weight_decay=0.0, warmup_steps=4, total_steps=8)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = tx.init(params)
    update = jax.jit(tx.update)
    sched = warmup_cosine(0.1, 4, 8)
    grads = jax.tree.map(jnp.ones_like, params)
    for step in range(8):
        updates, state = update(grads, state, params)
        # Adam's first moments of a constant gradient give a unit step: size = lr(step).
        assert_close(jnp.full(3, -sched(step)), updates["A"], atol=1e-6)
    assert isinstance(tx, optax.GradientTransformation)


class Mixer(nnx.Module):
    def __init__(self, rngs):
        self.B = SSMParam(jnp.ones(3))
        self.C = nnx.Param(jnp.ones(3))
        self.log_dt = SSMParam(jnp.zeros(3))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(5, 3, rngs=rngs)
        self.mixer = Mixer(rngs)
        self.norm = nnx.BatchNorm(3, rngs=rngs)
        self.B = nnx.Param(jnp.ones(3))  # same name as the mixer's B, outside the mixer
        self.out = nnx.Linear(3, 2, rngs=rngs)


def test_labels_by_name_within_module_types():
    """``groups`` picks single parameters by attribute name (only inside ``within`` modules);
    ``no_decay_modules`` covers every parameter of norm / embedding modules."""
    net = Net(nnx.Rngs(0))
    labels = param_labels(
        net, groups={"B": "ssm_decay", "log_dt": "no_decay", "C": "ssm"}, within=Mixer,
        no_decay_names=("bias",), no_decay_modules=(nnx.BatchNorm, nnx.Embed),
    )  # fmt: skip
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(labels)}
    assert flat == {
        "B": "default",
        "embed/embedding": "no_decay",
        "mixer/B": "ssm_decay",
        "mixer/C": "ssm",
        "mixer/log_dt": "no_decay",
        "norm/bias": "no_decay",
        "norm/scale": "no_decay",
        "out/bias": "no_decay",
        "out/kernel": "default",
    }
    without = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(
        param_labels(net, groups={"B": "ssm_decay"}))}  # fmt: skip
    assert without["B"] == without["mixer/B"] == "ssm_decay"
    with pytest.raises(ValueError, match="groups names 'Bx' match no parameter inside Mixer"):
        param_labels(net, groups={"Bx": "ssm"}, within=Mixer)
    assert param_labels(net, groups={"Bx": "ssm"}, strict=False) is not None
    with pytest.raises(ValueError, match=r"groups\['B'\] must be one of ssm, ssm_decay"):
        param_labels(net, groups={"B": "fast"})
    with pytest.raises(TypeError, match="pass the nnx.Module, not its state"):
        param_labels(nnx.state(net, nnx.Param), no_decay_modules=nnx.BatchNorm)


def test_ssm_decay_group_and_schedule_fn():
    """``ssm_decay`` trains at ``ssm_lr`` with the main weight decay; ``schedule_fn`` sets
    every group's schedule (scaled to its peak)."""
    net = Net(nnx.Rngs(0))
    lr, ssm_lr, wd = 0.1, 0.01, 0.5
    tx = make_optimizer(
        net, lr=lr, ssm_lr=ssm_lr, weight_decay=wd, groups={"B": "ssm_decay"}, within=Mixer,
        schedule_fn=lambda peak: optax.constant_schedule(peak / 2),
    )  # fmt: skip
    params = nnx.as_pure(nnx.state(net, nnx.Param))
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert_close(-ssm_lr / 2 * wd * params["mixer"]["B"], updates["mixer"]["B"], atol=1e-8)
    assert_close(-lr / 2 * wd * params["B"], updates["B"], atol=1e-8)
    assert_close(jnp.zeros(3), updates["mixer"]["log_dt"], exact=True)
    with pytest.raises(ValueError, match="give warmup_steps and total_steps, or a schedule_fn"):
        make_optimizer(net, lr=lr, ssm_lr=ssm_lr, weight_decay=wd)
