"""Model registry: config model names -> ssmix mixer layers, model and optimiser construction.

Each entry names the public ``ssmix.layers`` class (the PTD models are S4D / S5 with
``init="ptd"``, set in the configs); an ssmix version without the layer fails with a clear
:class:`LayerUnavailable` error rather than an ``AttributeError`` deep inside model
construction. :func:`check_mixer_args` checks a config's layer arguments against the
layer's signature before anything is built. :func:`build_optimizer` turns a config's
optimiser fields (groups, warmup, schedule) into the optax transformation.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import sys
from collections.abc import Callable

import optax
from flax import nnx

from experiments.lra.configs import Config
from experiments.lra.data import TaskData
from ssmix.blocks import RetrievalModel, SequenceModel
from ssmix.optim import make_optimizer, s5_schedule, warmup_cosine

# model name -> class name in ssmix.layers
MIXERS: dict[str, str] = {
    "s4": "S4",
    "s4d": "S4D",
    "s4-ptd": "S4D",  # S4D(init="ptd")
    "s5": "S5",
    "s5-ptd": "S5",  # S5(init="ptd")
    "hydra": "Hydra",
    "attention": "Attention",
}
# Models that need an initialiser of their layer's registry (``<Class>_INITS`` in the
# layer's module): model name -> init name.
REQUIRED_INIT = {"s4-ptd": "ptd", "s5-ptd": "ptd"}


class LayerUnavailable(ImportError):
    """The layer a model needs is not in the installed ssmix."""


def mixer_class(model: str) -> type[nnx.Module]:
    """The ``ssmix.layers`` class behind config model ``model``."""
    if model not in MIXERS:
        raise ValueError(f"model must be one of {', '.join(MIXERS)}; got {model!r}")
    name = MIXERS[model]
    layers = importlib.import_module("ssmix.layers")
    cls = getattr(layers, name, None)
    if cls is None:
        raise LayerUnavailable(
            f"model {model!r} needs ssmix.layers.{name}, which the installed ssmix does not have"
        )
    init = REQUIRED_INIT.get(model)
    if init is not None:
        registry = getattr(sys.modules[cls.__module__], f"{name}_INITS", ())
        if init not in registry:
            raise LayerUnavailable(
                f"model {model!r} needs {name}(init={init!r}), which the installed ssmix's "
                f"{name} does not offer"
            )
    return cls


def _model_passed(cls: type) -> tuple[str, ...]:
    """The arguments the model passes to every mixer itself (the feature width, its first
    argument after ``self``, and ``rngs``): not settable as ``mixer.<arg>``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    first = params[0].name if params and params[0].kind == params[0].POSITIONAL_OR_KEYWORD else ""
    return ("self", first, "rngs")


def mixer_arg_names(cls: type) -> tuple[tuple[str, ...], bool]:
    """``(names, open)``: the keyword arguments ``cls.__init__`` accepts besides the ones the
    model passes (the width ``d_model``, ``rngs``), and whether it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters.values()
    passed = _model_passed(cls)
    names = tuple(
        p.name for p in params
        if p.name not in passed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )  # fmt: skip
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def check_mixer_args(cfg: Config) -> None:
    """Raise ``ValueError`` when a layer argument of ``cfg.mixer`` (``mixer.<arg>``) is not a
    keyword argument of the model's layer class, naming the layer, the argument (with close
    matches) and every argument the layer accepts. Runs before any data is loaded."""
    cls = mixer_class(cfg.model)
    names, open_kwargs = mixer_arg_names(cls)
    if open_kwargs:
        return
    passed = [k for k in cfg.mixer if k in _model_passed(cls)]
    if passed:
        raise ValueError(
            f"mixer.{passed[0]} cannot be set: the model passes {passed[0]} to "
            f"{cls.__name__} itself"
        )
    for arg in cfg.mixer:
        if arg not in names:
            close = difflib.get_close_matches(arg, names, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join('mixer.' + c for c in close)}? " if close else ""
            raise ValueError(
                f"mixer.{arg}: {cls.__name__} (model {cfg.model!r}) takes no argument {arg!r}; "
                f"{hint}{cls.__name__} accepts: {', '.join(names)}"
            )


def mixer_factory(model: str, mixer_kwargs: dict):
    """``factory(d_model, rngs=rngs) -> layer`` for ``model`` with the config's layer args."""
    cls = mixer_class(model)
    return functools.partial(cls, **mixer_kwargs)


