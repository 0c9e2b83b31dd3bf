"""Train an ssmix model on an LRA task.

``python -m experiments.lra.train --task listops --model s4d [--preset demo] [--set k=v ...]
[--overwrite] [--distributed]``; ``python -m experiments.lra.train --resume runs/<run>
[--set max_steps=N]``; ``--print-config`` / ``--list-presets`` print and exit.

- One jit-compiled train step (forward, loss, gradients, grouped optimiser from
  :mod:`ssmix.optim`); the state is a pytree of pure arrays (parameters, BatchNorm statistics,
  optimiser state, step, running log sums), so it checkpoints and shards as a whole.
- Data parallel over every device: a 1-D mesh ``("data",)``, the batch sharded along it,
  the state replicated; XLA inserts the gradient all-reduce and computes BatchNorm statistics
  over the global batch. With ``--distributed`` (``jax.distributed.initialize()``, e.g. under
  SLURM) each process feeds its slice of the global batch.
- Precision and accumulation: ``precision="bfloat16"`` runs the model around the mixers in
  bfloat16: each step casts the float32 master parameters of the embedding / encoder, the
  norms, the output projections / GLU, the MLPs and the head to bfloat16 before the forward
  pass (gradients flow back to the float32 masters), so the activations between blocks are
  bfloat16. The mixer layers keep their float32 parameters (SSM parameters, complex ones
  stored as real pairs, and their own dense weights) and receive bfloat16 activations:
  what they compute in bfloat16 is the layer's own precision policy (``ssmix.layers``; the
  S4 family runs its recurrence in float32 whatever the input). Master parameters, the
  optimiser state, BatchNorm statistics, the softmax and the loss stay float32.
  ``grad_accum = k`` averages the gradients of ``k`` consecutive batches before one optimiser
  update (``optax.MultiSteps``): a step is one batch of ``batch_size``, the effective batch is
  ``batch_size × k``, and the learning-rate schedule (warmup, ``schedule_steps``) counts
  optimiser updates (steps / k).
- Exact resume: the batches of epoch e are a pure function of (seed, e) (optionally grouped
  by length, ``length_grouping``), dropout keys are
  ``fold_in(key(seed), step)``, and the log window sums live in the checkpointed state, so
  ``--resume`` replays the remaining steps and writes the same metrics as an uninterrupted
  run. ``--resume RUN_DIR`` reads the run's own ``config.json``; ``--set`` may change only
  :data:`~experiments.lra.configs.RESUMABLE_FIELDS` (the length: ``max_steps``, ``epochs``,
  ``schedule_steps``; and the loop's logging and checkpointing). A longer run continues
  the same learning-rate schedule: it keeps the original length (the run's first total, or
  its ``schedule_steps``), so past it the rate stays at the schedule's end value (0 for the
  cosine) unless ``--set schedule_steps=N`` stretches it (the rate then jumps to the new
  curve at the resumed step). Resuming a finished run at its own length reports it again
  and writes nothing.
- Checkpoints (orbax, written asynchronously: the arrays are copied to host memory, then
  written in the background while training goes on) every ``ckpt_every`` steps, at every
  evaluation, at the end and on Ctrl-C or SIGTERM (cluster preemption): the first signal stops
  after the current step, saves and waits for the write; a second one aborts.
- Reporting as the papers do: validation every ``eval_every`` steps (and at the last step),
  each evaluation step checkpointed with its validation metrics; orbax keeps the
  ``keep_checkpoints`` latest checkpoints plus the best-validation one. At the end the test
  split is evaluated at the best validation step and at the last step (``summary.json``).
- Safety: a run directory carries a marker file (:data:`RUN_MARKER`); ``--overwrite`` and
  ``--resume`` refuse any directory without it. A corrupted checkpoint is one clear
  :class:`CheckpointError` naming its step; ``--resume`` falls back to the newest intact one
  (moving the broken ones to ``corrupted_checkpoints/``). A step whose loss, gradients or
  updated parameters are not finite is skipped (its update is not applied); after
  ``max_nonfinite_steps`` consecutive such steps the run stops with
  :class:`NonFiniteLossError`, its checkpoints holding the last finite state. JSON files are
  written atomically (temporary file, then ``os.replace``).
- Paths: a relative ``out_dir`` / ``data_dir`` (and the default data folder ``data/``) is
  taken relative to the repository root when ssmix runs from a git checkout, else relative
  to the current directory (:func:`resolve_path`).
- Output in ``<out_dir>/<run>/``: ``.ssmix-run``, ``config.json``, ``checkpoints/<step>/``,
  ``metrics.jsonl`` (one JSON object per train log window / evaluation), ``summary.json``,
  ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.logs import program_name, setup_logging
from experiments.lra.configs import (
    MODELS,
    PRESETS,
    RESUMABLE_FIELDS,
    TASKS,
    Config,
    apply_overrides,
    config_changes,
    list_presets,
    make_config,
)
from experiments.lra.data import (
    REPO_ROOT,
    Ragged,
    Split,
    TaskData,
    default_path,
    epoch_batches,
    eval_batches,
    example_lengths,
    load_task,
)
from experiments.lra.data import make_batch as make_host_batch
from experiments.lra.models import build_model, build_optimizer, check_mixer_args
from ssmix.layers.base import SSMParam

logger = logging.getLogger("experiments.lra")

TIMING_KEYS = ("tokens_per_s", "elapsed_s")  # the metrics that vary between identical runs
RUN_MARKER = ".ssmix-run"  # written into every run directory at its creation
MAX_NONFINITE_STEPS = 10  # default when the config has no ``max_nonfinite_steps`` field
CORRUPTED_DIR = "corrupted_checkpoints"  # where --resume moves unreadable checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (corrupted or incomplete); names its step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class NonFiniteLossError(FloatingPointError):
    """Training stopped after too many consecutive non-finite steps."""


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and
    ``os.replace``: a reader (or a crash) sees the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _head(seqs: Ragged | None, limit: int) -> Ragged | None:
    if seqs is None:
        return None
    return Ragged(seqs.values[: seqs.offsets[limit]], seqs.offsets[: limit + 1])


def _subset(split: Split, limit: int) -> Split:
    """The first ``limit`` examples of ``split`` (all of them for ``limit == 0``)."""
    if not limit or limit >= len(split):
        return split
    return Split(_head(split.inputs, limit), split.labels[:limit], _head(split.inputs2, limit))


def in_checkout() -> bool:
    """Whether this package runs from a git checkout (``.git`` at the repository root)
    rather than from an installed copy."""
    return (REPO_ROOT / ".git").exists()


def resolve_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; a relative path is taken relative to the repository root
    inside a git checkout (so ``runs/`` and ``data/`` are the checkout's wherever the command
    runs), else relative to the current directory (an installed package)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return (REPO_ROOT if in_checkout() else Path.cwd()) / path


def data_path(cfg: Config, data_dir: str | None = None) -> Path:
    """The dataset folder of ``cfg``: ``data_dir``, ``cfg.data_dir`` or the task's default
    folder under ``data/`` (each resolved by :func:`resolve_path`)."""
    given = data_dir or cfg.data_dir
    if given:
        return resolve_path(given)
    return default_path(cfg.task, resolve_path("data"))


def load_data(cfg: Config, data_dir: str | None = None) -> TaskData:
    """Load ``cfg.task`` (from ``data_dir``, ``cfg.data_dir`` or the default folder) and apply
    ``train_limit`` / ``eval_limit``."""
    if cfg.task in ("listops", "text", "retrieval"):
        kwargs = {"max_len": cfg.max_len}
    else:
        kwargs = {"pixel_norm": tuple(cfg.pixel_norm)} if cfg.pixel_norm else {}
    path = data_path(cfg, data_dir)
    logger.info("loading the %s data from %s", cfg.task, path)
    start = time.perf_counter()
    data = load_task(cfg.task, path, **kwargs)
    logger.info(
        "loaded %d train, %d validation, %d test examples in %.1f s",
        len(data.train), len(data.val), len(data.test), time.perf_counter() - start,
    )  # fmt: skip
    return TaskData(
        data.task,
        _subset(data.train, cfg.train_limit),
        _subset(data.val, cfg.eval_limit),
        _subset(data.test, cfg.eval_limit),
        n_classes=data.n_classes,
        kind=data.kind,
        max_len=data.max_len,
        vocab_size=data.vocab_size,
        paired=data.paired,
        pixel_norm=data.pixel_norm,
    )


def run_dir(cfg: Config) -> Path:
    """``<out_dir>/<name>``; a relative ``out_dir`` is resolved by :func:`resolve_path`
    (the repository root inside a git checkout, else the current directory).

    The run name must be one plain directory name (no path separator, no ``..``, not
    absolute), and the run directory must resolve to a direct child of ``out_dir`` (a
    symbolic link pointing elsewhere is refused): ``--overwrite`` deletes only inside
    ``out_dir``."""
    name = cfg.name
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or ".." in name or name == "." or any(c in name for c in seps):
        raise ValueError(
            "run_name must be a plain directory name (no path separators, no '..', not "
            f"absolute); got {name!r}"
        )
    out = resolve_path(cfg.out_dir)
    path = out / name
    if path.resolve().parent != out.resolve():
        raise ValueError(
            f"run directory {path} resolves to {path.resolve()}, outside out_dir {out.resolve()}"
        )
    return path


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is an ssmix run directory (it holds the :data:`RUN_MARKER` file)."""
    return (Path(path) / RUN_MARKER).is_file()


