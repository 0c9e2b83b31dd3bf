"""Training throughput on Text-like lengths: padding to ``max_len`` against padding to the
batch's longest sequence, with and without length-grouped batches.

``nice -n 10 python benchmarks/lra_padding.py [--small] [--examples N] [--batch B] ...``

Data: ``--examples`` synthetic byte sequences (ids of the Text task, vocabulary 258) whose
lengths follow IMDB's character-level review lengths as a log-normal distribution: median
``--median`` (1000) characters, log-standard deviation ``--sigma`` (0.7: quartiles ~620 and
~1600 characters), at least 10, truncated at ``max_len - 1 = 4095`` plus the end token
(about 2 % of the reviews reach the cap), i.e. what :func:`experiments.lra.data.load_text`
produces from aclImdb. Model: the ``text`` × ``s4d`` ``demo`` config (H = 32, N = 32, FFT
convolution, BatchNorm) with ``--layers`` (2) blocks, through the real jitted train step of
``experiments.lra.train.Experiment``.

Rows, all on the same examples in the same run:

- ``pad to max_len``: every batch padded to 4096 (the published presets' setting, the
  baseline);
- ``pad to batch max``: padded to the longest sequence of the batch rounded up to
  ``--pad-multiple`` (512, as the demo preset), random batches;
- ``+ length grouping``: the same, batches drawn from windows of ``--grouping`` batches
  sorted by length (``length_grouping``; the anchors' loaders pad to the batch maximum of
  random batches, the grouping is ours).

For each row: one epoch over the examples after a warm-up step per distinct batch length
(compile time reported apart), timed as a whole (host batching overlaps the device steps
as in training). ``tokens/s`` counts valid tokens only; ``epoch (IMDB)`` scales the epoch
time to the 25,000 training reviews; ``speed-up`` is the baseline's epoch time over the
row's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, progress  # noqa: E402
from experiments.lra.configs import make_config  # noqa: E402
from experiments.lra.data import (  # noqa: E402
    BYTE_VOCAB_SIZE,
    EOS,
    Ragged,
    Split,
    TaskData,
    epoch_batches,
    example_lengths,
)
from experiments.lra.train import Experiment  # noqa: E402

IMDB_TRAIN = 25_000


def text_like_lengths(n: int, median: float, sigma: float, max_len: int, seed: int = 0):
    """``(n,)`` sequence lengths (end token included): log-normal review lengths, clipped to
    ``[10, max_len - 1]`` characters, plus one."""
    rng = np.random.default_rng(seed)
    chars = np.exp(rng.normal(np.log(median), sigma, n))
    return np.clip(np.round(chars), 10, max_len - 1).astype(np.int64) + 1


def text_like_data(lengths: np.ndarray, max_len: int, seed: int = 0) -> TaskData:
    """Random byte-token sequences of ``lengths`` (each ending in the end token), labels 0/1."""
    rng = np.random.default_rng(seed)
    seqs = []
    for n in lengths:
        seq = rng.integers(2, BYTE_VOCAB_SIZE, n, dtype=np.uint16)
        seq[-1] = EOS
        seqs.append(seq)
    split = Split(Ragged.from_lists(seqs), rng.integers(0, 2, len(lengths)).astype(np.int32))
    return TaskData(
        "text", split, split, split, n_classes=2, kind="tokens", max_len=max_len,
        vocab_size=BYTE_VOCAB_SIZE,
    )  # fmt: skip


def run_epoch(data: TaskData, overrides: dict) -> dict:
    """Warm up every batch length of epoch 0, then time the whole epoch."""
    cfg = make_config("text", "s4d", "demo", {"progress": False, **overrides})
    exp = Experiment(cfg, data)
    steps = exp.steps_per_epoch
    batches = epoch_batches(
        example_lengths(data.train), cfg.batch_size, cfg.seed, 0,
        length_grouping=cfg.length_grouping,
    )  # fmt: skip
    shapes = [exp.train_batch(step)["x"].shape[1] for step in range(steps)]
    first_of_shape = {}
    for step, length in enumerate(shapes):
        first_of_shape.setdefault(length, step)
    start = time.perf_counter()
    for step in first_of_shape.values():
        exp.train_step(step)
    jax.block_until_ready(exp.state)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(steps):
        exp.train_step(step)
    jax.block_until_ready(exp.state)
    epoch_s = time.perf_counter() - start
    valid = int(example_lengths(data.train)[batches].sum())
    padded = cfg.batch_size * int(np.sum(shapes))
    return {
        "steps": steps, "epoch_s": epoch_s, "compile_s": compile_s, "valid": valid,
        "padded": padded, "shapes": len(first_of_shape), "mean_len": float(np.mean(shapes)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the three rows and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="64 examples, batch 8, max_len 1024")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--median", type=float, default=1000.0)
    parser.add_argument("--sigma", type=float, default=0.7)
    parser.add_argument("--pad-multiple", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--grouping", type=int, default=20)
    args = parser.parse_args(argv)
    if args.small:
        args.examples, args.batch, args.max_len, args.median = 64, 8, 1024, 250.0
        args.pad_multiple = 256
    lengths = text_like_lengths(args.examples, args.median, args.sigma, args.max_len)
    data = text_like_data(lengths, args.max_len)
    common = {"batch_size": args.batch, "max_len": args.max_len, "n_layers": args.layers}
    rows_cfg = [
        ("pad to max_len", {"pad_multiple": args.max_len, "length_grouping": 0}),
        ("pad to batch max", {"pad_multiple": args.pad_multiple, "length_grouping": 0}),
        ("+ length grouping", {"pad_multiple": args.pad_multiple,
                               "length_grouping": args.grouping}),
    ]  # fmt: skip
    results = []
    for name, overrides in rows_cfg:
        progress(f"{name} ...")
        results.append((name, overrides, run_epoch(data, {**common, **overrides})))
        r = results[-1][2]
        progress(f"{name}: epoch {r['epoch_s']:.1f} s, compile {r['compile_s']:.1f} s")
    base = results[0][2]["epoch_s"]
    rows = []
    for name, overrides, r in results:
        rows.append([
            name, overrides["pad_multiple"], overrides["length_grouping"], r["shapes"],
            f"{r['mean_len']:.0f}", f"{r['valid'] / r['padded']:.0%}",
            f"{r['epoch_s'] / r['steps'] * 1e3:.0f}", f"{r['valid'] / r['epoch_s']:,.0f}",
            f"{r['epoch_s']:.1f}", f"{r['epoch_s'] * IMDB_TRAIN / len(lengths) / 60:.1f}",
            f"{r['compile_s']:.1f}", f"{base / r['epoch_s']:.2f}",
        ])  # fmt: skip
    q = np.percentile(lengths, [25, 50, 75, 90])
    print(
        f"S4D demo config ({args.layers} blocks, H 32, N 32, FFT), batch {args.batch}, "
        f"{len(lengths)} "
        f"Text-like examples: lengths log-normal, median {args.median:.0f} chars, sigma "
        f"{args.sigma}, clipped at {args.max_len} (quartiles {q[0]:.0f} / {q[1]:.0f} / "
        f"{q[2]:.0f}, 90% {q[3]:.0f}, mean {lengths.mean():.0f}, "
        f"{np.mean(lengths == args.max_len):.1%} at the cap); {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)"
    )
    print_table(
        ["batches", "pad_multiple", "grouping", "lengths", "mean L", "valid", "step ms",
         "tokens/s", "epoch s", "epoch (IMDB) min", "compile s", "speed-up"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