def build_model(cfg: Config, data: TaskData, *, rngs: nnx.Rngs) -> nnx.Module:
    """The classifier for ``cfg`` on ``data``: a :class:`SequenceModel` (or a
    :class:`RetrievalModel` for paired inputs) with the configured mixer in every block."""
    factory = mixer_factory(cfg.model, cfg.mixer)
    kwargs = dict(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_classes=data.n_classes,
        pooling=cfg.pooling,
        positional=cfg.positional,
        norm=cfg.norm,
        prenorm=cfg.prenorm,
        activation=cfg.activation,
        glu=cfg.glu,
        dropout=cfg.dropout,
        mlp_ratio=cfg.mlp_ratio,
        final_norm=cfg.final_norm,
        norm_momentum=cfg.norm_momentum,
        rngs=rngs,
    )
    if data.kind == "tokens":
        kwargs["vocab_size"] = data.vocab_size
    else:
        kwargs["d_input"] = 1
    if data.paired:
        return RetrievalModel(factory, **kwargs)
    return SequenceModel(factory, **kwargs)


# Config.no_decay kinds -> parameter names / module types trained without weight decay (the
# S4 code's add_optimizer_hooks: names ending in "bias", nn.Embedding and normalisation
# modules).
NO_DECAY_NAMES = {"bias": ("bias",)}
NO_DECAY_MODULES = {
    "norm": (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm),
    "embedding": (nnx.Embed,),
}


def warmup_steps_for(cfg: Config, *, steps_per_epoch: int, schedule_steps: int) -> int:
    """The warmup length in steps: ``warmup_steps``, or ``round(warmup_epochs ×
    steps_per_epoch)``, or ``int(warmup_ratio × schedule_steps)`` (whichever is set), at
    most ``schedule_steps − 1``."""
    if cfg.warmup_steps:
        steps = cfg.warmup_steps
    elif cfg.warmup_epochs:
        steps = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        steps = int(cfg.warmup_ratio * schedule_steps)
    return min(steps, schedule_steps - 1)


def build_optimizer(
    cfg: Config, model: nnx.Module, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[int], float], int]:
    """The grouped optimiser of ``cfg`` for ``model``.

    Groups (:func:`ssmix.optim.param_labels`): ``cfg.param_groups`` by attribute name inside
    the mixer layers (every name must exist there for an ssmix layer), SSM parameters at
    ``ssm_lr`` without decay, ``cfg.no_decay`` kinds at ``lr`` without decay, the rest AdamW
    at ``lr`` / ``weight_decay``. Schedule:
    ``"cosine"`` = linear warmup then cosine to 0 at ``schedule_steps`` (0: ``total_steps``);
    ``"s5"`` = :func:`ssmix.optim.s5_schedule` over ``schedule_steps`` (0: ``total_steps``).
    Steps here are optimiser updates (with gradient accumulation, batches / ``grad_accum``).

    Args:
      cfg: the run's config.
      model: the model (its variables; the labels are computed here).
      steps_per_epoch: optimiser steps per epoch (converts ``warmup_epochs``).
      total_steps: steps of the whole run.

    Returns:
      ``(tx, lr_schedule, warmup_steps)``: the transformation, the main group's learning
      rate per step, and the warmup length in steps.
    """
    for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if cfg.schedule == "cosine":
        length = cfg.schedule_steps or total_steps
        warmup = warmup_steps_for(cfg, steps_per_epoch=steps_per_epoch, schedule_steps=length)

        def schedule_fn(peak):
            return warmup_cosine(peak, warmup, length)

    elif cfg.schedule == "s5":
        length = cfg.schedule_steps or total_steps
        warmup = warmup_steps_for(cfg, steps_per_epoch=steps_per_epoch, schedule_steps=length)

        def schedule_fn(peak):
            return s5_schedule(peak, warmup, length)

    else:
        raise ValueError(f"schedule must be 'cosine' or 's5'; got {cfg.schedule!r}")
    mixer = mixer_class(cfg.model)
    names = tuple(n for kind in cfg.no_decay for n in NO_DECAY_NAMES.get(kind, ()))
    modules = tuple(m for kind in cfg.no_decay for m in NO_DECAY_MODULES.get(kind, ()))
    tx = make_optimizer(
        model,
        lr=cfg.lr,
        ssm_lr=cfg.ssm_lr,
        weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.grad_clip or None,
        no_decay_names=names,
        no_decay_modules=modules,
        groups=cfg.param_groups,
        within=mixer,
        # Names must exist in ssmix's layers; a stand-in mixer (tests) takes those it has.
        strict=mixer.__module__.startswith("ssmix."),
        schedule_fn=schedule_fn,
    )
    return tx, schedule_fn(cfg.lr), warmup
