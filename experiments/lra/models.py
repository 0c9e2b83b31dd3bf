"""Model registry: config model names -> ssmix mixer layers, and model construction.

Each entry names the public ``ssmix.layers`` class, fixed layer arguments (the PTD models
are S4D / S5 with ``init="ptd"``, set in the configs) and the issue that provides the layer,
so a checkout without it fails with a clear :class:`LayerUnavailable` error rather than an
``AttributeError`` deep inside model construction.
"""

from __future__ import annotations

import functools
import importlib
import sys

from flax import nnx

from experiments.lra.configs import Config
from experiments.lra.data import TaskData
from ssmix.blocks import RetrievalModel, SequenceModel

# model name -> (class name in ssmix.layers, issue providing it)
MIXERS: dict[str, tuple[str, int]] = {
    "s4": ("S4", 4),
    "s4d": ("S4D", 4),
    "s4-ptd": ("S4D", 5),  # S4D(init="ptd"): the PTD initialiser comes with issue 5
    "s5": ("S5", 5),
    "s5-ptd": ("S5", 5),
    "hydra": ("Hydra", 6),
    "attention": ("Attention", 7),
}
# Models that need an initialiser of their layer's registry (``<Class>_INITS`` in the
# layer's module): model name -> init name.
REQUIRED_INIT = {"s4-ptd": "ptd", "s5-ptd": "ptd"}


class LayerUnavailable(ImportError):
    """The layer a model needs is not in this checkout yet."""


def mixer_class(model: str) -> type[nnx.Module]:
    """The ``ssmix.layers`` class behind config model ``model``."""
    if model not in MIXERS:
        raise ValueError(f"model must be one of {', '.join(MIXERS)}; got {model!r}")
    name, issue = MIXERS[model]
    layers = importlib.import_module("ssmix.layers")
    cls = getattr(layers, name, None)
    if cls is None:
        raise LayerUnavailable(
            f"model {model!r} needs ssmix.layers.{name}, which is not in this checkout yet "
            f"(it is provided by issue {issue})"
        )
    init = REQUIRED_INIT.get(model)
    if init is not None:
        registry = getattr(sys.modules[cls.__module__], f"{name}_INITS", ())
        if init not in registry:
            raise LayerUnavailable(
                f"model {model!r} needs {name}(init={init!r}), which this checkout's {name} "
                f"does not offer yet (it is provided by issue {issue})"
            )
    return cls


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
        rngs=rngs,
    )
    if data.kind == "tokens":
        kwargs["vocab_size"] = data.vocab_size
    else:
        kwargs["d_input"] = 1
    if data.paired:
        return RetrievalModel(factory, **kwargs)
    return SequenceModel(factory, **kwargs)