def _in_mixer(path) -> bool:
    """Whether a parameter path lies inside a block's mixer layer (an attribute ``mixer``)."""
    return any(getattr(k, "key", getattr(k, "name", None)) == "mixer" for k in path)


def _zero_window() -> dict[str, jax.Array]:
    # Separate buffers per entry: the train step donates the state, and one buffer may not
    # be donated twice.
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count", "tokens")}


class Experiment:
    """Model, optimiser, sharding and the jitted steps for one config and dataset.

    ``state`` is a dict of pure arrays: ``params``, ``rest`` (non-parameter variables such as
    BatchNorm statistics), ``opt`` (optax state), ``step``, ``acc`` (running sums of the
    current log window: loss, correct, count, tokens) and ``nonfinite`` (int32 counters of
    skipped steps: ``run``, the current run of consecutive ones; ``peak``, the longest run so
    far; ``total``; ``last``, the 1-based step of the last one).
    """

    def __init__(self, cfg: Config, data: TaskData, *, devices=None):
        self.cfg = cfg
        self.data = data
        self.devices = list(devices) if devices is not None else jax.devices()
        n_dev = len(self.devices)
        if cfg.batch_size < 1 or cfg.eval_batch_size < 0:
            raise ValueError(
                f"batch_size must be >= 1 and eval_batch_size >= 0; got {cfg.batch_size} "
                f"and {cfg.eval_batch_size}"
            )
        if cfg.batch_size % n_dev:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by {n_dev} devices")
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        if self.eval_batch_size % n_dev:
            raise ValueError(
                f"eval_batch_size {self.eval_batch_size} must be divisible by {n_dev} devices"
            )
        self.steps_per_epoch = len(data.train) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training split has {len(data.train)} examples, fewer than one batch "
                f"of {cfg.batch_size}"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.grad_accum = int(getattr(cfg, "grad_accum", 1))
        self.compute_dtype = jnp.dtype(getattr(cfg, "precision", "float32"))
        self._train_lengths = example_lengths(data.train)
        self._epoch_batches: tuple[int, np.ndarray | None] = (-1, None)

        model = build_model(cfg, data, rngs=nnx.Rngs(cfg.seed))
        self.n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        # The schedule counts optimiser updates: one per grad_accum steps.
        k = self.grad_accum
        tx, self.lr_schedule, self.warmup_steps = build_optimizer(
            cfg, model, steps_per_epoch=max(self.steps_per_epoch // k, 1),
            total_steps=max(self.total_steps // k, 1),
        )  # fmt: skip
        self.tx = (
            tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
        )
        if self.total_steps % k:
            logger.warning(
                "grad_accum=%d does not divide the run's %d steps: the last %d batches are "
                "accumulated but never applied", k, self.total_steps, self.total_steps % k,
            )  # fmt: skip
        model.train()
        self.graph_train, params, rest = nnx.split(model, nnx.Param, ...)
        # Parameters cast to the compute dtype in each step: the model's own floating ones,
        # outside the mixer layers (those keep their float32 parameters, complex ones stored
        # as real pairs included, and follow their input's dtype).
        self._cast = jax.tree_util.tree_map_with_path(
            lambda path, v: not _in_mixer(path) and not isinstance(v, SSMParam)
            and jnp.issubdtype(v.dtype, jnp.floating),
            params, is_leaf=lambda v: isinstance(v, nnx.Variable),
        )  # fmt: skip
        model.eval()
        self.graph_eval = nnx.split(model, nnx.Param, ...)[0]
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        self._cast = nnx.as_pure(self._cast)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt": self.tx.init(params),
            "acc": _zero_window(),
            "nonfinite": {k: jnp.zeros((), jnp.int32) for k in ("run", "peak", "total", "last")},
        }
        # Auto axes: XLA propagates the batch sharding through the model (explicit-mode
        # sharding would ask every gather, e.g. the embedding lookup, for an out_sharding).
        self.mesh = jax.make_mesh(
            (n_dev,), ("data",), axis_types=(AxisType.Auto,), devices=self.devices
        )
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.state_sharding = jax.tree.map(lambda _: self.replicated, state)
        self.state = jax.device_put(state, self.state_sharding)
        self.base_key = jax.random.key(cfg.seed)
        self._train_step = jax.jit(
            self._train_step_fn,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=self.state_sharding,
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            self._eval_step_fn,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=self.replicated,
        )

    # ------------------------------------------------------------------ pure functions

    def lr_at(self, step: int) -> float:
        """The main group's learning rate of the last optimiser update within the first
        ``step`` steps (that of the first update before any)."""
        return float(self.lr_schedule(max(step // self.grad_accum - 1, 0)))

    def _compute_params(self, params):
        """``params`` as the forward pass uses them: with ``precision="bfloat16"`` the
        floating parameters outside the mixer layers cast to bfloat16 (a differentiable
        cast: the gradients reach the float32 masters)."""
        if self.compute_dtype == jnp.float32:
            return params
        return jax.tree.map(
            lambda p, cast: p.astype(self.compute_dtype) if cast else p, params, self._cast
        )

    def _forward(self, graph, params, rest, batch, rngs):
        model = nnx.merge(graph, self._compute_params(params), rest)
        if self.data.paired:
            logits = model(batch["x"], batch["x2"], batch["mask"], batch["mask2"], rngs=rngs)
        else:
            logits = model(batch["x"], batch["mask"], rngs=rngs)
        new_rest = nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])
        return logits.astype(jnp.float32), new_rest

    @staticmethod
    def _scores(logits, batch):
        weight = batch["weight"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        hit = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
        return jnp.sum(weight * ce), jnp.sum(weight * hit), jnp.sum(weight)

    def _train_step_fn(self, state, batch):
        key = jax.random.fold_in(self.base_key, state["step"])

        def loss_fn(params):
            rngs = nnx.Rngs(dropout=key)  # created inside the traced function it mutates
            logits, new_rest = self._forward(self.graph_train, params, state["rest"], batch, rngs)
            loss_sum, correct, count = self._scores(logits, batch)
            return loss_sum / count, (new_rest, loss_sum, correct, count)

        grads, (new_rest, loss_sum, correct, count) = jax.grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        tokens = jnp.sum(batch["mask"]).astype(jnp.float32)
        if self.data.paired:
            tokens = tokens + jnp.sum(batch["mask2"]).astype(jnp.float32)
        # A step whose loss, gradients or new parameters / statistics are not finite is
        # skipped: the state keeps its previous values (so no checkpoint ever holds NaN), and
        # the host stops the run after too many consecutive skips (``nonfinite``).
        ok = jnp.isfinite(loss_sum)
        for leaf in jax.tree.leaves((grads, params, new_rest)):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                ok = ok & jnp.all(jnp.isfinite(leaf))

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        acc, bad = state["acc"], state["nonfinite"]
        run = jnp.where(ok, 0, bad["run"] + 1)
        zero = jnp.zeros((), jnp.float32)
        return {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "rest": keep(new_rest, state["rest"]),
            "opt": keep(opt, state["opt"]),
            "acc": {
                "loss": acc["loss"] + jnp.where(ok, loss_sum, zero),
                "correct": acc["correct"] + jnp.where(ok, correct, zero),
                "count": acc["count"] + jnp.where(ok, count, zero),
                "tokens": acc["tokens"] + jnp.where(ok, tokens, zero),
            },
            "nonfinite": {
                "run": run,
                "peak": jnp.maximum(bad["peak"], run),
                "total": bad["total"] + jnp.where(ok, 0, 1),
                "last": jnp.where(ok, bad["last"], state["step"] + 1),
            },
        }

    def _eval_step_fn(self, state, batch):
        logits, _ = self._forward(self.graph_eval, state["params"], state["rest"], batch, None)
        return self._scores(logits, batch)

    # --------------------------------------------------------------------- host side

    def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Place a global host batch on the mesh; each process contributes its own rows."""
        n_proc, proc = jax.process_count(), jax.process_index()
        out = {}
        for name, value in host_batch.items():
            rows = len(value) // n_proc
            local = value[proc * rows : (proc + 1) * rows]
            out[name] = jax.make_array_from_process_local_data(
                self.batch_sharding, local, value.shape
            )
        return out

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """The host batch of global step ``step``: batch ``step % steps_per_epoch`` of epoch
        ``step // steps_per_epoch`` (a pure function of the seed and the step)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_batches[0] != epoch:
            batches = epoch_batches(
                self._train_lengths, self.cfg.batch_size, self.cfg.seed, epoch,
                length_grouping=self.cfg.length_grouping,
            )  # fmt: skip
            self._epoch_batches = (epoch, batches)
        idx = self._epoch_batches[1][index]
        return make_host_batch(self.data, self.data.train, idx, pad_multiple=self.cfg.pad_multiple)

    def train_step(self, step: int | None = None) -> None:
        """Run one training step on the batch of the current (or given) step."""
        step = int(self.state["step"]) if step is None else step
        self.state = self._train_step(self.state, self.device_batch(self.train_batch(step)))

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and accuracy over every example of ``split`` (``val`` or ``test``)."""
        loss = correct = count = 0.0
        for batch in eval_batches(
            self.data,
            self.data.split(split),
            self.eval_batch_size,
            pad_multiple=self.cfg.pad_multiple,
        ):
            scores = jax.device_get(self._eval_step(self.state, self.device_batch(batch)))
            loss, correct, count = (
                loss + float(scores[0]),
                correct + float(scores[1]),
                count + float(scores[2]),
            )
        return {"loss": loss / count, "accuracy": correct / count, "count": int(count)}

    def take_window(self) -> dict[str, float | None]:
        """Read and reset the running train sums: loss, accuracy and tokens of the window's
        finite steps (``None`` loss / accuracy when every step of it was skipped), and
        ``nonfinite_steps``, the number of skipped steps since the start of training."""
        acc, bad = jax.device_get((self.state["acc"], self.state["nonfinite"]))
        self.state = {**self.state, "acc": jax.device_put(_zero_window(), self.replicated)}
        count = float(acc["count"])
        return {
            "loss": float(acc["loss"]) / count if count else None,
            "accuracy": float(acc["correct"]) / count if count else None,
            "tokens": float(acc["tokens"]),
            "nonfinite_steps": int(bad["total"]),
        }


# -------------------------------------------------------------------------- checkpoints


def _val_accuracy(metrics: dict) -> float:
    return float(metrics["val_accuracy"])


def _not_untracked_warning(record: logging.LogRecord) -> bool:
    # orbax warns at every save without metrics when a best_fn is set; periodic and
    # interrupt checkpoints have none by design.
    return "did not provide metrics" not in str(record.msg)


logging.getLogger("absl").addFilter(_not_untracked_warning)


def checkpoint_manager(
    path: Path, keep: int, *, create: bool = True, async_save: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager under ``path`` keeping the ``keep`` latest steps and the best one by
    validation accuracy (a ``LatestN`` + ``BestN`` preservation policy).

    ``async_save``: :meth:`save` copies the arrays to host memory and returns, the files are
    written by a background thread (the training loop uses it; call
    ``mgr.wait_until_finished()`` before reading a just-saved step, ``mgr.close()`` waits).

    Checkpoints saved with metrics (``{"val_accuracy", "val_loss", "val_count"}``, at the
    evaluation steps) compete for best; ``mgr.best_step()`` is the highest validation
    accuracy, the latest of equal ones. Checkpoints without metrics (periodic, interrupt)
    are kept only while they are among the latest.
    """
    keep = max(int(keep), 1)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=_val_accuracy, reverse=False, n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )  # fmt: skip
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=async_save, best_fn=_val_accuracy,
        best_mode="max", preservation_policy=policy,
    )  # fmt: skip
    try:
        return ocp.CheckpointManager(path.resolve(), options=options)
    except Exception as e:  # orbax reads every step's metrics while listing the steps
        broken = _unreadable_metrics(path)
        raise CheckpointError(
            f"cannot list the checkpoints in {path} ({_first_line(e)}): "
            + (
                f"the metrics of checkpoint step(s) {broken} are corrupted"
                if broken
                else "a checkpoint there is probably corrupted"
            ),
            broken[0] if broken else None,
        ) from e


def _unreadable_metrics(path: Path) -> list[int]:
    """Steps under ``path`` whose orbax metrics file is not valid JSON."""
    broken = []
    for step_dir in sorted(path.glob("*/metrics/metrics")):
        try:
            json.loads(step_dir.read_text())
        except (OSError, ValueError):
            name = step_dir.parent.parent.name
            if name.isdigit():
                broken.append(int(name))
    return sorted(broken)


def _move_broken(out: Path, ckpt_dir: Path, steps: list[int]) -> None:
    """Move unreadable checkpoint steps to ``out / CORRUPTED_DIR`` (process 0)."""
    if jax.process_index() == 0:
        dest = out / CORRUPTED_DIR
        dest.mkdir(exist_ok=True)
        for bad in steps:
            target = dest / str(bad)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(ckpt_dir / str(bad)), str(target))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ssmix-lra-corrupted")


