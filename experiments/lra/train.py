"""Train an ssmix model on an LRA task.

``python -m experiments.lra.train --task listops --model s4d [--preset demo] [--set k=v ...]
[--resume | --overwrite] [--distributed]``

- One jit-compiled train step (forward, loss, gradients, grouped optimiser from
  :mod:`ssmix.optim`); the state is a pytree of pure arrays (parameters, BatchNorm statistics,
  optimiser state, step, running log sums), so it checkpoints and shards as a whole.
- Data parallel over every device: a 1-D mesh ``("data",)``, the batch sharded along it,
  the state replicated; XLA inserts the gradient all-reduce and computes BatchNorm statistics
  over the global batch. With ``--distributed`` (``jax.distributed.initialize()``, e.g. under
  SLURM) each process feeds its slice of the global batch.
- Exact resume: the batches of epoch e are a pure function of (seed, e) (optionally grouped
  by length, ``length_grouping``), dropout keys are
  ``fold_in(key(seed), step)``, and the log window sums live in the checkpointed state, so
  ``--resume`` replays the remaining steps and writes the same metrics as an uninterrupted
  run. Checkpoints (orbax) every ``ckpt_every`` steps, at the end and on Ctrl-C (the first
  SIGINT stops after the current step and saves; a second one aborts).
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
- Output in ``runs/<run>/``: ``.ssmix-run``, ``config.json``, ``checkpoints/<step>/``,
  ``metrics.jsonl`` (one JSON object per train log window / evaluation), ``summary.json``,
  ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

from experiments.lra.configs import MODELS, PRESETS, TASKS, Config, make_config
from experiments.lra.data import (
    REPO_ROOT,
    Ragged,
    Split,
    TaskData,
    epoch_batches,
    eval_batches,
    example_lengths,
    load_task,
)
from experiments.lra.data import make_batch as make_host_batch
from experiments.lra.models import build_model, build_optimizer

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


def load_data(cfg: Config, data_dir: str | None = None) -> TaskData:
    """Load ``cfg.task`` (from ``data_dir``, ``cfg.data_dir`` or the default folder) and apply
    ``train_limit`` / ``eval_limit``."""
    if cfg.task in ("listops", "text", "retrieval"):
        kwargs = {"max_len": cfg.max_len}
    else:
        kwargs = {"pixel_norm": tuple(cfg.pixel_norm)} if cfg.pixel_norm else {}
    data = load_task(cfg.task, data_dir or cfg.data_dir or None, **kwargs)
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
    """``<out_dir>/<name>``; a relative ``out_dir`` is taken relative to the repository.

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
    out = Path(cfg.out_dir)
    out = out if out.is_absolute() else REPO_ROOT / out
    path = out / name
    if path.resolve().parent != out.resolve():
        raise ValueError(
            f"run directory {path} resolves to {path.resolve()}, outside out_dir {out.resolve()}"
        )
    return path


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is an ssmix run directory (it holds the :data:`RUN_MARKER` file)."""
    return (Path(path) / RUN_MARKER).is_file()


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
        self._train_lengths = example_lengths(data.train)
        self._epoch_batches: tuple[int, np.ndarray | None] = (-1, None)

        model = build_model(cfg, data, rngs=nnx.Rngs(cfg.seed))
        self.n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.tx, self.lr_schedule, self.warmup_steps = build_optimizer(
            cfg, model, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps
        )
        model.train()
        self.graph_train, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.graph_eval = nnx.split(model, nnx.Param, ...)[0]
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
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

    def _forward(self, graph, params, rest, batch, rngs):
        model = nnx.merge(graph, params, rest)
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


def checkpoint_manager(path: Path, keep: int, *, create: bool = True) -> ocp.CheckpointManager:
    """Synchronous orbax manager under ``path`` keeping the ``keep`` latest steps and the
    best one by validation accuracy (a ``LatestN`` + ``BestN`` preservation policy).

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
        create=create, enable_async_checkpointing=False, best_fn=_val_accuracy,
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
    mgr: ocp.CheckpointManager, exp: Experiment, metrics: dict | None = None
) -> int:
    """Save ``exp.state`` (and the config) at its current step, with the validation
    ``metrics`` of that step if given; returns the step."""
    step = int(jax.device_get(exp.state["step"]))
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
    mgr.wait_until_finished()
    return step


