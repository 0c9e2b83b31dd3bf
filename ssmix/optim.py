"""Optimiser parameter groups for SSM models: optax ``multi_transform`` over labelled params.

State-space parameters (Λ / A, P, B, Δ) train best with a small learning rate and no weight
decay (S4, S5). ssmix layers store them as :class:`ssmix.layers.base.SSMParam` variables, so
:func:`param_labels` finds them **by variable type**; parameters of other libraries can be
added **by name** (``ssm_names``: a parameter whose attribute name or path entry is one of the
names). Four groups (:data:`GROUPS`):

- ``"ssm"``: SSMParam (or a listed name): Adam at ``ssm_lr``, weight decay ``ssm_weight_decay``
  (0 by default).
- ``"ssm_decay"``: only by explicit choice (``groups``): AdamW at ``ssm_lr`` with
  ``weight_decay`` (S5's ``BandCdecay`` B; S4's ``C`` when its ``lr:`` is one number).
- ``"no_decay"``: parameters named in ``no_decay_names`` or inside a module of a type in
  ``no_decay_modules`` (norms, embeddings): Adam at ``lr``, no decay.
- ``"default"``: everything else: AdamW at ``lr`` with ``weight_decay``.

``groups`` chooses the group of single parameters **by attribute name** (the last entry of
the parameter's path, e.g. ``"log_dt"``, ``"B"``, ``"C"``), optionally only inside modules
of the types given by ``within`` (e.g. the mixer class, so that ``"B"`` means the SSM's B
and nothing else). It wins over the type and ``no_decay`` rules. This is how the LRA
presets reproduce the anchors' per-parameter rules (S4's ``lr:`` block, S5's
``opt_config`` / ``dt_global``).

Every group follows the same schedule shape scaled to its own peak: by default a linear
warmup from 0 and a cosine decay to ``end_lr_ratio`` times the peak (:func:`warmup_cosine`),
or any ``schedule_fn(peak) -> optax.Schedule`` (e.g. :func:`s5_schedule`). The step count
lives inside the optax state (nothing is mutated outside a jitted step).

Usage with Flax NNX::

    tx = make_optimizer(model, lr=1e-2, ssm_lr=1e-3, weight_decay=0.05,
                        warmup_steps=1000, total_steps=10000)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # flax >= 0.11 needs wrt=

or functionally: ``params = nnx.as_pure(nnx.state(model, nnx.Param))``,
``opt_state = tx.init(params)``, ``tx.update(grads, opt_state, params)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssmix._checks import check_positive_int
from ssmix.layers.base import SSMParam

GROUPS = ("ssm", "ssm_decay", "no_decay", "default")


def _as_param_state(model_or_state) -> nnx.State:
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.State):
        return model_or_state
    raise TypeError(
        f"expected an nnx.Module or the nnx.State of its parameters; got {type(model_or_state)}"
    )


def _entry(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _module_paths(model: nnx.Module, types: tuple[type, ...]) -> list[tuple[str, ...]]:
    """Paths (as string tuples) of the sub-modules of ``model`` that are instances of ``types``."""
    if not types:
        return []
    return [
        tuple(str(p) for p in path)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, types)
    ]


def _as_types(value, name: str) -> tuple[type, ...]:
    if value is None:
        return ()
    types = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for t in types:
        if not isinstance(t, type):
            raise TypeError(f"{name} must be a class or a tuple of classes; got {t!r}")
    return types


def param_labels(
    model_or_state: nnx.Module | nnx.State,
    *,
    ssm_names: Iterable[str] = (),
    no_decay_names: Iterable[str] = (),
    no_decay_modules: type | tuple[type, ...] = (),
    groups: Mapping[str, str] | None = None,
    within: type | tuple[type, ...] | None = None,
    strict: bool = True,
) -> nnx.State:
    """Label every parameter with one of :data:`GROUPS`.

    Rules, first match wins:

    1. ``groups[name]`` where ``name`` is the parameter's attribute name (last path entry),
       if ``within`` is None or the parameter lives inside a module of a ``within`` type;
    2. ``"ssm"`` for an :class:`SSMParam` or a parameter with a path entry in ``ssm_names``;
    3. ``"no_decay"`` for a path entry in ``no_decay_names`` or a parameter inside a module
       of a ``no_decay_modules`` type (e.g. ``(nnx.LayerNorm, nnx.BatchNorm, nnx.Embed)``);
    4. ``"default"``.

    Args:
      model_or_state: a module, or ``nnx.state(model, nnx.Param)`` (variables, not pure
        arrays: the variable type is what marks SSM parameters). ``no_decay_modules`` and
        ``within`` look at module types, so they need the module itself.
      ssm_names: extra names (attribute names / path entries) treated as SSM parameters.
      no_decay_names: names of non-SSM parameters trained without weight decay (for
        example ``("bias",)``).
      no_decay_modules: module types whose (non-SSM) parameters get no weight decay.
      groups: ``{attribute name: group}`` overrides, e.g. ``{"log_dt": "no_decay"}``.
        Every name must match at least one parameter (a typo is an error, not a no-op).
      within: restrict ``groups`` to parameters inside modules of these types.
      strict: a ``groups`` name that matches no parameter is a ``ValueError`` (else ignored).

    Returns:
      A pure ``nnx.State`` of strings with the structure of ``nnx.as_pure`` of the parameter
      state: use it as ``param_labels`` of ``optax.multi_transform``.
    """
    state = _as_param_state(model_or_state)
    ssm_names = frozenset(ssm_names)
    no_decay_names = frozenset(no_decay_names)
    no_decay_modules = _as_types(no_decay_modules, "no_decay_modules")
    within = _as_types(within, "within")
    groups = dict(groups or {})
    for name, group in groups.items():
        if group not in GROUPS:
            raise ValueError(f"groups[{name!r}] must be one of {', '.join(GROUPS)}; got {group!r}")
    if (no_decay_modules or within) and not isinstance(model_or_state, nnx.Module):
        raise TypeError(
            "no_decay_modules and within look at module types: pass the nnx.Module, not its state"
        )
    model = model_or_state if isinstance(model_or_state, nnx.Module) else None
    no_decay_prefixes = _module_paths(model, no_decay_modules) if model is not None else []
    within_prefixes = _module_paths(model, within) if model is not None else []
    used: set[str] = set()

    def inside(entries: tuple[str, ...], prefixes: list[tuple[str, ...]]) -> bool:
        return any(entries[: len(p)] == p for p in prefixes)

    def label(path, variable):
        if not isinstance(variable, nnx.Variable):
            raise TypeError(
                "param_labels needs the variable state (nnx.state(model, nnx.Param)), not pure "
                f"arrays: the variable type marks SSM parameters; got {type(variable)} at {path}"
            )
        entries = tuple(_entry(k) for k in path)
        if entries and entries[-1] in groups and (not within or inside(entries, within_prefixes)):
            used.add(entries[-1])
            return groups[entries[-1]]
        names = set(entries)
        if isinstance(variable, SSMParam) or names & ssm_names:
            return "ssm"
        if names & no_decay_names or inside(entries, no_decay_prefixes):
            return "no_decay"
        return "default"

    labels = jax.tree_util.tree_map_with_path(
        label, state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    unused = sorted(set(groups) - used)
    if unused and strict:
        where = f" inside {', '.join(t.__name__ for t in within)}" if within else ""
        raise ValueError(f"groups names {', '.join(map(repr, unused))} match no parameter{where}")
    return labels


def _check_schedule_args(peak, warmup_steps, total_steps):
    check_positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer; got {warmup_steps!r}")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})"
        )
    if peak < 0:
        raise ValueError(f"peak must be >= 0; got {peak!r}")


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
    ``end_ratio * peak`` at ``total_steps`` (constant afterwards). ``step -> lr``.

    With ``end_ratio = 0`` this is ``transformers.get_cosine_schedule_with_warmup``
    (state-spaces/s4's ``cosine_warmup``: ``lr·s/W`` for ``s < W``, then
    ``lr·½(1 + cos(π (s − W)/(T − W)))``) at every step ``s ≤ T``; past ``T`` that function
    climbs back up, this one stays at the end value.
    """
    _check_schedule_args(peak, warmup_steps, total_steps)
    if not 0.0 <= end_ratio <= 1.0:
        raise ValueError(f"need 0 <= end_ratio <= 1; got {end_ratio!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_ratio * peak,
    )


def s5_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The learning rate lindermanlab/S5 applies at step ``j`` (``s5/train.py`` with
    ``s5/train_helpers.py``: ``linear_warmup`` / ``cosine_annealing``, ``lr_min = 0``).

    S5 sets the rate *after* each step from the step just taken, so step 0 runs at ``peak``;
    with ``W = warmup_steps`` (``warmup_end`` epochs) and ``E = total_steps − W``::

        j = 0:        peak
        1 ≤ j ≤ W:    peak · j / W
        j > W:        peak · ½(1 + cos(π · min(j − 1, E) / E))

    (the cosine's step counter is not reset after the warmup, so the cosine starts at
    ``(W/E)`` of its period and reaches 0 at ``j = E + 1``, ``W − 1`` steps before the end).
    """
    _check_schedule_args(peak, warmup_steps, total_steps)
    W, E = warmup_steps, total_steps - warmup_steps

    def schedule(step):
        j = jnp.asarray(step)
        warm = peak * j / max(W, 1)
        count = jnp.minimum(jnp.maximum(j - 1, 0), E)
        cos = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * count / E))
        return jnp.where(j == 0, peak, jnp.where(j <= W, warm, cos))

    return schedule


def make_optimizer(
    model_or_state: nnx.Module | nnx.State,
    *,
    lr: float,
    ssm_lr: float,
    weight_decay: float,
    warmup_steps: int | None = None,
    total_steps: int | None = None,
    ssm_weight_decay: float = 0.0,
    end_lr_ratio: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip_norm: float | None = None,
    ssm_names: Iterable[str] = (),
    no_decay_names: Iterable[str] = (),
    no_decay_modules: type | tuple[type, ...] = (),
    groups: Mapping[str, str] | None = None,
    within: type | tuple[type, ...] | None = None,
    strict: bool = True,
    schedule_fn: Callable[[float], optax.Schedule] | None = None,
) -> optax.GradientTransformation:
    """The grouped optimiser: AdamW for ordinary parameters, Adam at ``ssm_lr`` for SSM ones.

    Args:
      model_or_state: the model (or its ``nnx.state(model, nnx.Param)``) whose parameters
        are labelled once here (see :func:`param_labels`); the returned transformation
        expects pure parameter trees of the same structure (what ``nnx.Optimizer`` passes).
      lr, ssm_lr: peak learning rates of the default / no-decay and the SSM groups.
      weight_decay: decoupled weight decay of the ``"default"`` and ``"ssm_decay"`` groups.
      ssm_weight_decay: decoupled weight decay of the ``"ssm"`` group (0 by default).
      warmup_steps, total_steps, end_lr_ratio: the :func:`warmup_cosine` schedule (needed
        unless ``schedule_fn`` is given).
      b1, b2: Adam moment decay rates (all groups).
      grad_clip_norm: clip the global gradient norm (over all parameters) first, if given.
      ssm_names, no_decay_names, no_decay_modules, groups, within, strict: see
        :func:`param_labels`.
      schedule_fn: ``peak -> optax.Schedule``, the schedule of every group scaled to its
        peak (e.g. ``functools.partial(s5_schedule, warmup_steps=W, total_steps=T)``).

    Returns:
      An ``optax.GradientTransformation``.
    """
    labels = param_labels(
        model_or_state,
        ssm_names=ssm_names,
        no_decay_names=no_decay_names,
        no_decay_modules=no_decay_modules,
        groups=groups,
        within=within,
        strict=strict,
    )
    if schedule_fn is None:
        if warmup_steps is None or total_steps is None:
            raise ValueError("give warmup_steps and total_steps, or a schedule_fn")

        def schedule_fn(peak):
            return warmup_cosine(peak, warmup_steps, total_steps, end_lr_ratio)

    lr_schedule = schedule_fn(lr)
    ssm_schedule = schedule_fn(ssm_lr)
    transforms = {
        "ssm": optax.adamw(ssm_schedule, b1=b1, b2=b2, weight_decay=ssm_weight_decay),
        "ssm_decay": optax.adamw(ssm_schedule, b1=b1, b2=b2, weight_decay=weight_decay),
        "no_decay": optax.adam(lr_schedule, b1=b1, b2=b2),
        "default": optax.adamw(lr_schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    }
    tx = optax.multi_transform(transforms, labels)
    if grad_clip_norm is not None:
        if grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive; got {grad_clip_norm!r}")
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx
