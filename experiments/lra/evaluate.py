"""Evaluate a trained LRA checkpoint.

``python -m experiments.lra.evaluate --checkpoint runs/<run> [--data DIR] [--step N]
[--split test|val|both]``

``--checkpoint`` is a run directory (its latest checkpoint is used unless ``--step`` is
given) or one step folder ``runs/<run>/checkpoints/<step>``. The model is rebuilt from the
run's ``config.json``; ``--data`` points at a dataset folder other than the configured one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from experiments.lra.configs import Config
from experiments.lra.train import Experiment, checkpoint_manager, load_data, restore_checkpoint

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


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    step: int | None = None,
    splits: tuple[str, ...] = ("val", "test"),
) -> dict:
    """Restore a checkpoint and evaluate it; returns ``{"step": s, split: {loss, accuracy,
    count}}``."""
    run, located_step = locate(checkpoint)
    step = located_step if step is None else step
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    data = load_data(cfg, data_dir)
    exp = Experiment(cfg, data)
    mgr = checkpoint_manager(run / "checkpoints", cfg.keep_checkpoints)
    if step is not None and step not in mgr.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {run / 'checkpoints'}; "
            f"available: {sorted(mgr.all_steps())}"
        )
    restored = restore_checkpoint(mgr, exp, step)
    mgr.close()
    results: dict = {"step": restored}
    for split in splits:
        results[split] = exp.evaluate(split)
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Evaluate an LRA checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="run directory or step folder")
    parser.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--split", choices=("val", "test", "both"), default="both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    splits = ("val", "test") if args.split == "both" else (args.split,)
    results = evaluate_checkpoint(
        args.checkpoint, data_dir=args.data, step=args.step, splits=splits
    )
    for split in splits:
        r = results[split]
        print(
            f"step {results['step']} {split}: accuracy {r['accuracy']:.4f}, "
            f"loss {r['loss']:.4f} ({r['count']} examples)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