def restore_checkpoint(mgr: ocp.CheckpointManager, exp: Experiment, step: int | None = None):
    """Replace ``exp.state`` by checkpoint ``step`` (default: the latest); returns the step.

    Raises :class:`CheckpointError` naming the step when it cannot be read (``exp.state``
    is then unchanged), ``FileNotFoundError`` when there is no such checkpoint."""
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
    """First SIGINT: ask the loop to stop after the current step; second: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
    An interrupted run returns ``{"status": "interrupted", "step", "run_dir"}``.

    ``resume`` continues from the newest intact checkpoint of the run directory;
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
    data = data if data is not None else load_data(cfg)
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
            saved = _read_config(out)
            if saved != cfg.to_dict():
                raise ValueError(
                    f"--resume with a different config than {out / 'config.json'}; changed: "
                    + ", ".join(k for k in saved if saved[k] != cfg.to_dict().get(k))
                )
            start = restore_latest_intact(mgr, exp, out)
            metrics.truncate_after(start)
            logger.info("resumed %s at step %d", out, start)
        elif lead:
            write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            for stale in (metrics.path, out / "summary.json"):
                stale.unlink(missing_ok=True)
        summary = _loop(cfg, exp, mgr, metrics, out, start, limit, on_step)
    except BaseException:
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
    """The training loop of :func:`train` from step ``start``, then the final reporting."""
    lead = metrics.enabled
    total = exp.total_steps
    logger.info(
        "%s: %d parameters, %d train examples, %d steps (%d per epoch) on %d device(s)",
        cfg.name, exp.n_params, len(exp.data.train), total, exp.steps_per_epoch,
        len(exp.devices),
    )  # fmt: skip

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=start, disable=not (cfg.progress and lead),
        desc=cfg.name, unit="step", dynamic_ncols=True,
    )  # fmt: skip
    status = "done"
    step = start
    final_val = None
    window_start = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < total:
                if stop.requested:
                    status = "interrupted"
                    break
                exp.train_step(step)
                step += 1
                bar.update(1)
                last = step == total
                if (cfg.log_every > 0 and step % cfg.log_every == 0) or last:
                    _check_finite(exp, limit)
                    window = exp.take_window()
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    window_start = time.perf_counter()
                    row = {
                        "step": step,
                        "epoch": step / exp.steps_per_epoch,
                        "split": "train",
                        "loss": window["loss"],
                        "accuracy": window["accuracy"],
                        "lr": float(exp.lr_schedule(step - 1)),  # of the last update
                        "nonfinite_steps": window["nonfinite_steps"],
                        "tokens_per_s": window["tokens"] / elapsed,
                        "elapsed_s": elapsed,
                    }
                    metrics.write(row)
                    if row["loss"] is not None:
                        bar.set_postfix(
                            loss=f"{row['loss']:.3f}",
                            acc=f"{row['accuracy']:.3f}",
                            tok_s=f"{row['tokens_per_s']:.3g}",
                        )
                val = None
                if step % exp.eval_every == 0 or last:
                    _check_finite(exp, limit)
                    val = exp.evaluate("val")
                    metrics.write({"step": step, "split": "val", **val})
                    bar.write(f"step {step}: val loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
                    final_val = val if last else None
                    window_start = time.perf_counter()
                if val is not None or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0):
                    _check_finite(exp, limit)
                    save_checkpoint(mgr, exp, _val_metrics(val) if val is not None else None)
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
    if status == "interrupted":
        if state_alive:
            _check_finite(exp, limit)
            saved = save_checkpoint(mgr, exp)
            logger.warning("interrupted: saved step %d to %s (continue with --resume)", saved, out)
        return {
            "status": status,
            "step": int(jax.device_get(exp.state["step"])),
            "run_dir": out,
        }
    if final_val is None:  # resumed at the end: the last step's evaluation is in its checkpoint
        final_val = exp.evaluate("val")
        save_checkpoint(mgr, exp, _val_metrics(final_val))
    final_test = exp.evaluate("test")
    metrics.write({"step": total, "split": "test", **final_test})
    best_step = mgr.best_step()
    best_val, best_test = final_val, final_test
    if best_step is not None and best_step != total:
        best = mgr.metrics(best_step)
        best_val = {
            "loss": best["val_loss"], "accuracy": best["val_accuracy"], "count": best["val_count"]
        }  # fmt: skip
        restore_checkpoint(mgr, exp, best_step)
        best_test = exp.evaluate("test")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Train an ssmix model on an LRA task.")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--preset", default="published", choices=PRESETS)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field (repeatable); mixer.<arg>=value sets a layer argument",
    )  # fmt: skip
    parser.add_argument("--data", default=None, help="dataset folder (default: under data/)")
    parser.add_argument("--resume", action="store_true", help="continue the existing run")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run")
    parser.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (130 after an interrupt, 1 after an error,
    which is logged as one line)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    if args.distributed:
        jax.distributed.initialize()
    overrides = list(args.overrides) + ([f"data_dir={args.data}"] if args.data else [])
    try:
        cfg = make_config(args.task, args.model, args.preset, overrides)
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except USER_ERRORS as e:
        logger.error("error: %s", e)
        return 1
    if summary["status"] == "interrupted":
        return 130
    if jax.process_index() == 0:
        print(format_summary(cfg.name, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