class _QuietClosedLoop:
    """During a failed orbax restore, tensorstore callbacks still post to orbax's closed
    event loop and each prints a ``RuntimeError: Event loop is closed`` traceback (through
    ``sys.unraisablehook``; 25+ of them), and asyncio logs "Future exception was never
    retrieved" for the abandoned reads. Installed once, before the first restore: drops
    exactly those two and passes everything else on."""

    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls.installed = True
        previous = sys.unraisablehook

        def hook(unraisable):
            exc = unraisable.exc_value
            if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
                return
            previous(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(
            lambda record: not str(record.msg).startswith("Future exception was never retrieved")
        )


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:limit] + ' ...' if len(line) > limit else line}"


def save_checkpoint(
    mgr: ocp.CheckpointManager, exp: Experiment, metrics: dict | None = None, *, wait: bool = True
) -> int:
    """Save ``exp.state`` (and the config) at its current step, with the validation
    ``metrics`` of that step if given; returns the step. With an asynchronous manager and
    ``wait=False`` the files are written in the background (the arrays are on the host
    when this returns, so the next train step may reuse their device buffers)."""
    step = int(jax.device_get(exp.state["step"]))
    mgr.wait_until_finished()  # a step still being written is not listed as saved yet
    if step in mgr.all_steps():
        return step
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(exp.state),
            config=ocp.args.JsonSave(exp.cfg.to_dict()),
        ),
        metrics=metrics,
        force=True,
    )
    if wait:
        mgr.wait_until_finished()
    return step


def restore_checkpoint(mgr: ocp.CheckpointManager, exp: Experiment, step: int | None = None):
    """Replace ``exp.state`` by checkpoint ``step`` (default: the latest); returns the step.

    Raises :class:`CheckpointError` naming the step when it cannot be read (``exp.state``
    is then unchanged), ``FileNotFoundError`` when there is no such checkpoint."""
    mgr.wait_until_finished()
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    if step not in mgr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {mgr.directory}; "
            f"available: {sorted(mgr.all_steps())}"
        )
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        exp.state,
        exp.state_sharding,
    )
    _QuietClosedLoop.install()
    try:
        restored = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        state = restored.state
        jax.block_until_ready(state)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint step {step} in {mgr.directory} cannot be read: it is corrupted or "
            f"does not match this model ({_first_line(e)}); other steps: "
            f"{sorted(s for s in mgr.all_steps() if s != step)}",
            step,
        ) from e
    exp.state = state
    return step


def restore_latest_intact(mgr: ocp.CheckpointManager, exp: Experiment, out: Path) -> int:
    """Restore the newest checkpoint that reads; the unreadable newer ones are moved to
    ``out / CORRUPTED_DIR`` (so the resumed run can save those steps again) and the fallback
    is logged. Raises :class:`CheckpointError` when no checkpoint reads."""
    broken = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            restored = restore_checkpoint(mgr, exp, step)
        except CheckpointError as e:
            logger.warning("%s", e)
            broken.append(step)
            continue
        if broken:
            _move_broken(out, Path(mgr.directory), broken)
            mgr.reload()
            logger.warning(
                "checkpoint(s) %s unreadable: fell back to step %d (moved the broken ones to %s)",
                broken, restored, out / CORRUPTED_DIR,
            )  # fmt: skip
        return restored
    raise CheckpointError(f"no intact checkpoint in {mgr.directory}: steps {broken} all fail")


# ------------------------------------------------------------------------------ metrics


class MetricsLog:
    """Append-only JSONL metrics (written by process 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` and every test row (test rows are written at the
        end of a run only): an interrupted run may have logged past its last checkpoint, and
        the resumed run writes them again. Rewritten atomically; a half-written last line
        is dropped."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["step"] <= step and r["split"] != "test"]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        """Append one row."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl``. A half-written last line (a crash during an append)
    is ignored with a warning; an unreadable line elsewhere is a ``ValueError`` naming it."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a half-written last line %d", path, i + 1)
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON object ({e})") from e
    return rows


def plot_curves(metrics_path: Path, out: Path, title: str) -> None:
    """Learning curves (train loss; train and validation accuracy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
    ax_acc.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-", label="val")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


class _StopFlag:
    """First SIGINT or SIGTERM: ask the loop to stop after the current step (it then saves a
    checkpoint); a second one aborts at once. Handlers are installed from the main thread
    only and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s: stopping after the current step to save a checkpoint (send it again to "
            "abort without saving)", self.signal_name,
        )  # fmt: skip

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _nonfinite_limit(cfg: Config, max_nonfinite: int | None) -> int:
    if max_nonfinite is not None:
        return int(max_nonfinite)
    return int(getattr(cfg, "max_nonfinite_steps", MAX_NONFINITE_STEPS))


def _check_finite(exp: Experiment, limit: int) -> None:
    """Raise :class:`NonFiniteLossError` once ``limit`` consecutive steps were non-finite
    (``limit <= 0``: never)."""
    if limit <= 0:
        return
    bad = {k: int(v) for k, v in jax.device_get(exp.state["nonfinite"]).items()}
    if bad["peak"] >= limit:
        raise NonFiniteLossError(
            f"training stopped: {bad['peak']} consecutive steps had a non-finite loss, gradient "
            f"or parameter update (limit: max_nonfinite_steps = {limit}; {bad['total']} such "
            f"steps in all, the last at step {bad['last']}). Their updates were not applied "
            "and the saved checkpoints hold finite parameters; lower the learning rate or "
            "check the data."
        )


