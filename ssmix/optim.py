"""Optimiser parameter groups for SSM models: optax ``multi_transform`` over labelled params.

State-space parameters (Λ / A, P, B, Δ) train best with a small learning rate and no weight
decay (S4, S5). ssmix layers store them as :class:`ssmix.layers.base.SSMParam` variables, so
:func:`param_labels` finds them **by variable type**; parameters of other libraries can be
added **by name** (``ssm_names``: a parameter whose attribute name or path entry is one of the
names). Three groups:

- ``"ssm"``: SSMParam (or a listed name): Adam at ``ssm_lr``, weight decay ``ssm_weight_decay``
  (0 by default).
- ``"no_decay"``: parameters whose name is in ``no_decay_names``: Adam at ``lr``, no decay.
- ``"default"``: everything else: AdamW at ``lr`` with ``weight_decay``.

Both learning rates follow a linear warmup from 0 and a cosine decay to ``end_lr_ratio``
times the peak, computed from the step count inside the optax state (nothing is mutated
outside a jitted step).

Usage with Flax NNX::

    tx = make_optimizer(model, lr=1e-2, ssm_lr=1e-3, weight_decay=0.05,
                        warmup_steps=1000, total_steps=10000)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # flax >= 0.11 needs wrt=

or functionally: ``params = nnx.as_pure(nnx.state(model, nnx.Param))``,
``opt_state = tx.init(params)``, ``tx.update(grads, opt_state, params)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import optax
from flax import nnx

from ssmix._checks import check_positive_int
from ssmix.layers.base import SSMParam

GROUPS = ("ssm", "no_decay", "default")


def _as_param_state(model_or_state) -> nnx.State:
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        return model_or_state
    raise TypeError(
        f"expected an nnx.Module or the nnx.State of its parameters; got {type(model_or_state)}"
    )


def param_labels(
    model_or_state: nnx.Module | nnx.State,
    *,
    ssm_names: Iterable[str] = (),
    no_decay_names: Iterable[str] = (),
) -> nnx.State:
    """Label every parameter ``"ssm"``, ``"no_decay"`` or ``"default"``.

    Args:
      model_or_state: a module, or ``nnx.state(model, nnx.Param)`` (variables, not pure
        arrays: the variable type is what marks SSM parameters).
      ssm_names: extra names (attribute names / path entries) treated as SSM parameters.
      no_decay_names: names of non-SSM parameters trained without weight decay (for
        example ``("bias", "scale", "embedding")``).

    Returns:
      A pure ``nnx.State`` of strings with the structure of ``nnx.as_pure`` of the parameter
      state: use it as ``param_labels`` of ``optax.multi_transform``.
    """
    state = _as_param_state(model_or_state)
    ssm_names = frozenset(ssm_names)
    no_decay_names = frozenset(no_decay_names)

    def label(path, variable):
        if not isinstance(variable, nnx.Variable):
            raise TypeError(
                "param_labels needs the variable state (nnx.state(model, nnx.Param)), not pure "
                f"arrays: the variable type marks SSM parameters; got {type(variable)} at {path}"
            )
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        if isinstance(variable, SSMParam) or names & ssm_names:
            return "ssm"
        if names & no_decay_names:
            return "no_decay"
        return "default"

    return jax.tree_util.tree_map_with_path(
        label, state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
    ``end_ratio * peak`` at ``total_steps`` (constant afterwards). ``step -> lr``."""
    check_positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer; got {warmup_steps!r}")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})"
        )
    if peak < 0 or not 0.0 <= end_ratio <= 1.0:
        raise ValueError(f"need peak >= 0 and 0 <= end_ratio <= 1; got {peak!r}, {end_ratio!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_ratio * peak,
    )


def make_optimizer(
    model_or_state: nnx.Module | nnx.State,
    *,
    lr: float,
    ssm_lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    ssm_weight_decay: float = 0.0,
    end_lr_ratio: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip_norm: float | None = None,
    ssm_names: Iterable[str] = (),
    no_decay_names: Iterable[str] = (),
) -> optax.GradientTransformation:
    """The grouped optimiser: AdamW for ordinary parameters, Adam at ``ssm_lr`` for SSM ones.

    Args:
      model_or_state: the model (or its ``nnx.state(model, nnx.Param)``) whose parameters
        are labelled once here (see :func:`param_labels`); the returned transformation
        expects pure parameter trees of the same structure (what ``nnx.Optimizer`` passes).
      lr, ssm_lr: peak learning rates of the default and SSM groups.
      weight_decay, ssm_weight_decay: decoupled weight decay of the two groups.
      warmup_steps, total_steps, end_lr_ratio: the :func:`warmup_cosine` schedule.
      b1, b2: Adam moment decay rates (all groups).
      grad_clip_norm: clip the global gradient norm (over all parameters) first, if given.
      ssm_names, no_decay_names: see :func:`param_labels`.

    Returns:
      An ``optax.GradientTransformation``.
    """
    labels = param_labels(model_or_state, ssm_names=ssm_names, no_decay_names=no_decay_names)
    lr_schedule = warmup_cosine(lr, warmup_steps, total_steps, end_lr_ratio)
    ssm_schedule = warmup_cosine(ssm_lr, warmup_steps, total_steps, end_lr_ratio)
    groups = {
        "ssm": optax.adamw(ssm_schedule, b1=b1, b2=b2, weight_decay=ssm_weight_decay),
        "no_decay": optax.adam(lr_schedule, b1=b1, b2=b2),
        "default": optax.adamw(lr_schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    }
    tx = optax.multi_transform(groups, labels)
    if grad_clip_norm is not None:
        if grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive; got {grad_clip_norm!r}")
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx
