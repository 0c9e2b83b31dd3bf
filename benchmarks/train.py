"""Training-step throughput at the ListOps demo preset: S4D, S5, Hydra, attention baseline.

``python benchmarks/train.py [--small] [--length L] [--batch B] [--repeats R]``

Each model is the ``listops`` × model ``demo`` config (the ``make demo`` architecture: 4
blocks, H = 32, N = 32) trained on synthetic ListOps tokens of one fixed length and batch
(defaults 1024 and 32; the demo itself trains at batch 16 on lengths 500–2000), no
padding, every token valid, through the real jitted train step of
``experiments.lra.train.Experiment`` (forward, backward, grouped AdamW, BatchNorm updates).
The table gives the median step time after a compile + warm-up step, tokens per second
(batch × length / step time) and the ratio to S4D in the same run. A model whose layer is
not available in this installation is listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, progress  # noqa: E402
from experiments.lra.configs import make_config  # noqa: E402
from experiments.lra.data import LISTOPS_VOCAB, Ragged, Split, TaskData  # noqa: E402
from experiments.lra.models import LayerUnavailable, mixer_class  # noqa: E402
from experiments.lra.train import Experiment  # noqa: E402

MODELS = ("s4d", "s5", "hydra", "attention")


def synthetic_listops(n: int, length: int, seed: int = 0) -> TaskData:
    """``n`` random ListOps token sequences of exactly ``length`` tokens (10 classes)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, len(LISTOPS_VOCAB) + 2, size=(n, length), dtype=np.uint16)
    split = Split(Ragged.from_fixed(ids), rng.integers(0, 10, n).astype(np.int32))
    return TaskData(
        "listops", split, split, split, n_classes=10, kind="tokens", max_len=length,
        vocab_size=len(LISTOPS_VOCAB) + 2,
    )  # fmt: skip


def time_model(model: str, length: int, batch: int, repeats: int) -> dict:
    """Median train-step time of ``model`` at the demo preset on ``(batch, length)``."""
    cfg = make_config(
        "listops", model, "demo",
        {"batch_size": batch, "max_len": length, "pad_multiple": length, "progress": False},
    )  # fmt: skip
    exp = Experiment(cfg, synthetic_listops(batch * (repeats + 2), length))
    start = time.perf_counter()
    exp.train_step(0)
    jax.block_until_ready(exp.state)
    compile_s = time.perf_counter() - start
    exp.train_step(1)
    jax.block_until_ready(exp.state)
    times = []
    for step in range(2, repeats + 2):
        start = time.perf_counter()
        exp.train_step(step)
        jax.block_until_ready(exp.state)
        times.append(time.perf_counter() - start)
    return {"params": exp.n_params, "step_s": statistics.median(times), "compile_s": compile_s}


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="L = 256, batch 8, 3 repeats")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.small:
        args.length, args.batch, args.repeats = 256, 8, 3
    results, unavailable = {}, {}
    for model in MODELS:
        try:
            mixer_class(model)
        except LayerUnavailable as e:
            results[model], unavailable[model] = None, str(e)
            progress(f"{model}: skipped ({e})")
            continue
        results[model] = time_model(model, args.length, args.batch, args.repeats)
        r = results[model]
        progress(f"{model}: {r['step_s'] * 1e3:.1f} ms/step (compile {r['compile_s']:.1f} s)")
    base = results.get("s4d")
    rows = []
    for model in MODELS:
        r = results[model]
        if r is None:
            skipped = f"skipped: {unavailable[model]}"
            rows.append([model, "-", "-", "-", "-", skipped])
            continue
        tokens = args.batch * args.length / r["step_s"]
        ratio = f"{base['step_s'] / r['step_s']:.2f}" if base else "-"
        rows.append([
            model, f"{r['params']:,}", f"{r['step_s'] * 1e3:.1f}", f"{tokens:,.0f}",
            f"{r['compile_s']:.1f}", ratio,
        ])  # fmt: skip
    print(
        f"Train step at the ListOps demo preset: batch {args.batch} × length {args.length}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), median of {args.repeats}"
    )
    print_table(["model", "params", "step ms", "tokens/s", "compile+1st s", "speed vs S4D"], rows)


if __name__ == "__main__":
    main()
