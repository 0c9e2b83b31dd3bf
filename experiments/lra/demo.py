"""The ListOps demo: generate a seeded ListOps set, train a small S4D, evaluate on test.

``python -m experiments.lra.demo [--steps N] [--n-train N] [--set k=v ...]
[--resume | --overwrite]``

Generates (once) ``data/listops-demo/basic_{train,val,test}.tsv`` with the published
procedure and length range (500 < length < 2000) but fewer samples (about a minute, with a
progress bar on a terminal), then trains the ``demo`` preset of ``listops`` × ``s4d`` (about
3 minutes on 2 CPU cores) with the progress bar, evaluates on the test split and prints the
accuracy next to the majority-class baseline. Checkpoints, metrics and ``curves.png`` go to
``runs/demo-listops-s4d/``. ``data/`` and ``runs/`` are the repository's inside a git
checkout, else under the current directory.

Ctrl-C (or SIGTERM) stops after the current step, saves a checkpoint and prints the command
that continues the run (the same arguments with ``--resume``). Running the demo again while
its run directory exists needs ``--resume`` (continue; a finished run is reported again) or
``--overwrite`` (start again): nothing is deleted silently.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from experiments.logs import program_name, setup_logging
from experiments.lra.configs import make_config
from experiments.lra.data import load_listops
from experiments.lra.listops import write_listops
from experiments.lra.models import check_mixer_args
from experiments.lra.train import (
    USER_ERRORS,
    is_run_dir,
    python_command,
    resolve_path,
    run_dir,
    train,
)

logger = logging.getLogger("experiments.lra")

# About 3 minutes on 2 CPU cores (with compilation and evaluation); see configs.DEMO.
DEMO_STEPS = 900
RUN_NAME = "demo-listops-s4d"


def demo_data_dir() -> Path:
    """``data/listops-demo`` (resolved by :func:`experiments.lra.train.resolve_path`)."""
    return resolve_path("data") / "listops-demo"


def ensure_data(
    n_train: int, n_val: int, n_test: int, seed: int = 0, *, root: Path | None = None
) -> Path:
    """Generate the demo set into ``root`` (default :func:`demo_data_dir`) unless one with
    these sizes is already there; returns the folder."""
    root = demo_data_dir() if root is None else Path(root)
    files = [root / f"basic_{s}.tsv" for s in ("train", "val", "test")]
    if all(f.is_file() for f in files):
        counts = [sum(1 for _ in open(f)) - 1 for f in files]
        if counts == [n_train, n_val, n_test]:
            logger.info("using the ListOps demo set in %s", root)
            return root
    total = n_train + n_val + n_test
    logger.info(
        "generating %d ListOps samples into %s (once; about %d s on one CPU core)",
        total, root, max(1, round(total * 0.0055)),
    )  # fmt: skip
    start = time.perf_counter()
    write_listops(root, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    logger.info("generated the ListOps demo set in %.0f s", time.perf_counter() - start)
    return root


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.demo"),
        description=__doc__.splitlines()[0],
        epilog="data/ and runs/ are the repository's inside a git checkout, else under the "
        "current directory. Exit status: 0 done, 1 error, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("--n-train", type=int, default=12_000, help="training samples")
    parser.add_argument("--n-val", type=int, default=500, help="validation samples")
    parser.add_argument("--n-test", type=int, default=1_000, help="test samples")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field of the demo preset (repeatable)",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the existing demo run")
    group.add_argument(
        "--overwrite", action="store_true", help="delete the existing demo run and start again"
    )
    return parser


def continue_command(argv: list[str]) -> str:
    """The command that continues an interrupted demo started with ``argv``."""
    args = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    return shlex.join([python_command(), "-m", "experiments.lra.demo", *args])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 done, 1 error, 2 usage error, 130
    interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    for name in ("n_train", "n_val", "n_test", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    data_dir = demo_data_dir()
    overrides = [f"data_dir={data_dir}", f"run_name={RUN_NAME}", "eval_limit=0"]
    overrides.append(f"max_steps={args.steps}")
    try:
        cfg = make_config("listops", "s4d", "demo", overrides + args.overrides)
        check_mixer_args(cfg)
        out = run_dir(cfg)
    except (ValueError, TypeError) as e:
        parser.error(" ".join(str(e).split()))
    if out.exists() and is_run_dir(out) and not (args.resume or args.overwrite):
        logger.error(
            "error: %s holds a demo run: pass --resume to continue it or --overwrite to start "
            "again", out,
        )  # fmt: skip
        return 1
    try:
        ensure_data(args.n_train, args.n_val, args.n_test, root=resolve_path(cfg.data_dir))
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("interrupted while preparing the demo; run the same command again")
        return 130
    except USER_ERRORS as e:
        logger.error("error: %s", " ".join(str(e).split()))
        return 1
    if summary["status"] != "done":
        print(
            f"interrupted at step {summary['step']} (checkpoint saved); continue with: "
            f"{continue_command(argv)}"
        )
        return 130
    data = load_listops(resolve_path(cfg.data_dir), max_len=cfg.max_len)
    majority, _ = Counter(data.train.labels.tolist()).most_common(1)[0]
    baseline = float((data.test.labels == majority).mean())
    test = summary["test"]
    best = summary.get("best") or {}
    at_best = ""
    if best.get("test") and best.get("step") != summary["step"]:
        at_best = (
            f" (at the best validation step {best['step']}, as papers report: "
            f"{best['test']['accuracy']:.4f})"
        )
    print(
        f"ListOps demo (S4D, {summary['step']} steps): test accuracy {test['accuracy']:.4f} "
        f"on {test['count']} examples{at_best}; majority-class baseline {baseline:.4f} "
        f"(always '{majority}'). Checkpoint and curves.png in {summary['run_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