def _clear_run(out: Path, remove_dir: bool) -> None:
    """Undo a failed start: remove the run directory this call created, or empty the
    (previously empty) directory it wrote into."""
    if remove_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _val_metrics(val: dict) -> dict:
    return {"val_accuracy": val["accuracy"], "val_loss": val["loss"], "val_count": val["count"]}


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: TaskData | None = None,
    on_step: Callable[[int], None] | None = None,
    max_nonfinite: int | None = None,
) -> dict:
    """Train ``cfg``; returns the run summary, also written to ``summary.json``.

    The summary of a finished run (``status == "done"``) holds ``best`` (the step with the
    highest validation accuracy, its ``val`` and ``test`` metrics: what the papers report)
    and ``final`` (the last step's ``val`` and ``test``), each ``{loss, accuracy, count}``;
    also ``step``, ``nonfinite_steps``, ``task``, ``model``, ``preset``, ``seed``,
    ``run_dir``, and (returned only) ``val`` / ``test``, the same as ``final``'s.
    An interrupted run (SIGINT or SIGTERM) returns ``{"status": "interrupted", "step",
    "run_dir", "signal"}``.

    ``resume`` continues from the newest intact checkpoint of the run directory; ``cfg`` must
    equal the run's ``config.json`` except for
    :data:`~experiments.lra.configs.RESUMABLE_FIELDS` and the location fields (a
    ``ValueError`` naming the changed fields otherwise). A longer run keeps the original
    schedule length (``schedule_steps`` is pinned to the first total unless set); a
    finished run resumed at its own length returns its saved summary and writes nothing.
    ``overwrite`` deletes an existing run directory first (without either, an existing run
    is an error). Both refuse a directory that is not an ssmix run (no :data:`RUN_MARKER`).
    ``on_step(step)`` is called after every completed step (tests use it to interrupt).
    ``max_nonfinite`` (default: the config's ``max_nonfinite_steps`` if it has one, else
    :data:`MAX_NONFINITE_STEPS`; ``<= 0``: no limit) consecutive non-finite steps stop the
    run with :class:`NonFiniteLossError`; the check runs at every log, evaluation and
    checkpoint step. A run that fails before its first checkpoint leaves no directory.
    """
    out = run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    lead = jax.process_index() == 0
    limit = _nonfinite_limit(cfg, max_nonfinite)
    existed = out.exists()
    if existed and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    occupied = existed and any(out.iterdir())
    if occupied and not is_run_dir(out):
        raise FileExistsError(
            f"{out} is not empty and is not an ssmix run directory (it has no {RUN_MARKER} "
            "file): --resume will not write into it and --overwrite will not delete it; "
            "choose another run_name or out_dir (for a run made before ssmix wrote the marker, "
            f"create an empty {RUN_MARKER} file in it)"
        )
    if occupied and not resume and not overwrite:
        raise FileExistsError(
            f"run directory {out} exists: pass --resume to continue it, --overwrite to "
            "start again, or --set run_name=<new name>"
        )
    # Everything that can fail on the config or the data fails before a file is touched.
    saved = None
    if occupied and resume and (out / "config.json").exists():
        saved = _read_config(out)
        changed = config_changes(saved, cfg)
        if changed:
            raise ValueError(
                f"--resume with a different config than {out / 'config.json'}; changed: "
                f"{', '.join(changed)} (a resumed run may change only "
                f"{', '.join(RESUMABLE_FIELDS)})"
            )
    check_mixer_args(cfg)
    data = data if data is not None else load_data(cfg)
    if saved is not None:
        cfg = _continued_config(saved, cfg, len(data.train))
    logger.info("building the %s model and its optimiser", cfg.model)
    exp = Experiment(cfg, data)

    continuing = resume and occupied  # an existing run: never removed on failure
    cleanup = not continuing
    mgr = None
    try:
        if occupied and not resume:
            if lead:
                shutil.rmtree(out)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("ssmix-lra-overwrite")
        out.mkdir(parents=True, exist_ok=True)
        if lead and not is_run_dir(out):
            write_atomic(out / RUN_MARKER, "ssmix LRA run directory (experiments.lra.train)\n")
        mgr = _open_manager(cfg, out, ckpt_dir, continuing)
        metrics = MetricsLog(out / "metrics.jsonl", lead)
        start = 0
        if continuing and mgr.all_steps():
            start = restore_latest_intact(mgr, exp, out)
            finished = _finished_summary(out, exp.total_steps, start)
            if finished is not None:
                logger.info(
                    "%s already finished at step %d: nothing to do (--set max_steps=N with a "
                    "larger N extends it)", out, finished["step"],
                )  # fmt: skip
                return finished
            if start > exp.total_steps:
                raise ValueError(
                    f"the run is at step {start}, beyond the {exp.total_steps} steps of "
                    "this config: max_steps / epochs can extend a run, not shorten it past "
                    "its last checkpoint"
                )
            metrics.truncate_after(start)
            if lead:
                if cfg.to_dict() != saved:
                    write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
                (out / "summary.json").unlink(missing_ok=True)
            logger.info("resumed %s at step %d of %d", out, start, exp.total_steps)
        elif lead:
            write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            for stale in (metrics.path, out / "summary.json"):
                stale.unlink(missing_ok=True)
        summary = _loop(cfg, exp, mgr, metrics, out, start, limit, on_step)
    except BaseException:
        if mgr is not None:
            mgr.wait_until_finished()
        if cleanup and lead and out.exists() and not (mgr is not None and mgr.all_steps()):
            _clear_run(out, remove_dir=not existed or (occupied and not resume))
        raise
    finally:
        if mgr is not None:
            mgr.close()
    if summary["status"] == "done" and lead:
        on_disk = {k: v for k, v in summary.items() if k not in ("val", "test")}
        write_atomic(
            out / "summary.json", json.dumps({**on_disk, "run_dir": str(out)}, indent=2) + "\n"
        )
        plot_curves(metrics.path, out / "curves.png", f"{cfg.task} / {cfg.model} ({cfg.preset})")
    return summary


