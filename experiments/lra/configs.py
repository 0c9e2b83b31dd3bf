"""Experiment configurations: every LRA task × model, presets named by their source.

A :class:`Config` is one flat dataclass (task, model, architecture, optimisation, data and
loop settings), validated on construction (impossible values are a ``ValueError`` naming the
field, before any data is loaded). :func:`make_config` builds it from three layers, later
ones winning:

1. the :class:`Config` defaults and the task's data settings (:data:`TASK_DEFAULTS`);
2. the preset (:data:`PRESETS`):

   - ``"published"`` (default): the configuration behind each model's published LRA
     numbers, every value taken from the anchor file named in :data:`SOURCES` (see below);
   - ``"s4-2023"``: state-spaces/s4's 2023 rewrite of its LRA configs
     (``configs/experiment/lra/s4-<task>.yaml``; S4 and S4D only; no paper reports
     per-task accuracy for these);
   - ``"demo"``: a small CPU-sized model on top of the published settings (:data:`DEMO`);

3. ``overrides`` (the CLI's ``--set key=value``; ``mixer.<arg>=value`` sets a layer argument).

Sources of ``"published"`` (the files are read-only mirrors; values copied, not code):

- **S4, S4D** — state-spaces/s4 (commit e757cef)
  ``configs/experiment/lra/old/v3-s4-{listops,imdb,aan,cifar,pathfinder,pathx}.yaml``, the
  configs ``models/s4/experiments.md`` runs for the HTTYH / S4D numbers (they were
  ``configs/experiment/lra/s4-lra-<task>.yaml`` until commit 62a14bb moved them to ``old/``),
  resolved with their defaults: ``configs/model/s4.yaml`` + ``configs/model/layer/s4.yaml``
  (``wd: 0.0`` on registered SSM tensors, ``final_act: glu``, ``activation: gelu``),
  ``configs/pipeline/*.yaml`` (decoder ``pool`` with ``use_lengths`` on the token tasks =
  masked mean; ``pool`` without lengths on images = mean; Pathfinder's ``mode: last``),
  ``configs/optimizer/adamw.yaml`` (betas 0.9 / 0.999), ``configs/scheduler/cosine_warmup.yaml``
  (``num_warmup_steps: 1000`` where the experiment does not set it: ListOps, IMDB),
  ``configs/loader/default.yaml`` (``drop_last``), ``configs/config.yaml``
  (``optimizer_param_grouping``: no weight decay on biases and normalisation layers;
  ``src/utils/optim_groups.py`` ``add_optimizer_hooks`` adds ``nn.Embedding``). S4D is the
  same file with ``model/layer=s4d`` (``mode: diag``; the files' ``init: legs`` gives
  S4D-LegS, the 84.89 average).
- **S4-PTD** — AnnanYu/Approximate_Diagonal (commit ec98d6a)
  ``S4-PTD/configs/experiment/lra/s4-PTD-<task>.yaml`` with ``S4-PTD/configs/model/s4-ptd.yaml``
  and ``S4-PTD/configs/model/layer/s4.yaml``; its ``configs/config.yaml`` has no
  ``optimizer_param_grouping``, so biases, norms and embeddings are decayed; its kernel
  (``S4-PTD/src/models/sequence/modules/s4block.py``) folds B into C and registers only
  ``inv_dt``, ``A_real``, ``A_imag`` (ssmix's B of S4D trains with C: main lr, decayed).
- **S5** — lindermanlab/S5 (commit 3c18fdb) ``bin/run_experiments/run_lra_<task>.sh`` with
  the ``run_train.py`` defaults (prenorm, BatchNorm momentum 0.95, ``warmup_end`` 1,
  ``lr_min`` 0, ``conj_sym``, mean pooling) and ``s5/train_helpers.py`` ``create_train_state``
  for the ``opt_config`` / ``dt_global`` groups (:data:`S5_OPT_CONFIGS`). S5's model has no
  norm after the last block (``final_norm=False``).
- **S5-PTD** — AnnanYu/Approximate_Diagonal ``S5-PTD/bin/run_experiments/run_lra_<task>.sh``
  with ``S5-PTD/run_train.py`` (``S5-PTD/s5/train.py`` forces ``conj_sym = False``). Its
  ``--force_neg`` (Path-X) has no ssmix counterpart and is not reproduced.
- **Hydra, attention** — nothing published: **ssmix's own choice** (:data:`UNPUBLISHED`):
  Hydra takes the S4 settings of the task (with its own layer defaults), attention a 4-layer
  pre-LN Transformer with sinusoidal positions and an MLP, with the S4 batch size and epochs.

Optimiser groups (``ssmix.optim.param_labels``): ``lr`` / ``weight_decay`` for ordinary
parameters, ``ssm_lr`` without decay for :class:`~ssmix.layers.base.SSMParam`; ``no_decay``
lists the kinds (``"bias"``, ``"norm"``, ``"embedding"``) trained at ``lr`` without decay;
``param_groups`` puts single mixer parameters (by attribute name) into ``"ssm"``,
``"ssm_decay"`` (``ssm_lr`` with decay), ``"no_decay"`` or ``"default"``. Warmup is given as
``warmup_steps`` (S4: the anchors count steps), ``warmup_epochs`` (S5) or ``warmup_ratio``
(at most one non-zero); ``schedule`` is ``"cosine"`` (linear warmup, cosine to 0 at
``schedule_steps``, the anchors' ``num_training_steps``; 0 = the run's length) or ``"s5"``
(S5's own step rule, :func:`ssmix.optim.s5_schedule`).

Throughput (ssmix's choice, not an anchor value): the token tasks pad each batch to its
longest sequence rounded up to 128 with length-grouped batches (windows of 20 batches);
images have one fixed length.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
MODELS = ("s4", "s4d", "s5", "s4-ptd", "s5-ptd", "hydra", "attention")
PRESETS = ("published", "s4-2023", "demo")
UNPUBLISHED = ("hydra", "attention")
SCHEDULES = ("cosine", "s5")
NO_DECAY_KINDS = ("bias", "norm", "embedding")
PARAM_GROUPS = ("ssm", "ssm_decay", "no_decay", "default")
PRECISIONS = ("float32", "bfloat16")
_NORMS = ("layer", "batch", "rms")
_POOLINGS = ("mean", "masked_mean", "last")


@dataclass
class Config:
    """Everything a run needs; serialised to ``config.json`` in the run directory.

    Construction validates every field (:meth:`validate`): a zero batch size, a negative
    learning rate, an unknown schedule... raise ``ValueError`` naming the field.
    """

    task: str = "listops"
    model: str = "s4d"
    preset: str = "published"
    source: str = ""  # the anchor file(s) of the preset's values
    seed: int = 0
    # Paths: data_dir "" means the task's default folder under data/; runs go to
    # <out_dir>/<run_name> (run_name "" means "<task>-<model>-<preset>").
    data_dir: str = ""
    out_dir: str = "runs"
    run_name: str = ""
    # Architecture (ssmix.blocks.SequenceModel / RetrievalModel).
    n_layers: int = 6
    d_model: int = 256
    norm: str = "batch"
    norm_momentum: float = 0.9  # BatchNorm running-average momentum (PyTorch's 0.1 = 0.9)
    prenorm: bool = False
    final_norm: bool = True  # with prenorm: a norm after the last block (S4 yes, S5 no)
    activation: str = "gelu"
    glu: str = "full"
    dropout: float = 0.0
    mlp_ratio: float = 0.0
    pooling: str = "masked_mean"
    positional: str = "none"
    mixer: dict[str, Any] = field(default_factory=dict)  # layer keyword arguments
    # Optimisation (experiments.lra.models.build_optimizer, ssmix.optim.make_optimizer).
    batch_size: int = 32
    epochs: int = 40
    max_steps: int = 0  # 0: epochs × steps per epoch
    lr: float = 0.01
    ssm_lr: float = 0.001
    weight_decay: float = 0.05
    no_decay: list[str] = field(default_factory=list)  # kinds in NO_DECAY_KINDS
    param_groups: dict[str, str] = field(default_factory=dict)  # mixer param name -> group
    warmup_ratio: float = 0.1  # fraction of the schedule's steps
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    schedule_steps: int = 0  # schedule length in optimiser updates; 0: the run's total
    grad_clip: float = 0.0  # 0: no clipping
    max_nonfinite_steps: int = 10  # consecutive non-finite steps before a run stops
    # Precision and accumulation (experiments.lra.train.Experiment): "bfloat16" runs the
    # model around the mixers (embedding, norms, projections, MLP, head) in bfloat16 and
    # feeds the mixers bfloat16 activations; master parameters, optimiser state and the loss
    # stay float32. grad_accum > 1 averages the gradients of that many
    # consecutive batches per optimiser update (optax.MultiSteps; effective batch
    # batch_size × grad_accum; a step is one batch, the schedule counts updates).
    precision: str = "float32"
    grad_accum: int = 1
    # Data.
    max_len: int = 2048
    pixel_norm: list[float] = field(default_factory=list)  # [mean, std]; []: the task's default
    pad_multiple: int = 2048  # batch length = longest sequence rounded up to this
    length_grouping: int = 0  # > 0: batches of similar length, sorted in windows of N batches
    train_limit: int = 0  # 0: all training examples, else the first N
    eval_limit: int = 0  # 0: all validation / test examples, else the first N
    eval_batch_size: int = 0  # 0: batch_size
    # Loop.
    log_every: int = 50
    eval_every: int = 0  # 0: once per epoch
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self):
        self.validate()

    @property
    def name(self) -> str:
        """The run directory name."""
        return self.run_name or f"{self.task}-{self.model}-{self.preset}"

    def validate(self) -> None:
        """Raise ``ValueError`` (``TypeError`` for a wrong type) naming the first bad field."""
        for name in ("task", "model", "preset"):
            _check(name, getattr(self, name), {"task": TASKS, "model": MODELS,
                                               "preset": PRESETS}[name])  # fmt: skip
        _check("norm", self.norm, _NORMS)
        _check("pooling", self.pooling, _POOLINGS)
        _check("schedule", self.schedule, SCHEDULES)
        _check("precision", self.precision, PRECISIONS)
        for name in (
            "n_layers",
            "d_model",
            "batch_size",
            "epochs",
            "max_len",
            "pad_multiple",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
            "grad_accum",
        ):
            _positive_int(name, getattr(self, name))  # fmt: skip
        for name in (
            "seed",
            "max_steps",
            "length_grouping",
            "train_limit",
            "eval_limit",
            "eval_batch_size",
            "eval_every",
            "warmup_steps",
            "schedule_steps",
        ):
            _non_negative_int(name, getattr(self, name))  # fmt: skip
        for name in ("prenorm", "final_norm", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        # NaN learning rates pass (the training loop's non-finite-loss check stops such runs);
        # negative or infinite ones cannot be meant.
        for name in ("lr", "ssm_lr", "weight_decay", "grad_clip", "mlp_ratio", "warmup_epochs"):
            value = _number(name, getattr(self, name))
            if value < 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("dropout", "warmup_ratio", "norm_momentum"):
            value = _number(name, getattr(self, name))
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {value!r}")
        warmups = [n for n in ("warmup_ratio", "warmup_steps", "warmup_epochs") if getattr(self, n)]
        if len(warmups) > 1:
            raise ValueError(
                f"give the warmup one way: {' and '.join(warmups)} are both non-zero (set the "
                "others to 0)"
            )
        if self.pixel_norm and (
            not isinstance(self.pixel_norm, (list, tuple))
            or len(self.pixel_norm) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in self.pixel_norm)
            or not all(math.isfinite(v) for v in self.pixel_norm)
            or self.pixel_norm[1] <= 0
        ):
            raise ValueError(
                "pixel_norm must be [] (the task's default) or [mean, std] with a finite mean "
                f"and std > 0; got {self.pixel_norm!r}"
            )
        if not isinstance(self.mixer, dict):
            raise TypeError(f"mixer must be a dict of layer arguments; got {self.mixer!r}")
        if not isinstance(self.no_decay, list) or any(
            k not in NO_DECAY_KINDS for k in self.no_decay
        ):
            raise ValueError(
                f"no_decay must be a list of {', '.join(NO_DECAY_KINDS)}; got {self.no_decay!r}"
            )
        if not isinstance(self.param_groups, dict) or any(
            g not in PARAM_GROUPS for g in self.param_groups.values()
        ):
            raise ValueError(
                f"param_groups must map parameter names to one of {', '.join(PARAM_GROUPS)}; "
                f"got {self.param_groups!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r}")
    return float(value)


# Data settings per task: sequence length, padding / bucketing, pooling. The token tasks pad
# to the batch's longest sequence rounded up to 128 with length-grouped batches (ssmix's
# throughput choice; the anchors pad to the batch maximum with random batches).
_TOKENS = {"pad_multiple": 128, "length_grouping": 20, "pooling": "masked_mean"}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "listops": {"max_len": 2048, **_TOKENS},
    "text": {"max_len": 4096, **_TOKENS},
    "retrieval": {"max_len": 4000, **_TOKENS},
    "image": {"max_len": 1024, "pad_multiple": 1024, "pooling": "mean"},
    "pathfinder": {"max_len": 1024, "pad_multiple": 1024, "pooling": "mean"},
    "pathx": {"max_len": 16384, "pad_multiple": 16384, "pooling": "mean"},
}

# ----------------------------------------------------------------------------------------
# Anchor values, in the anchors' own vocabulary (resolved into Config fields below).
# ----------------------------------------------------------------------------------------

S4_REPO = "state-spaces/s4@e757cef"
PTD_REPO = "AnnanYu/Approximate_Diagonal@ec98d6a"
S5_REPO = "lindermanlab/S5@3c18fdb"


def _s4_anchor(file, layers, h, n, n_ssm, dropout, prenorm, norm, lr_block, dt_min, dt_max,
               decoder, batch, lr, wd, epochs, warmup, steps, seed):  # fmt: skip
    """One S4-style Hydra experiment file. ``n_ssm`` is resolved (``${..d_model}`` and
    ``null`` are d_model); ``lr_block`` is the layer's ``lr:`` (dict or one number);
    ``decoder`` is the pooling it resolves to; ``warmup`` / ``steps`` are the scheduler's
    ``num_warmup_steps`` / ``num_training_steps``."""
    return dict(file=file, n_layers=layers, d_model=h, d_state=n, n_ssm=n_ssm, dropout=dropout,
                prenorm=prenorm, norm=norm, lr_block=lr_block, dt_min=dt_min, dt_max=dt_max,
                pooling=decoder, batch=batch, lr=lr, wd=wd, epochs=epochs, warmup=warmup,
                steps=steps, seed=seed)  # fmt: skip


_V3 = "configs/experiment/lra/old/v3-s4-{}.yaml"
_LR_DICT = {"dt": None, "A": 1e-3, "B": 1e-3}
# fmt: off
# file, L, H, N, n_ssm, dropout, prenorm, norm, lr:, dt range, pooling, batch, lr, wd, epochs,
# num_warmup_steps, num_training_steps, seed
S4_V3 = {
    "listops": _s4_anchor(_V3.format("listops"), 8, 128, 64, 128, 0.0, False, "batch", _LR_DICT,
                          1e-3, 0.1, "masked_mean", 50, 0.01, 0.05, 40, 1000, 80000, 2222),
    "text": _s4_anchor(_V3.format("imdb"), 6, 256, 64, 256, 0.0, True, "batch", _LR_DICT,
                       1e-3, 0.1, "masked_mean", 16, 0.01, 0.05, 32, 1000, 50000, 2222),
    "retrieval": _s4_anchor(_V3.format("aan"), 6, 256, 64, 256, 0.0, True, "batch", _LR_DICT,
                            1e-3, 0.1, "masked_mean", 64, 0.01, 0.05, 20, 2500, 50000, 2222),
    "image": _s4_anchor(_V3.format("cifar"), 6, 512, 64, 2, 0.1, False, "layer", _LR_DICT,
                        1e-3, 0.1, "mean", 50, 0.01, 0.05, 200, 900, 180000, 2222),
    "pathfinder": _s4_anchor(_V3.format("pathfinder"), 6, 256, 64, 256, 0.0, True, "batch", 1e-3,
                             1e-3, 0.1, "last", 64, 0.004, 0.03, 200, 2500, 500000, 2222),
    "pathx": _s4_anchor(_V3.format("pathx"), 6, 256, 64, 256, 0.0, True, "batch", 5e-4,
                        1e-4, 0.1, "mean", 16, 0.001, 0.05, 50, 50000, 500000, 2222),
}
_Y23 = "configs/experiment/lra/s4-{}.yaml"
S4_2023 = {
    "listops": _s4_anchor(_Y23.format("listops"), 6, 256, 4, 1, 0.0, False, "batch", _LR_DICT,
                          1e-3, 0.1, "masked_mean", 32, 0.01, 0.05, 40, 12000, 120000, 3333),
    "text": _s4_anchor(_Y23.format("imdb"), 6, 256, 4, 1, 0.0, True, "batch", _LR_DICT,
                       1e-3, 0.1, "masked_mean", 16, 0.01, 0.05, 32, 5000, 50000, 3333),
    "retrieval": _s4_anchor(_Y23.format("aan"), 6, 256, 4, 1, 0.0, True, "batch", _LR_DICT,
                            1e-3, 0.1, "masked_mean", 64, 0.01, 0.05, 20, 5000, 50000, 3333),
    "image": _s4_anchor(_Y23.format("cifar"), 6, 512, 64, 1, 0.1, False, "batch", 1e-3,
                        1e-3, 0.1, "mean", 50, 0.01, 0.05, 200, 18000, 180000, 2222),
    "pathfinder": _s4_anchor(_Y23.format("pathfinder"), 6, 256, 64, 256, 0.0, True, "batch", 1e-3,
                             1e-3, 0.1, "mean", 64, 0.004, 0.05, 200, 50000, 500000, 3333),
    "pathx": _s4_anchor(_Y23.format("pathx"), 6, 256, 64, 256, 0.0, True, "batch", 1e-3,
                        1e-4, 0.1, "mean", 16, 0.001, 0.05, 50, 50000, 500000, 3333),
}
_PTD = "S4-PTD/configs/experiment/lra/s4-PTD-{}.yaml"
S4_PTD = {
    "listops": _s4_anchor(_PTD.format("listops"), 8, 256, 64, 1, 0.0, False, "batch",
                          {"dt": 4e-4, "A": 4e-4, "B": 4e-4}, 1e-3, 1.0, "masked_mean", 50,
                          0.002, 0.05, 80, 12000, 1200000, 2222),
    "text": _s4_anchor(_PTD.format("imdb"), 6, 256, 64, 1, 0.0, True, "batch", _LR_DICT,
                       1e-3, 0.1, "masked_mean", 16, 0.01, 0.05, 80, 5000, 50000, 3333),
    "retrieval": _s4_anchor(_PTD.format("aan"), 6, 128, 64, 1, 0.0, True, "batch", _LR_DICT,
                            1e-3, 0.1, "masked_mean", 64, 0.004, 0.03, 40, 5000, 100000, 3333),
    "image": _s4_anchor(_PTD.format("cifar"), 6, 128, 64, 1, 0.1, False, "layer", 1e-3,
                        1e-3, 0.1, "mean", 128, 0.01, 0.01, 2000, 3600, 1760000, 2222),
    "pathfinder": _s4_anchor(_PTD.format("pathfinder"), 6, 256, 64, 1, 0.0, True, "batch", 1e-3,
                             1e-3, 0.1, "mean", 64, 0.004, 0.03, 300, 150000, 800000, 3333),
    "pathx": _s4_anchor(_PTD.format("pathx"), 6, 128, 64, 1, 0.0, True, "batch", 1e-3,
                        1e-4, 0.1, "mean", 20, 0.001, 0.03, 100, 200000, 1250000, 3333),
}
# fmt: on


def _s5_anchor(file, **flags):
    """One S5 run script: its command-line flags over the ``run_train.py`` defaults."""
    defaults = dict(C_init="trunc_standard_normal", activation_fn="half_glu1", conj_sym=True,
                    clip_eigs=False, bidirectional=False, dt_min=1e-3, dt_max=0.1, prenorm=True,
                    batchnorm=True, bn_momentum=0.95, dt_global=False, lr_min=0.0,
                    warmup_end=1, p_dropout=0.0, weight_decay=0.05, opt_config="standard",
                    mode="pool")  # fmt: skip
    return dict(file=file, **{**defaults, **flags})


_S5 = "bin/run_experiments/run_lra_{}.sh"
# fmt: off
S5_RUNS = {
    "listops": _s5_anchor(_S5.format("listops"), C_init="lecun_normal", activation_fn="half_glu2",
                          bidirectional=True, blocks=8, bsz=50, d_model=128, epochs=40,
                          jax_seed=6554595, lr_factor=3, n_layers=8, opt_config="BfastandCdecay",
                          p_dropout=0.0, ssm_lr_base=1e-3, ssm_size_base=16, warmup_end=1,
                          weight_decay=0.04),
    "text": _s5_anchor(_S5.format("imdb"), C_init="lecun_normal", activation_fn="half_glu2",
                       bidirectional=True, blocks=12, bsz=50, d_model=256, dt_global=True,
                       epochs=35, jax_seed=8825365, lr_factor=4, n_layers=6, opt_config="standard",
                       p_dropout=0.1, ssm_lr_base=1e-3, ssm_size_base=192, warmup_end=0,
                       weight_decay=0.07),
    "retrieval": _s5_anchor(_S5.format("aan"), C_init="trunc_standard_normal", bidirectional=True,
                            blocks=16, bsz=32, d_model=128, dt_global=True, epochs=20,
                            jax_seed=5464368, lr_factor=2, n_layers=6, opt_config="standard",
                            p_dropout=0.0, ssm_lr_base=1e-3, ssm_size_base=256, warmup_end=1,
                            weight_decay=0.05),
    "image": _s5_anchor(_S5.format("cifar"), C_init="lecun_normal", bidirectional=True, blocks=3,
                        bsz=50, clip_eigs=True, d_model=512, epochs=250, jax_seed=16416,
                        lr_factor=4.5, n_layers=6, opt_config="BfastandCdecay", p_dropout=0.1,
                        ssm_lr_base=1e-3, ssm_size_base=384, warmup_end=1, weight_decay=0.07),
    "pathfinder": _s5_anchor(_S5.format("pathfinder"), C_init="trunc_standard_normal",
                             bidirectional=True, blocks=8, bn_momentum=0.9, bsz=64, d_model=192,
                             epochs=200, jax_seed=8180844, lr_factor=5, n_layers=6,
                             opt_config="standard", p_dropout=0.05, ssm_lr_base=9e-4,
                             ssm_size_base=256, warmup_end=1, weight_decay=0.03),
    "pathx": _s5_anchor(_S5.format("pathx"), C_init="complex_normal", bidirectional=True,
                        blocks=16, bn_momentum=0.9, bsz=32, d_model=128, dt_min=1e-4, epochs=75,
                        jax_seed=6429262, lr_factor=3, n_layers=6, opt_config="BandCdecay",
                        p_dropout=0.0, ssm_lr_base=6e-4, ssm_size_base=256, warmup_end=1,
                        weight_decay=0.06),
}
_S5P = "S5-PTD/bin/run_experiments/run_lra_{}.sh"
S5_PTD_RUNS = {  # conj_sym: S5-PTD/s5/train.py sets args.conj_sym = False for every run
    "listops": _s5_anchor(_S5P.format("listops"), C_init="lecun_normal", conj_sym=False,
                          activation_fn="half_glu2", bidirectional=True, blocks=8, bsz=50,
                          d_model=128, epochs=35, jax_seed=6554595, lr_factor=3, n_layers=8,
                          opt_config="BfastandCdecay", p_dropout=0.0, ssm_lr_base=1e-3,
                          ssm_size_base=16, warmup_end=1, weight_decay=0.05),
    "text": _s5_anchor(_S5P.format("imdb"), C_init="lecun_normal", conj_sym=False,
                       activation_fn="half_glu2", bidirectional=True, blocks=12, bsz=50,
                       d_model=256, dt_global=True, epochs=40, jax_seed=8825365, lr_factor=4,
                       n_layers=6, opt_config="standard", p_dropout=0.1, ssm_lr_base=1e-3,
                       ssm_size_base=192, warmup_end=5, weight_decay=0.07),
    "retrieval": _s5_anchor(_S5P.format("aan"), C_init="trunc_standard_normal", conj_sym=False,
                            bidirectional=True, blocks=16, bsz=32, d_model=128, dt_global=True,
                            epochs=20, jax_seed=5464368, lr_factor=2, n_layers=6,
                            opt_config="standard", p_dropout=0.0, ssm_lr_base=1e-3,
                            ssm_size_base=256, warmup_end=1, weight_decay=0.05),
    "image": _s5_anchor(_S5P.format("cifar"), C_init="lecun_normal", conj_sym=False,
                        bidirectional=True, blocks=3, bsz=50, clip_eigs=True, d_model=512,
                        epochs=250, jax_seed=16418, lr_factor=5, n_layers=6,
                        opt_config="BfastandCdecay", p_dropout=0.1, ssm_lr_base=1e-3,
                        ssm_size_base=384, warmup_end=1, weight_decay=0.07),
    "pathfinder": _s5_anchor(_S5P.format("pathfinder"), C_init="trunc_standard_normal",
                             conj_sym=False, bidirectional=True, blocks=8, bn_momentum=0.9,
                             bsz=64, d_model=192, epochs=230, jax_seed=8180844, lr_factor=5,
                             n_layers=6, opt_config="standard", p_dropout=0.05,
                             ssm_lr_base=9e-4, ssm_size_base=256, warmup_end=10,
                             weight_decay=0.05),
    "pathx": _s5_anchor(_S5P.format("pathx"), C_init="complex_normal", conj_sym=False,
                        bidirectional=True, blocks=16, bn_momentum=0.9, bsz=32, d_model=128,
                        dt_min=1e-4, epochs=90, jax_seed=6429262, lr_factor=3, n_layers=6,
                        opt_config="BandCdecay", p_dropout=0.0, ssm_lr_base=6e-4,
                        ssm_size_base=256, warmup_end=1, weight_decay=0.06, force_neg=True),
}
# fmt: on

# S5's opt_config (s5/train_helpers.py create_train_state) as ssmix parameter groups of the
# S5 layer: "ssm" = S5's "ssm" (Adam at ssm_lr), "default" = "regular" (AdamW at lr),
# "ssm_decay" = BandCdecay's "none" (AdamW at ssm_lr, as update_learning_rate_per_step sets
# it). The "norm" entry of S5's lists never matches: map_nested_fn recurses into the norm's
# dict, so its scale / bias are "regular" (decayed at lr) like every other parameter.
S5_OPT_CONFIGS: dict[str, dict[str, str]] = {
    "standard": {"Lambda_re": "ssm", "Lambda_im": "ssm", "B": "ssm", "C": "default",
                 "D": "default"},
    "BandCdecay": {"Lambda_re": "ssm", "Lambda_im": "ssm", "B": "ssm_decay", "C": "default",
                   "D": "default"},
    "BfastandCdecay": {"Lambda_re": "ssm", "Lambda_im": "ssm", "B": "default", "C": "default",
                       "D": "default"},
    "noBCdecay": {"Lambda_re": "ssm", "Lambda_im": "ssm", "B": "ssm", "C": "ssm", "D": "ssm"},
}  # fmt: skip
_GLU = {"half_glu1": "half1", "half_glu2": "half2", "full_glu": "full", "gelu": "none"}

# S4 anchor parameter names (its `lr:` keys) -> ssmix attribute names, per model. S4-PTD's
# kernel has no B (folded into C) and registers no C: both train as plain parameters.
S4_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "s4": {"dt": ("log_dt",), "A": ("A_re_log", "A_im", "P"), "B": ("B",), "C": ("C",)},
    "s4d": {"dt": ("log_dt",), "A": ("A_re_log", "A_im"), "B": ("B",), "C": ("C",)},
    "s4-ptd": {"dt": ("log_dt",), "A": ("A_re_log", "A_im"), "B": (), "C": ()},
}
S4_PLAIN: dict[str, tuple[str, ...]] = {"s4": ("D",), "s4d": ("D",), "s4-ptd": ("B", "C", "D")}


def s4_param_groups(model: str, lr_block: float | dict, ssm_lr: float) -> dict[str, str]:
    """The group of every ssmix S4 / S4D parameter under an S4 ``lr:`` block.

    S4's ``Kernel.register(name, tensor, lr, wd)`` gives a registered tensor its own
    learning rate (``None``: the optimiser's) and weight decay ``wd`` (0.0 from
    ``configs/model/layer/s4.yaml``); ``C`` is registered with ``wd=None`` (the optimiser's
    decay). A dict ``lr:`` sets the named keys (others ``None``); one number sets all, C too.
    ``P`` follows ``A``. ``D`` is a plain parameter (main lr, decayed).
    """
    groups: dict[str, str] = {}
    for key, names in S4_NAMES[model].items():
        rate = lr_block if not isinstance(lr_block, dict) else lr_block.get(key)
        if rate is not None and rate != ssm_lr:
            raise ValueError(f"the lr: block {lr_block!r} has more than one SSM learning rate")
        decayed = key == "C"
        if rate is not None:
            group = "ssm_decay" if decayed else "ssm"
        else:
            group = "default" if decayed else "no_decay"
        groups.update({name: group for name in names})
    groups.update({name: "default" for name in S4_PLAIN[model]})
    return groups


def _s4_block_lr(lr_block) -> float:
    rates = {v for v in (lr_block.values() if isinstance(lr_block, dict) else [lr_block])}
    rates.discard(None)
    if len(rates) != 1:
        raise ValueError(f"expected one SSM learning rate in {lr_block!r}")
    return rates.pop()


def _s4_settings(model: str, anchor: dict, repo: str, no_decay: list[str]) -> dict[str, Any]:
    ssm_lr = _s4_block_lr(anchor["lr_block"])
    mixer = {"d_state": anchor["d_state"], "bidirectional": True, "init": "legs",
             "dt_min": anchor["dt_min"], "dt_max": anchor["dt_max"]}  # fmt: skip
    if anchor["n_ssm"] != anchor["d_model"]:  # n_ssm = d_model is the layer default (None)
        mixer["n_ssm"] = anchor["n_ssm"]
    return dict(
        source=f"{repo} {anchor['file']}", seed=anchor["seed"], n_layers=anchor["n_layers"],
        d_model=anchor["d_model"], dropout=anchor["dropout"], prenorm=anchor["prenorm"],
        norm=anchor["norm"], norm_momentum=0.9, final_norm=True, activation="gelu",
        glu="full", pooling=anchor["pooling"], batch_size=anchor["batch"], epochs=anchor["epochs"],
        lr=anchor["lr"], ssm_lr=ssm_lr, weight_decay=anchor["wd"], no_decay=list(no_decay),
        param_groups=s4_param_groups(model, anchor["lr_block"], ssm_lr), warmup_ratio=0.0,
        warmup_steps=anchor["warmup"], warmup_epochs=0.0, schedule="cosine",
        schedule_steps=anchor["steps"], mixer=mixer,
    )  # fmt: skip


def s5_param_groups(opt_config: str, dt_global: bool) -> dict[str, str]:
    """S5's ``opt_config`` and ``dt_global`` as groups of the ssmix S5 layer's parameters
    (``dt_global``: ``log_step`` leaves the ``"ssm"`` list for the decayed main group)."""
    groups = dict(S5_OPT_CONFIGS[opt_config])
    groups["log_step"] = "default" if dt_global else "ssm"
    return groups


def _s5_settings(anchor: dict, repo: str) -> dict[str, Any]:
    mixer = {"d_state": anchor["ssm_size_base"], "blocks": anchor["blocks"],
             "bidirectional": anchor["bidirectional"], "C_init": anchor["C_init"],
             "clip_eigs": anchor["clip_eigs"], "conj_sym": anchor["conj_sym"],
             "dt_min": anchor["dt_min"], "dt_max": anchor["dt_max"]}  # fmt: skip
    if anchor["dt_global"]:  # S5(dt_global=True): log_step a plain parameter (same groups)
        mixer["dt_global"] = True
    return dict(
        source=f"{repo} {anchor['file']}", seed=anchor["jax_seed"], n_layers=anchor["n_layers"],
        d_model=anchor["d_model"], dropout=anchor["p_dropout"], prenorm=anchor["prenorm"],
        norm="batch" if anchor["batchnorm"] else "layer", norm_momentum=anchor["bn_momentum"],
        final_norm=False, activation="gelu", glu=_GLU[anchor["activation_fn"]],
        batch_size=anchor["bsz"], epochs=anchor["epochs"], ssm_lr=anchor["ssm_lr_base"],
        lr=anchor["lr_factor"] * anchor["ssm_lr_base"], weight_decay=anchor["weight_decay"],
        no_decay=[], param_groups=s5_param_groups(anchor["opt_config"], anchor["dt_global"]),
        warmup_ratio=0.0, warmup_steps=0, warmup_epochs=float(anchor["warmup_end"]),
        schedule="s5", schedule_steps=0, mixer=mixer,
    )  # fmt: skip


_S4_NO_DECAY = ["bias", "norm", "embedding"]  # configs/config.yaml optimizer_param_grouping

# Our choice where nothing is published (see module docstring).
_ATTENTION = dict(
    n_layers=4, d_model=256, norm="layer", prenorm=True, final_norm=True, glu="none",
    mlp_ratio=4.0, positional="sinusoidal", lr=1e-3, ssm_lr=1e-3, weight_decay=0.05,
    no_decay=list(_S4_NO_DECAY), param_groups={}, dropout=0.1, warmup_ratio=0.1,
    warmup_steps=0, warmup_epochs=0.0, schedule="cosine", schedule_steps=0, seed=0,
    source="ssmix's own choice (no published LRA configuration)", mixer={"num_heads": 8},
)  # fmt: skip

# Per-model layer arguments on top of the anchor's (the PTD models change the init; the
# S4 settings' state size and Δ range do not apply to Hydra, which keeps its own defaults).
MODEL_MIXER: dict[str, dict[str, Any]] = {
    "s4": {}, "s4d": {}, "s4-ptd": {"init": "ptd"}, "s5": {}, "s5-ptd": {"init": "ptd"},
    "hydra": {}, "attention": {},
}  # fmt: skip
MIXER_DROP: dict[str, tuple[str, ...]] = {
    "hydra": ("d_state", "bidirectional", "dt_min", "dt_max", "init", "n_ssm")
}

# The anchor table behind each (preset, model): task -> anchor values.
SOURCES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "published": {"s4": S4_V3, "s4d": S4_V3, "s4-ptd": S4_PTD, "s5": S5_RUNS,
                  "s5-ptd": S5_PTD_RUNS},
    "s4-2023": {"s4": S4_2023, "s4d": S4_2023},
}  # fmt: skip


def preset_settings(task: str, model: str, preset: str = "published") -> dict[str, Any]:
    """The Config fields a non-demo preset sets for ``task`` × ``model`` (with ``mixer``)."""
    _check("task", task, TASKS)
    _check("model", model, MODELS)
    if preset == "s4-2023" and model not in SOURCES["s4-2023"]:
        raise ValueError(
            f"preset 's4-2023' (state-spaces/s4's 2023 configs) covers the models "
            f"{', '.join(SOURCES['s4-2023'])}; got model {model!r}"
        )
    if model == "attention":
        settings = dict(_ATTENTION)
        s4 = S4_V3[task]
        settings.update(batch_size=s4["batch"], epochs=s4["epochs"])
        settings["mixer"] = dict(settings["mixer"])
        return settings
    if model == "hydra":
        settings = _s4_settings("s4d", S4_V3[task], S4_REPO, _S4_NO_DECAY)
        settings.update(
            param_groups={}, source=f"ssmix's own choice: the S4 settings of {settings['source']}"
        )
    elif model in ("s5", "s5-ptd"):
        anchor = SOURCES[preset][model][task]
        settings = _s5_settings(anchor, S5_REPO if model == "s5" else PTD_REPO)
    else:
        table = SOURCES[preset][model]
        repo, no_decay = (PTD_REPO, []) if model == "s4-ptd" else (S4_REPO, _S4_NO_DECAY)
        settings = _s4_settings(model, table[task], repo, no_decay)
    if task in ("pathfinder", "pathx") and (preset == "s4-2023" or model == "s4-ptd"):
        # These configs' dataset file sets ``center: False``: pixels in [0, 1], not [-1, 1]
        # (configs/dataset/pathfinder.yaml of state-spaces/s4 and of the PTD authors' S4-PTD).
        settings["pixel_norm"] = [0.0, 1.0]
    mixer = dict(settings["mixer"])
    mixer.update(MODEL_MIXER[model])
    for arg in MIXER_DROP.get(model, ()):
        mixer.pop(arg, None)
    settings["mixer"] = mixer
    return settings


# A CPU-sized model for the demo and quick runs: small, length-grouped batches. Calibrated
# on the generated ListOps set (500 < length < 2000, majority class ~18 %): S4D reaches ~37 %
# validation accuracy after 600 steps.
DEMO: dict[str, Any] = dict(
    n_layers=4, d_model=32, batch_size=16, epochs=1, lr=1e-2, ssm_lr=2e-3, weight_decay=0.05,
    warmup_ratio=0.1, warmup_steps=0, warmup_epochs=0.0, schedule="cosine", schedule_steps=0,
    seed=0, dropout=0.0, pad_multiple=512, length_grouping=20, log_every=25, eval_every=300,
    ckpt_every=300, eval_limit=500, eval_batch_size=32, mixer={"d_state": 32},
)  # fmt: skip
# Layer arguments the demo adds per family. Measured on the demo set: Δ initialised in
# [1e-4, 1e-2] (longer memory) gets S4D from the 18 % plateau to 37 % validation accuracy by
# step 600, against 27 % with the default [1e-3, 1e-1]; S5 gets the same range by analogy.
# The FFT convolution trains S4 / S4D about 2x faster than the chunked default at this shape
# on CPU (B = 16, H = 32, N = 32, L = 1024 and 2048, forward + backward).
DEMO_MIXER: dict[str, dict[str, Any]] = {
    "s4": {"mode": "fft", "dt_min": 1e-4, "dt_max": 1e-2},
    "s5": {"dt_min": 1e-4, "dt_max": 1e-2},
}
FAMILY = {
    "s4": "s4", "s4d": "s4", "s4-ptd": "s4", "s5": "s5", "s5-ptd": "s5",
    "hydra": "hydra", "attention": "attention",
}  # fmt: skip


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def parse_value(text: str, current: Any) -> Any:
    """Parse ``text`` for a field whose current value is ``current`` (bool, int, float, str,
    dict, list); ``mixer`` values and unknown types are read as JSON, falling back to a string.
    A text that does not fit the type raises ``ValueError`` saying what was expected."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false); got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer; got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number; got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if isinstance(current, (list, dict)):
            kind = "list" if isinstance(current, list) else "object"
            raise ValueError(f"expected a JSON {kind}; got {text!r}") from None
        return text
    if isinstance(current, list) and not isinstance(value, list):
        raise ValueError(f"expected a JSON list; got {text!r}")
    if isinstance(current, dict) and not isinstance(value, dict):
        raise ValueError(f"expected a JSON object; got {text!r}")
    return value


