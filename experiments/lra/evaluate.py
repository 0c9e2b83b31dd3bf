"""Evaluate a trained LRA checkpoint.

``python -m experiments.lra.evaluate --checkpoint runs/<run> [--data DIR]
[--step best|latest|N] [--split test|val|both]``

``--checkpoint`` is a run directory or one step folder ``runs/<run>/checkpoints/<step>``.
For a run directory the checkpoint of the best validation accuracy is used (what the papers
report; the training loop keeps it besides the latest ones) unless ``--step`` names another:
``latest`` or a step number. The model is rebuilt from the run's ``config.json``; ``--data``
points at a dataset folder other than the configured one. A checkpoint that cannot be read
is one error naming its step and the other steps available.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from experiments.lra.configs import Config
from experiments.lra.train import (
    USER_ERRORS,
    Experiment,
    checkpoint_manager,
    load_data,
    restore_checkpoint,
)

logger = logging.getLogger("experiments.lra")


def locate(checkpoint: str | Path) -> tuple[Path, int | None]:
    """``(run directory, step or None)`` for a run directory or a step folder."""
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        return path, None
    if path.name.isdigit() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path} is neither a run directory (with config.json and checkpoints/) nor a "
        "checkpoint step folder runs/<run>/checkpoints/<step>"
    )


def _parse_step(step: int | str | None) -> int | str:
    if step is None:
        return "best"
    if isinstance(step, int) or str(step).isdigit():
        return int(step)
    if step in ("best", "latest"):
        return step
    raise ValueError(f"step must be 'best', 'latest' or a step number; got {step!r}")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    step: int | str | None = None,
    splits: tuple[str, ...] = ("val", "test"),
) -> dict:
    """Restore a checkpoint and evaluate it; returns ``{"step": s, split: {loss, accuracy,
    count}}``.

    ``step``: ``None`` / ``"best"`` (default: the best-validation checkpoint of a run
    directory, the given step of a step folder), ``"latest"``, or a step number. Raises
    :class:`~experiments.lra.train.CheckpointError` naming the step when it cannot be read.
    """
    run, located_step = locate(checkpoint)
    choice = _parse_step(located_step if step is None and located_step is not None else step)
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    mgr = checkpoint_manager(run / "checkpoints", cfg.keep_checkpoints, create=False)
    try:
        if not mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
        if choice == "latest":
            chosen = mgr.latest_step()
        elif choice == "best":
            chosen = mgr.best_step()  # the latest step when no checkpoint has metrics
        else:
            chosen = choice
            if chosen not in mgr.all_steps():
                raise FileNotFoundError(
                    f"no checkpoint for step {chosen} in {run / 'checkpoints'}; "
                    f"available: {sorted(mgr.all_steps())}"
                )
        data = load_data(cfg, data_dir)
        exp = Experiment(cfg, data)
        restored = restore_checkpoint(mgr, exp, chosen)
    finally:
        mgr.close()
    results: dict = {"step": restored}
    for split in splits:
        results[split] = exp.evaluate(split)
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 after an error (logged as one line)."""
    parser = argparse.ArgumentParser(description="Evaluate an LRA checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="run directory or step folder")
    parser.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    parser.add_argument(
        "--step", default=None,
        help="best (default for a run directory), latest, or a step number",
    )  # fmt: skip
    parser.add_argument("--split", choices=("val", "test", "both"), default="both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    splits = ("val", "test") if args.split == "both" else (args.split,)
    try:
        results = evaluate_checkpoint(
            args.checkpoint, data_dir=args.data, step=args.step, splits=splits
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