def _continued_config(saved: dict, cfg: Config, n_train: int) -> Config:
    """``cfg`` for continuing a run saved with config ``saved``: when the run's length
    changes and neither config sets ``schedule_steps``, the schedule keeps the original
    length (pinned in ``schedule_steps``, in optimiser updates); a ``schedule_steps`` the
    saved config pinned stays unless ``cfg`` sets another."""
    if cfg.schedule_steps or n_train < cfg.batch_size:
        return cfg
    if saved.get("schedule_steps"):
        return Config.from_dict({**cfg.to_dict(), "schedule_steps": saved["schedule_steps"]})
    per_epoch = n_train // cfg.batch_size
    old_total = saved.get("max_steps") or saved.get("epochs", cfg.epochs) * per_epoch
    new_total = cfg.max_steps or cfg.epochs * per_epoch
    if new_total == old_total:
        return cfg
    updates = max(old_total // max(cfg.grad_accum, 1), 1)
    logger.info(
        "the run's length changes from %d to %d steps; the learning-rate schedule keeps its "
        "length of %d updates (schedule_steps; --set schedule_steps=N to stretch it)",
        old_total, new_total, updates,
    )  # fmt: skip
    return Config.from_dict({**cfg.to_dict(), "schedule_steps": updates})


def _finished_summary(out: Path, total: int, latest: int | None) -> dict | None:
    """The saved summary of a run that finished at ``total`` steps (its latest intact
    checkpoint is that step), with the returned-only ``val`` / ``test`` keys; else ``None``."""
    path = out / "summary.json"
    if latest != total or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("status") != "done" or summary.get("step") != total:
        return None
    final = summary.get("final", {})
    return {**summary, "run_dir": out, "val": final.get("val"), "test": final.get("test")}


def _open_manager(cfg: Config, out: Path, ckpt_dir: Path, resuming: bool):
    """The run's checkpoint manager; when resuming, steps whose metrics cannot be read are
    moved to ``CORRUPTED_DIR`` first (said in the log)."""
    try:
        return checkpoint_manager(ckpt_dir, cfg.keep_checkpoints)
    except CheckpointError:
        broken = _unreadable_metrics(ckpt_dir)
        if not (resuming and broken):
            raise
    logger.warning(
        "checkpoint step(s) %s have unreadable metrics: moved to %s", broken, out / CORRUPTED_DIR
    )
    _move_broken(out, ckpt_dir, broken)
    return checkpoint_manager(ckpt_dir, cfg.keep_checkpoints)


def _read_config(out: Path) -> dict:
    path = out / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({_first_line(e)}): cannot resume this run") from e


def _loop(cfg, exp, mgr, metrics, out, start, limit, on_step) -> dict:
    """The training loop of :func:`train` from step ``start``, then the final reporting (log
    lines go through tqdm while its progress bar is shown)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if cfg.progress and metrics.enabled:
        with logging_redirect_tqdm(loggers=[logging.getLogger("experiments")]):
            return _run_loop(cfg, exp, mgr, metrics, out, start, limit, on_step)
    return _run_loop(cfg, exp, mgr, metrics, out, start, limit, on_step)


def _run_loop(cfg, exp, mgr, metrics, out, start, limit, on_step) -> dict:
    lead = metrics.enabled
    total = exp.total_steps
    logger.info(
        "%s: %d parameters, %d train examples, %d steps (%d per epoch) on %d device(s)",
        cfg.name, exp.n_params, len(exp.data.train), total, exp.steps_per_epoch,
        len(exp.devices),
    )  # fmt: skip
    if exp.grad_accum > 1 or exp.compute_dtype != jnp.float32:
        logger.info(
            "%d batches of %d per optimiser update (effective batch %d); compute dtype %s",
            exp.grad_accum, cfg.batch_size, cfg.batch_size * exp.grad_accum,
            exp.compute_dtype.name,
        )  # fmt: skip

    from tqdm.auto import tqdm

    show_bar = bool(cfg.progress and lead)
    bar = tqdm(
        total=total, initial=start, disable=not show_bar,
        desc=cfg.name, unit="step", dynamic_ncols=True,
    )  # fmt: skip
    status = "done"
    step = start
    final_val = None
    window_start = time.perf_counter()
    evaluated = False
    stop = _StopFlag()
    try:
        with stop:
            while step < total:
                if stop.requested:
                    status = "interrupted"
                    break
                first = step == start
                if first:
                    logger.info("compiling the train step (the first step includes it)")
                    compile_start = time.perf_counter()
                exp.train_step(step)
                if first:
                    jax.block_until_ready(exp.state["step"])
                    logger.info("first step done in %.1f s", time.perf_counter() - compile_start)
                step += 1
                bar.update(1)
                last = step == total
                log_now = (cfg.log_every > 0 and step % cfg.log_every == 0) or last
                eval_now = step % exp.eval_every == 0 or last
                save_now = eval_now or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
                if log_now or save_now:  # one host sync per boundary step, not one each
                    _check_finite(exp, limit)
                if log_now:
                    window = exp.take_window()
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    window_start = time.perf_counter()
                    row = {
                        "step": step,
                        "epoch": step / exp.steps_per_epoch,
                        "split": "train",
                        "loss": window["loss"],
                        "accuracy": window["accuracy"],
                        "lr": exp.lr_at(step),  # of the last optimiser update
                        "nonfinite_steps": window["nonfinite_steps"],
                        "tokens_per_s": window["tokens"] / elapsed,
                        "elapsed_s": elapsed,
                    }
                    metrics.write(row)
                    if row["loss"] is not None and not show_bar:
                        logger.info(
                            "step %d/%d: loss %.4f, accuracy %.4f, %.3g tokens/s",
                            step, total, row["loss"], row["accuracy"], row["tokens_per_s"],
                        )  # fmt: skip
                    if row["loss"] is not None:
                        bar.set_postfix(
                            loss=f"{row['loss']:.3f}",
                            acc=f"{row['accuracy']:.3f}",
                            tok_s=f"{row['tokens_per_s']:.3g}",
                        )
                val = None
                if eval_now:
                    val = _timed_evaluate(exp, "val", first=not evaluated)
                    evaluated = True
                    metrics.write({"step": step, "split": "val", **val})
                    final_val = val if last else None
                    window_start = time.perf_counter()
                if save_now:
                    save_checkpoint(
                        mgr, exp, _val_metrics(val) if val is not None else None, wait=False
                    )
                    window_start = time.perf_counter()
                if on_step is not None:
                    on_step(step)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        bar.close()
    state_alive = not any(
        getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(exp.state)
    )
    how = stop.signal_name or "SIGINT"
    if status == "interrupted":
        mgr.wait_until_finished()
        if state_alive:
            _check_finite(exp, limit)
            saved = save_checkpoint(mgr, exp)  # waits until the files are written
            logger.warning("interrupted (%s): saved step %d to %s", how, saved, out)
        else:
            logger.warning("interrupted (%s): the last checkpoint in %s is kept", how, out)
        return {
            "status": status,
            "step": int(jax.device_get(exp.state["step"])),
            "run_dir": out,
            "signal": how,
        }
    if final_val is None:  # resumed at the end: the last step's evaluation is in its checkpoint
        final_val = _timed_evaluate(exp, "val", first=True)
        save_checkpoint(mgr, exp, _val_metrics(final_val))
    final_test = _timed_evaluate(exp, "test", first=False)
    metrics.write({"step": total, "split": "test", **final_test})
    mgr.wait_until_finished()
    best_step = mgr.best_step()
    best_val, best_test = final_val, final_test
    if best_step is not None and best_step != total:
        best = mgr.metrics(best_step)
        best_val = {
            "loss": best["val_loss"], "accuracy": best["val_accuracy"], "count": best["val_count"]
        }  # fmt: skip
        restore_checkpoint(mgr, exp, best_step)
        logger.info(
            "best validation accuracy at step %d: evaluating the test split there", best_step
        )
        best_test = _timed_evaluate(exp, "test", first=False)
        metrics.write({"step": best_step, "split": "test", "checkpoint": "best", **best_test})
    else:
        best_step = total
    return {
        "status": status,
        "step": total,
        "task": cfg.task,
        "model": cfg.model,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "best": {"step": best_step, "val": best_val, "test": best_test},
        "final": {"step": total, "val": final_val, "test": final_test},
        "nonfinite_steps": int(jax.device_get(exp.state["nonfinite"]["total"])),
        "run_dir": out,
        # The last step's metrics under their old names, for existing callers (not in
        # summary.json).
        "val": final_val,
        "test": final_test,
    }


def _timed_evaluate(exp: Experiment, split: str, *, first: bool) -> dict:
    """``exp.evaluate(split)`` with a line before (the first evaluation compiles) and a line
    after it (loss, accuracy, examples and time)."""
    count = len(exp.data.split(split))
    if first:
        logger.info("compiling the evaluation step and evaluating %d %s examples", count, split)
    start = time.perf_counter()
    result = exp.evaluate(split)
    step = int(jax.device_get(exp.state["step"]))
    logger.info(
        "step %d: %s loss %.4f, accuracy %.4f (%d examples, %.1f s)",
        step, split, result["loss"], result["accuracy"], result["count"],
        time.perf_counter() - start,
    )  # fmt: skip
    return result


PATHS_HELP = (
    "A relative out_dir / data_dir (and the default data folder data/) is taken relative to "
    "the repository root when ssmix runs from a git checkout, else relative to the current "
    "directory."
)


def python_command() -> str:
    """``python`` when the ``python`` on ``PATH`` is this environment's (the same ``bin``
    folder), else this interpreter's path (e.g. a virtual environment that is not
    activated): the start of a printed command."""
    found = shutil.which("python")
    if found and Path(found).absolute().parent == Path(sys.executable).absolute().parent:
        return "python"
    return sys.executable


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.train"),
        description="Train an ssmix model on an LRA task.",
        epilog=PATHS_HELP + " Exit status: 0 done, 1 error, 2 usage error, 130 interrupted "
        "(Ctrl-C or SIGTERM; a checkpoint is saved first).",
    )
    parser.add_argument("--task", choices=TASKS, help="required unless --resume RUN_DIR")
    parser.add_argument("--model", choices=MODELS, help="required unless --resume RUN_DIR")
    parser.add_argument("--preset", default=None, choices=PRESETS, help="default: published")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field (repeatable); mixer.<arg>=value sets a layer argument",
    )  # fmt: skip
    parser.add_argument("--data", default=None, help="dataset folder (default: under data/)")
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
        help="continue a run: RUN_DIR reads its own config.json (--set may change only "
        + ", ".join(RESUMABLE_FIELDS)
        + "; a larger max_steps / epochs extends the run, its learning-rate schedule keeping "
        "its original length unless schedule_steps is set); without RUN_DIR, the run of "
        "--task/--model/--set",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run")
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as JSON and exit (nothing is loaded or written)",
    )  # fmt: skip
    parser.add_argument(
        "--list-presets", action="store_true",
        help="list the presets of every task x model (or of --task / --model) with their "
        "sources, and exit",
    )  # fmt: skip
    parser.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI arguments (see the module docstring)."""
    return build_parser().parse_args(argv)