def unknown_key_message(key: str, known: Any) -> str:
    """``unknown config key 'lrate'; did you mean lr?`` (close matches by ``difflib``), or
    the list of known keys when nothing is close."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = "layer arguments are set as mixer.<arg>=value"
    if close:
        return f"unknown config key {key!r}; did you mean {' or '.join(close)}? ({hint})"
    return f"unknown config key {key!r} ({hint}); known: {', '.join(known)}"


def apply_overrides(values: dict[str, Any], overrides: list[str] | dict[str, Any]) -> None:
    """Apply ``key=value`` strings (or a dict) to config ``values`` in place.

    ``mixer.<arg>=value`` sets one layer argument; ``mixer.<arg>=null`` removes it.
    """
    items = overrides.items() if isinstance(overrides, dict) else _split_pairs(overrides)
    known = {f.name for f in dataclasses.fields(Config)}
    defaults = Config()
    for key, raw in items:
        if key.startswith("mixer."):
            arg = key[len("mixer.") :]
            value = parse_value(raw, None) if isinstance(raw, str) else raw
            mixer = dict(values.get("mixer", {}))
            if value is None:
                mixer.pop(arg, None)
            else:
                mixer[arg] = value
            values["mixer"] = mixer
            continue
        if key not in known:
            raise ValueError(unknown_key_message(key, known | {"mixer.<arg>"}))
        current = values.get(key, getattr(defaults, key))
        try:
            values[key] = parse_value(raw, current) if isinstance(raw, str) else raw
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None


def _split_pairs(pairs: list[str]):
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value; got {pair!r}")
        key, raw = pair.split("=", 1)
        yield key.strip(), raw.strip()


def make_config(
    task: str,
    model: str,
    preset: str = "published",
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """The config for ``task`` × ``model`` under ``preset`` with ``overrides`` applied.

    Raises ``ValueError`` naming the field for an unknown task / model / preset / key or an
    impossible value (zero batch size, ``log_every=0``, ...), before any data is loaded.
    """
    _check("task", task, TASKS)
    _check("model", model, MODELS)
    _check("preset", preset, PRESETS)
    values: dict[str, Any] = {"task": task, "model": model, "preset": preset}
    values.update(TASK_DEFAULTS[task])
    settings = preset_settings(task, model, "published" if preset == "demo" else preset)
    mixer = settings.pop("mixer")
    if preset == "demo":
        demo = dict(DEMO)
        # The demo shrinks layer arguments the model has (the state size), adds none.
        mixer.update({k: v for k, v in demo.pop("mixer").items() if k in mixer})
        mixer.update(DEMO_MIXER.get(FAMILY[model], {}))
        settings.update(demo)
        settings["source"] = f"demo (CPU-sized) over {settings['source']}"
    values.update(settings)
    values["mixer"] = mixer
    apply_overrides(values, overrides or [])
    return Config.from_dict(values)


# Fields a resumed run may change (``--resume`` with ``--set``): the run's length and the
# loop's bookkeeping. Everything else must equal the run's own ``config.json``.
RESUMABLE_FIELDS = (
    "max_steps", "epochs", "schedule_steps", "log_every", "progress", "ckpt_every",
    "keep_checkpoints", "max_nonfinite_steps",
)  # fmt: skip
# Where the run and its data live, not what it computes: may differ on resume.
LOCATION_FIELDS = ("data_dir", "out_dir", "run_name")


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The fields of ``cfg`` that differ from a run's saved config (``config.json``) other
    than :data:`RESUMABLE_FIELDS` and :data:`LOCATION_FIELDS`, in field order. A field the
    saved config lacks (written by an older version) counts as its default."""
    defaults = Config().to_dict()
    now = cfg.to_dict()
    skip = set(RESUMABLE_FIELDS) | set(LOCATION_FIELDS)
    return [
        k for k in now
        if k not in skip and saved.get(k, defaults[k]) != now[k]
    ]  # fmt: skip


def list_presets(
    tasks: tuple[str, ...] = TASKS, models: tuple[str, ...] = MODELS
) -> list[dict[str, str]]:
    """Every available ``(task, model, preset)`` with its ``source`` (the anchor file the
    values come from, or ``ssmix's own choice``), as dicts with those four keys."""
    rows = []
    for task in tasks:
        for model in models:
            for preset in PRESETS:
                if preset == "s4-2023" and model not in SOURCES["s4-2023"]:
                    continue
                source = make_config(task, model, preset).source
                rows.append({"task": task, "model": model, "preset": preset, "source": source})
    return rows
