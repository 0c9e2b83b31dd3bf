"""Using ssmix from Linen: ``nnx.bridge.to_linen`` puts every parameter, the SSM ones
included, in the ``'params'`` collection, so a standard Linen training loop trains them.

``EXAMPLE`` is the README's "Using ssmix from Linen" example, run here verbatim.
"""

from functools import partial

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from flax.nnx import variablelib

from ssmix import optim
from ssmix.layers import S4, S4D, S4PTD, S5, S5PTD, Hydra, MatrixMixer
from ssmix.layers.base import SSMParam

EXAMPLE = """
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

from ssmix.layers import S4D


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, L, 1) -> (B, L, 1)
        h = nn.Dense(8)(x)
        h = nnx.bridge.to_linen(S4D, 8, 16)(h)  # S4D(d_model=8, d_state=16), bridged
        return nn.Dense(1)(nn.gelu(h))


model = Regressor()
x = jax.random.normal(jax.random.key(0), (4, 32, 1))
y = jnp.cumsum(x, axis=1) / 4  # toy target: running sums
variables = jax.jit(model.init)(jax.random.key(1), x)  # one collection: 'params'
state = train_state.TrainState.create(
    apply_fn=model.apply, params=variables["params"], tx=optax.adam(1e-2)
)


def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)


@jax.jit
def train_step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads), loss


losses = []
for _ in range(3):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))  # the loss before this step's update
"""


@pytest.fixture(scope="module")
def example():
    namespace = {}
    exec(compile(EXAMPLE, "README: Using ssmix from Linen", "exec"), namespace)
    return namespace


def test_linen_training_loop_trains_the_ssm_parameters(example):
    variables, state = example["variables"], example["state"]
    # Every variable, Λ, B and Δ included, is in 'params': nothing is left out of training.
    assert set(variables) == {"params"}
    s4d = variables["params"]["ToLinen_0"]
    assert set(s4d) == {"A_re_log", "A_im", "B", "log_dt", "C", "D"}
    assert state.step == 3
    before, after = s4d, state.params["ToLinen_0"]
    for name in ("A_re_log", "A_im", "B", "log_dt"):  # Λ = −exp(A_re_log) + i·A_im, B, Δ
        assert not jnp.allclose(before[name], after[name]), name
        assert bool(jnp.all(jnp.isfinite(after[name]))), name
    losses = example["losses"]
    assert losses[2] < losses[0], losses
    # The SSM parameters were read by the bridged layer: their gradients were nonzero.


def test_ssm_parameters_keep_their_type_in_nnx():
    layer = nnx.eval_shape(lambda: S4D(4, 8, rngs=nnx.Rngs(0)))
    assert set(nnx.state(layer, SSMParam)) == {"A_re_log", "A_im", "B", "log_dt"}
    labels = optim.param_labels(layer)
    assert {k: labels[k] for k in ("A_re_log", "A_im", "B", "log_dt", "C", "D")} == {
        "A_re_log": "ssm",
        "A_im": "ssm",
        "B": "ssm",
        "log_dt": "ssm",
        "C": "default",
        "D": "default",
    }


def test_collection_names():
    assert nnx.variable_name_from_type(SSMParam) == "params"
    assert variablelib.variable_name_from_type(SSMParam) == "params"
    assert variablelib.variable_name_from_type(nnx.Param) == "params"
    assert variablelib.variable_type_from_name("params") is nnx.Param
    assert variablelib.variable_name_from_type(nnx.BatchStat) == "batch_stats"
    with pytest.raises(ValueError, match="is not registered"):
        variablelib.variable_name_from_type(type("Unregistered", (nnx.Variable,), {}))


def test_explicit_registration_wins():
    """A subclass of SSMParam goes to 'params' too, unless registered under its own name."""

    class ScanParam(SSMParam):
        pass

    assert variablelib.variable_name_from_type(ScanParam) == "params"
    variablelib.register_variable_name("ssm_scan", ScanParam)
    try:
        assert variablelib.variable_name_from_type(ScanParam) == "ssm_scan"
    finally:
        del variablelib.VariableTypeCache["ssm_scan"]
    assert variablelib.variable_name_from_type(ScanParam) == "params"


BRIDGED = {
    "S4": partial(S4, 4, 8),
    "S4D": partial(S4D, 4, 8),
    "S5": partial(S5, 4, 8),
    "S5-complex_normal": partial(S5, 4, 8, C_init="complex_normal", bidirectional=True),
    "S5-lecun_normal": partial(S5, 4, 8, C_init="lecun_normal"),
    "S4PTD": partial(S4PTD, 4, 16),
    "S5PTD": partial(S5PTD, 4, 8),
    "Hydra": partial(Hydra, 4, d_state=4, headdim=4),
    "MatrixMixer": partial(MatrixMixer, 4, "semiseparable", max_len=9, headdim=4),
}


@pytest.mark.parametrize("name", list(BRIDGED))
def test_every_layer_bridges_with_all_parameters_in_params(name):
    """``to_linen`` builds the layer inside a trace (``jit(init)``, and in every ``apply``):
    each layer builds there, and every parameter lands in ``'params'`` (traced only)."""
    layer = BRIDGED[name]
    bridged = nnx.bridge.to_linen(layer.func, *layer.args, **layer.keywords)
    x = jax.ShapeDtypeStruct((2, 9, 4), jnp.float32)
    variables = jax.eval_shape(bridged.init, jax.random.key(0), x)
    assert set(variables) == {"params"}
    reference = nnx.eval_shape(lambda: layer(rngs=nnx.Rngs(0)))
    n_params = len(jax.tree.leaves(nnx.state(reference, nnx.Param)))
    assert len(jax.tree.leaves(variables["params"])) == n_params
    assert jax.eval_shape(bridged.apply, variables, x).shape == (2, 9, 4)