def resume_config(run: str | Path, overrides: list[str], data_dir: str | None = None) -> Config:
    """The config that continues the run in directory ``run``: its ``config.json`` with
    ``overrides`` (``key=value``; only :data:`~experiments.lra.configs.RESUMABLE_FIELDS`
    may change) and the run's location (``out_dir`` / ``run_name`` of ``run`` itself, so a
    moved run directory resumes in place). Raises ``ValueError`` naming a field that may not
    change, ``FileNotFoundError`` when ``run`` is not a run directory."""
    run = Path(run).expanduser().resolve()
    if not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"{run} is not a run directory (no config.json): --resume RUN_DIR takes the "
            "directory of a run, e.g. runs/listops-s4d-demo"
        )
    saved = _read_config(run)
    values = dict(saved)
    apply_overrides(values, list(overrides) + ([f"data_dir={data_dir}"] if data_dir else []))
    values.update(out_dir=str(run.parent), run_name=run.name)
    cfg = Config.from_dict(values)
    changed = config_changes(saved, cfg)
    if changed:
        raise ValueError(
            f"--resume {run}: {', '.join(changed)} cannot change when a run is resumed (only "
            f"{', '.join(RESUMABLE_FIELDS)} can); start a new run with --set run_name=<name>"
        )
    return cfg


def format_summary(name: str, summary: dict) -> str:
    """The printed run summary: best validation step, test there, and the last step."""
    best, final = summary["best"], summary["final"]
    return (
        f"{name}: best val accuracy {best['val']['accuracy']:.4f} at step {best['step']}, "
        f"test accuracy {best['test']['accuracy']:.4f} there ({best['test']['count']} "
        f"examples); last step {final['step']}: val accuracy {final['val']['accuracy']:.4f}, "
        f"test accuracy {final['test']['accuracy']:.4f}; run directory {summary['run_dir']}"
    )


USER_ERRORS = (ValueError, OSError, CheckpointError, NonFiniteLossError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def cli_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """The run's config from the parsed arguments, its layer arguments checked; every
    configuration error is ``parser.error`` (one line, exit status 2)."""
    try:
        if isinstance(args.resume, str):
            for flag in ("task", "model", "preset"):
                if getattr(args, flag) is not None:
                    parser.error(f"--resume RUN_DIR reads the run's config: drop --{flag}")
            cfg = resume_config(args.resume, args.overrides, args.data)
        else:
            if args.task is None or args.model is None:
                parser.error("--task and --model are required (or --resume RUN_DIR)")
            overrides = list(args.overrides) + ([f"data_dir={args.data}"] if args.data else [])
            cfg = make_config(args.task, args.model, args.preset or "published", overrides)
        check_mixer_args(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(_one_line(e))
    return cfg


def print_presets(task: str | None, model: str | None) -> None:
    """Print the presets (``task  model  preset  source``), one a line."""
    rows = list_presets(
        (task,) if task else TASKS, (model,) if model else MODELS
    )  # fmt: skip
    print(f"{'task':<11} {'model':<10} {'preset':<10} source")
    for r in rows:
        print(f"{r['task']:<11} {r['model']:<10} {r['preset']:<10} {r['source']}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status: 0 done, 1 after an error (logged as one
    line), 2 for a usage or configuration error (before any data is loaded), 130 after an
    interrupt (SIGINT or SIGTERM; the command that continues the run is printed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.list_presets:
        print_presets(args.task, args.model)
        return 0
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    cfg = cli_config(args, parser)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.distributed:
        jax.distributed.initialize()
    try:
        summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except USER_ERRORS as e:
        logger.error("error: %s", _one_line(e))
        return 1
    if summary["status"] == "interrupted":
        if jax.process_index() == 0:
            command = (
                f"python -m experiments.lra.train --resume {shlex.quote(str(summary['run_dir']))}"
            )
            print(f"interrupted at step {summary['step']}; continue with: {command}")
        return 130
    if jax.process_index() == 0:
        print(format_summary(cfg.name, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
