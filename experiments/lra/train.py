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
- Output in ``runs/<run>/``: ``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl``
  (one JSON object per train log window / evaluation), ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from experiments.lra.models import build_model
from ssmix.optim import make_optimizer, warmup_cosine

logger = logging.getLogger("experiments.lra")

TIMING_KEYS = ("tokens_per_s", "elapsed_s")  # the metrics that vary between identical runs


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
    kwargs = {"max_len": cfg.max_len} if cfg.task in ("listops", "text", "retrieval") else {}
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
    )


def run_dir(cfg: Config) -> Path:
    """``<out_dir>/<name>``; a relative ``out_dir`` is taken relative to the repository."""
    out = Path(cfg.out_dir)
    return (out if out.is_absolute() else REPO_ROOT / out) / cfg.name


def _zero_window() -> dict[str, jax.Array]:
    # Separate buffers per entry: the train step donates the state, and one buffer may not
    # be donated twice.
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count", "tokens")}


class Experiment:
    """Model, optimiser, sharding and the jitted steps for one config and dataset.

    ``state`` is a dict of pure arrays: ``params``, ``rest`` (non-parameter variables such as
    BatchNorm statistics), ``opt`` (optax state), ``step`` and ``acc`` (running sums of the
    current log window: loss, correct, count, tokens).
    """

    def __init__(self, cfg: Config, data: TaskData, *, devices=None):
        self.cfg = cfg
        self.data = data
        self.devices = list(devices) if devices is not None else jax.devices()
        n_dev = len(self.devices)
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
        self.warmup_steps = min(int(cfg.warmup_ratio * self.total_steps), self.total_steps - 1)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self._train_lengths = example_lengths(data.train)
        self._epoch_batches: tuple[int, np.ndarray | None] = (-1, None)

        model = build_model(cfg, data, rngs=nnx.Rngs(cfg.seed))
        self.n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.tx = make_optimizer(
            model,
            lr=cfg.lr,
            ssm_lr=cfg.ssm_lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            grad_clip_norm=cfg.grad_clip or None,
        )
        self.lr_schedule = warmup_cosine(cfg.lr, self.warmup_steps, self.total_steps)
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
        acc = state["acc"]
        return {
            "step": state["step"] + 1,
            "params": params,
            "rest": new_rest,
            "opt": opt,
            "acc": {
                "loss": acc["loss"] + loss_sum,
                "correct": acc["correct"] + correct,
                "count": acc["count"] + count,
                "tokens": acc["tokens"] + tokens,
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

    def take_window(self) -> dict[str, float]:
        """Read and reset the running train sums (loss, accuracy, tokens of the window)."""
        acc = jax.device_get(self.state["acc"])
        self.state = {**self.state, "acc": jax.device_put(_zero_window(), self.replicated)}
        count = max(float(acc["count"]), 1.0)
        return {
            "loss": float(acc["loss"]) / count,
            "accuracy": float(acc["correct"]) / count,
            "tokens": float(acc["tokens"]),
        }


# -------------------------------------------------------------------------- checkpoints


def checkpoint_manager(path: Path, keep: int) -> ocp.CheckpointManager:
    """Synchronous orbax manager keeping the ``keep`` latest steps under ``path``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path.resolve(), options=options)


def save_checkpoint(mgr: ocp.CheckpointManager, exp: Experiment) -> int:
    """Save ``exp.state`` (and the config) at its current step; returns the step."""
    step = int(jax.device_get(exp.state["step"]))
    if step in mgr.all_steps():
        return step
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(exp.state),
            config=ocp.args.JsonSave(exp.cfg.to_dict()),
        ),
        force=True,
    )
    mgr.wait_until_finished()
    return step


def restore_checkpoint(mgr: ocp.CheckpointManager, exp: Experiment, step: int | None = None):
    """Replace ``exp.state`` by checkpoint ``step`` (default: the latest); returns the step."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        exp.state,
        exp.state_sharding,
    )
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    exp.state = restored.state
    return step


# ------------------------------------------------------------------------------ metrics


class MetricsLog:
    """Append-only JSONL metrics (written by process 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (an interrupted run may have logged past its last
        checkpoint; the resumed run writes them again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        kept = [r for r in rows if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        """Append one row."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


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


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: TaskData | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train ``cfg``; returns a summary (``status``: ``"done"`` or ``"interrupted"``, final
    step, validation / test metrics at the end, run directory).

    ``resume`` continues from the latest checkpoint of the run directory; ``overwrite``
    deletes an existing run directory first (without either, an existing run is an error).
    ``on_step(step)`` is called after every completed step (tests use it to interrupt).
    """
    out = run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    lead = jax.process_index() == 0
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise FileExistsError(
                f"run directory {out} exists: pass --resume to continue it, --overwrite to "
                "start again, or --set run_name=<new name>"
            )
        if lead:
            shutil.rmtree(out)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ssmix-lra-overwrite")
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_data(cfg)
    exp = Experiment(cfg, data)
    mgr = checkpoint_manager(ckpt_dir, cfg.keep_checkpoints)
    metrics = MetricsLog(out / "metrics.jsonl", lead)
    start = 0
    if resume and mgr.latest_step() is not None:
        saved = json.loads((out / "config.json").read_text())
        if saved != cfg.to_dict():
            raise ValueError(
                f"--resume with a different config than {out / 'config.json'}; changed: "
                + ", ".join(k for k in saved if saved[k] != cfg.to_dict().get(k))
            )
        start = restore_checkpoint(mgr, exp)
        metrics.truncate_after(start)
        logger.info("resumed %s at step %d", out, start)
    elif lead:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if metrics.path.exists():
            metrics.path.unlink()
    logger.info(
        "%s: %d parameters, %d train examples, %d steps (%d per epoch) on %d device(s)",
        cfg.name, exp.n_params, len(data.train), exp.total_steps, exp.steps_per_epoch,
        len(exp.devices),
    )  # fmt: skip

    from tqdm.auto import tqdm

    bar = tqdm(
        total=exp.total_steps, initial=start, disable=not (cfg.progress and lead),
        desc=cfg.name, unit="step", dynamic_ncols=True,
    )  # fmt: skip
    status = "done"
    step = start
    window_start = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < exp.total_steps:
                if stop.requested:
                    status = "interrupted"
                    break
                exp.train_step(step)
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == exp.total_steps:
                    window = exp.take_window()
                    elapsed = time.perf_counter() - window_start
                    window_start = time.perf_counter()
                    row = {
                        "step": step,
                        "epoch": step / exp.steps_per_epoch,
                        "split": "train",
                        "loss": window["loss"],
                        "accuracy": window["accuracy"],
                        "lr": float(exp.lr_schedule(step - 1)),  # of the last update
                        "tokens_per_s": window["tokens"] / elapsed,
                        "elapsed_s": elapsed,
                    }
                    metrics.write(row)
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}",
                        acc=f"{row['accuracy']:.3f}",
                        tok_s=f"{row['tokens_per_s']:.3g}",
                    )
                if step % exp.eval_every == 0 and step != exp.total_steps:
                    val = exp.evaluate("val")
                    metrics.write({"step": step, "split": "val", **val})
                    bar.write(f"step {step}: val loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
                    window_start = time.perf_counter()
                if step % cfg.ckpt_every == 0:
                    save_checkpoint(mgr, exp)
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
            saved = save_checkpoint(mgr, exp)
            logger.warning("interrupted: saved step %d to %s (continue with --resume)", saved, out)
        mgr.close()
        return {"status": status, "step": int(jax.device_get(exp.state["step"])), "run_dir": out}
    save_checkpoint(mgr, exp)
    summary = {"status": status, "step": exp.total_steps, "run_dir": out}
    for split in ("val", "test"):
        result = exp.evaluate(split)
        metrics.write({"step": exp.total_steps, "split": split, **result})
        summary[split] = result
    mgr.close()
    if lead:
        plot_curves(metrics.path, out / "curves.png", f"{cfg.task} / {cfg.model} ({cfg.preset})")
    return summary


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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (130 after an interrupt)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    if args.distributed:
        jax.distributed.initialize()
    overrides = list(args.overrides) + ([f"data_dir={args.data}"] if args.data else [])
    cfg = make_config(args.task, args.model, args.preset, overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if summary["status"] == "interrupted":
        return 130
    if jax.process_index() == 0:
        print(
            f"{cfg.name}: val accuracy {summary['val']['accuracy']:.4f}, "
            f"test accuracy {summary['test']['accuracy']:.4f} "
            f"({summary['test']['count']} examples); run directory {summary['run_dir']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
