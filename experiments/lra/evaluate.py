"""Evaluate a trained LRA checkpoint.

``python -m experiments.lra.evaluate RUN_DIR [--data DIR] [--step best|latest|N]
[--split test|val|both] [--no-progress]`` (``--checkpoint RUN_DIR`` is the same)

``RUN_DIR`` is a run directory or one step folder ``runs/<run>/checkpoints/<step>``.
For a run directory the checkpoint of the best validation accuracy is used (what the papers
report; the training loop keeps it besides the latest ones) unless ``--step`` names another:
``latest`` or a step number. The model is rebuilt from the run's ``config.json``; ``--data``
points at a dataset folder other than the configured one.

Only the model is read from the checkpoint: its parameters and its other variables
(BatchNorm statistics), never the optimiser state (:func:`restore_model_state`). A
checkpoint whose optimiser state no longer fits the config's optimiser (changed parameter
groups, another optax version) still evaluates. A checkpoint that cannot be read is one
error naming its step and the other steps available.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import jax
import numpy as np

from experiments.logs import program_name, setup_logging
from experiments.lra.configs import Config
from experiments.lra.data import eval_batches
from experiments.lra.train import (
    USER_ERRORS,
    CheckpointError,
    Experiment,
    checkpoint_manager,
    load_data,
)

logger = logging.getLogger("experiments.lra")

CHECKPOINT_ITEM = "state"  # the item train.save_checkpoint writes the training state under
STEP_CHOICES = "'best', 'latest' or a step number"


def locate(checkpoint: str | Path) -> tuple[Path, int | None]:
    """``(run directory, step or None)`` for a run directory or a step folder
    ``<run>/checkpoints/<step>``. Anything else is a ``FileNotFoundError``."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "config.json").is_file():
        return path, None
    if path.name.isdigit() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path} is neither a run directory (with config.json and checkpoints/, as written "
        "by experiments.lra.train) nor a checkpoint step folder runs/<run>/checkpoints/<step>"
    )


def read_config(run: Path) -> Config:
    """The :class:`Config` of run directory ``run`` (``ValueError`` when unreadable)."""
    path = run / "config.json"
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read the run's config {path}: {e}") from e


def parse_step(step: int | str | None) -> int | str:
    """``"best"`` (for ``None``), ``"latest"`` or a step number; anything else is a
    ``ValueError``."""
    if step is None:
        return "best"
    if isinstance(step, bool):
        raise ValueError(f"step must be {STEP_CHOICES}; got {step!r}")
    if isinstance(step, int) or str(step).isdigit():
        return int(step)
    if step in ("best", "latest"):
        return step
    raise ValueError(f"step must be {STEP_CHOICES}; got {step!r}")


def choose_step(run: Path, choice: int | str, keep: int = 1) -> int:
    """The checkpoint step of run directory ``run`` that ``choice`` (see :func:`parse_step`)
    names: ``"best"`` is the highest validation accuracy (the latest step when no checkpoint
    has metrics), ``"latest"`` the newest. A missing folder or step is a
    ``FileNotFoundError`` listing the available steps."""
    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints/ folder in {run}: the run saved no checkpoint")
    mgr = checkpoint_manager(ckpt_dir, keep, create=False)
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        if choice == "latest":
            return int(mgr.latest_step())
        if choice == "best":
            return int(mgr.best_step())
        if choice not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {choice} in {ckpt_dir}; available: {steps}"
            )
        return int(choice)
    finally:
        mgr.close()


def _one_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else ""
    return f"{type(e).__name__}: {line[:limit] + ' ...' if len(line) > limit else line}"


def _restore_args(leaf):
    import orbax.checkpoint as ocp

    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape)


def restore_model_state(ckpt_dir: str | Path, step: int, target: dict) -> dict:
    """Read only the model's variables from checkpoint ``step`` under ``ckpt_dir``.

    The checkpoints hold the whole training state (``params``, ``rest``, ``opt``, ``step``,
    ...; see :class:`~experiments.lra.train.Experiment`). This restores the subtrees named
    in ``target`` and nothing else (orbax partial restore), so the optimiser state is never
    read and need not fit the current optimiser.

    Args:
      ckpt_dir: the run's ``checkpoints/`` folder.
      step: the checkpoint step.
      target: ``{"params": ..., "rest": ...}`` (any sub-dict of the saved state), pytrees
        of ``jax.ShapeDtypeStruct`` (or arrays) giving each leaf's shape and dtype; a leaf
        with a ``sharding`` is restored as a ``jax.Array`` placed that way, one without as
        a ``np.ndarray``. ``rest`` may omit saved variables (RNG state).

    Returns:
      ``target``'s structure holding the saved values, each of ``target``'s shape and dtype.

    Raises:
      CheckpointError: naming the step (and the other steps) when the checkpoint cannot be
        read or does not match ``target``.
    """
    import orbax.checkpoint as ocp

    from experiments.lra import train as lra_train

    ckpt_dir = Path(ckpt_dir)
    quiet = getattr(lra_train, "_QuietClosedLoop", None)  # silences orbax's failed-read noise
    if quiet is not None:
        quiet.install()
    options = ocp.CheckpointManagerOptions(create=False)
    restore_args = jax.tree.map(_restore_args, target)
    others: list[int] = []
    try:
        # A manager of its own: orbax binds one handler per item and manager, and the
        # training loop's manager reads this item with StandardRestore.
        with ocp.CheckpointManager(ckpt_dir.resolve(), options=options) as reader:
            others = sorted(s for s in reader.all_steps() if s != step)
            restored = reader.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        CHECKPOINT_ITEM: ocp.args.PyTreeRestore(
                            item=target, restore_args=restore_args, partial_restore=True
                        )
                    }
                ),
            )[CHECKPOINT_ITEM]
            jax.block_until_ready(restored)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint step {step} in {ckpt_dir} cannot be read: it is corrupted or does not "
            f"match this model ({_one_line(e)}); other steps: {others}",
            step,
        ) from e
    bad = [
        f"{jax.tree_util.keystr(path)} {tuple(got.shape)} {got.dtype} (expected "
        f"{tuple(want.shape)} {want.dtype})"
        for (path, got), want in zip(
            jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target), strict=True
        )
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint step {step} in {ckpt_dir} does not match this model: {bad[0]}"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""),
            step,
        )
    return restored


def restore_for_evaluation(exp: Experiment, ckpt_dir: str | Path, step: int) -> int:
    """Put checkpoint ``step``'s parameters and non-parameter variables into ``exp.state``
    (placed as the experiment shards its state); the optimiser state, the step counter and
    the log sums keep their fresh values. Returns ``step``."""
    target = {
        key: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            exp.state[key],
            exp.state_sharding[key],
        )
        for key in ("params", "rest")
    }
    restored = restore_model_state(ckpt_dir, step, target)
    exp.state = {**exp.state, **restored}
    return step


def _tqdm_disable(progress: bool | None) -> bool | None:
    # tqdm's disable=None: shown only when the stream is a terminal
    return None if progress is None else not progress


def evaluate_split(exp: Experiment, split: str, *, progress: bool | None = False) -> dict:
    """Loss and accuracy of ``exp``'s current parameters over every example of ``split``
    (``val`` or ``test``): ``{"loss", "accuracy", "count"}``, the numbers
    :meth:`Experiment.evaluate` gives. ``progress``: a bar over the batches on stderr
    (``None``: only on a terminal)."""
    from tqdm.auto import tqdm

    data = exp.data.split(split)
    n_batches = math.ceil(len(data) / exp.eval_batch_size)
    batches = eval_batches(exp.data, data, exp.eval_batch_size, pad_multiple=exp.cfg.pad_multiple)
    loss = correct = count = 0.0
    bar = tqdm(
        batches, total=n_batches, desc=f"{split}", unit="batch",
        disable=_tqdm_disable(progress), leave=False, dynamic_ncols=True,
    )  # fmt: skip
    with bar:
        for batch in bar:
            scores = jax.device_get(exp._eval_step(exp.state, exp.device_batch(batch)))
            loss, correct, count = (
                loss + float(scores[0]),
                correct + float(scores[1]),
                count + float(scores[2]),
            )
    if not count:
        raise ValueError(f"the {split} split has no examples")
    return {"loss": loss / count, "accuracy": correct / count, "count": int(count)}


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    step: int | str | None = None,
    splits: tuple[str, ...] = ("val", "test"),
    progress: bool | None = False,
) -> dict:
    """Restore a checkpoint's model and evaluate it; returns ``{"step": s, split: {loss,
    accuracy, count}}``.

    ``step``: ``None`` / ``"best"`` (default: the best-validation checkpoint of a run
    directory, the given step of a step folder), ``"latest"``, or a step number. Only the
    parameters and BatchNorm statistics are read (:func:`restore_model_state`).
    ``progress``: a bar over the evaluation batches (``None``: only on a terminal).
    Raises :class:`~experiments.lra.train.CheckpointError` naming the step when it cannot
    be read, ``FileNotFoundError`` for a missing run or step (listing the available ones).
    """
    run, located_step = locate(checkpoint)
    choice = parse_step(located_step if step is None and located_step is not None else step)
    cfg = read_config(run)
    chosen = choose_step(run, choice, cfg.keep_checkpoints)
    data = load_data(cfg, data_dir)
    exp = Experiment(cfg, data)
    restore_for_evaluation(exp, run / "checkpoints", chosen)
    logger.info("evaluating %s at step %d", run, chosen)
    results: dict = {"step": chosen}
    for split in splits:
        results[split] = evaluate_split(exp, split, progress=progress)
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 after an error (logged as one line)."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.evaluate"), description="Evaluate an LRA checkpoint."
    )
    parser.add_argument("run", nargs="?", default=None, help="run directory or step folder")
    parser.add_argument("--checkpoint", default=None, help="the same as RUN (kept for scripts)")
    parser.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    parser.add_argument(
        "--step", default=None,
        help="best (default for a run directory), latest, or a step number",
    )  # fmt: skip
    parser.add_argument("--split", choices=("val", "test", "both"), default="both")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.checkpoint is None):
        parser.error("give the run directory once: RUN or --checkpoint RUN")
    setup_logging()
    splits = ("val", "test") if args.split == "both" else (args.split,)
    try:
        results = evaluate_checkpoint(
            args.run or args.checkpoint,
            data_dir=args.data,
            step=args.step,
            splits=splits,
            progress=False if args.no_progress else None,
        )
    except USER_ERRORS as e:
        logger.error("error: %s", e)
        return 1
    for split in splits:
        r = results[split]
        print(
            f"step {results['step']} {split}: accuracy {r['accuracy']:.4f}, "
            f"loss {r['loss']:.4f} ({r['count']} examples)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
