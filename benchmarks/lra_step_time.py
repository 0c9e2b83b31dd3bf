"""Time per training step of every published LRA preset on this machine's CPU.

``nice -n 10 python benchmarks/lra_step_time.py [--small] [--tasks ...] [--models ...]``

For each task × model (default: the six tasks × ``s4 s4d s5 s4-ptd s5-ptd``; ``hydra`` and
``attention`` on request) the ``published`` config at its real shape: the preset's batch
size, width, depth, state size and layer settings, every sequence at the task's full length
``max_len`` (the worst case: token batches padded to their longest sequence are shorter on
average). One step is the real jitted train step of :class:`experiments.lra.train.Experiment`
(forward, loss, backward, optimiser update, BatchNorm statistics, host batch assembly),
timed after compilation as the median of ``--repeats`` steps (each waited for).

A full-batch step estimated (from a probe at ``--probe-batch`` examples, scaled linearly in
the batch) to take longer than ``--max-step-s`` (60 s) is not run: its row gives the probe's
time scaled to the full batch, marked ``scaled from B=<probe>``. The rows where the full
batch ran say ``measured``. Compilation seconds are reported apart.

``--small``: a quick check of the script (length ≤ 256, batch 2, one block, the presets'
other settings), not a measurement of the presets.

Data are synthetic (:class:`experiments.lra.data.TaskData` with random ids / pixels): the
step time does not depend on the values.
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

from experiments.lra.configs import TASKS, make_config  # noqa: E402
from experiments.lra.data import Ragged, Split, TaskData  # noqa: E402
from experiments.lra.train import Experiment  # noqa: E402

DEFAULT_MODELS = ("s4", "s4d", "s5", "s4-ptd", "s5-ptd")
N_CLASSES = {"listops": 10, "text": 2, "retrieval": 2, "image": 10, "pathfinder": 2,
             "pathx": 2}  # fmt: skip
VOCAB = {"listops": 20, "text": 258, "retrieval": 258}


def synthetic_task(task: str, n: int, length: int, seed: int = 0) -> TaskData:
    """``n`` examples of exactly ``length`` positions for ``task`` (random content)."""
    rng = np.random.default_rng(seed)
    tokens = task in VOCAB
    high = VOCAB[task] if tokens else 256
    low = 1 if tokens else 0

    def seqs():
        return Ragged.from_fixed(rng.integers(low, high, (n, length)).astype(np.uint16))

    split = Split(seqs(), rng.integers(0, N_CLASSES[task], n).astype(np.int32),
                  seqs() if task == "retrieval" else None)  # fmt: skip
    kind = "tokens" if tokens else "pixels"
    return TaskData(task, split, split, split, N_CLASSES[task], kind, max_len=length,
                    vocab_size=VOCAB.get(task), paired=task == "retrieval")  # fmt: skip


def time_steps(cfg, data, repeats: int) -> tuple[float, float]:
    """(compile + first step seconds, median seconds of ``repeats`` further steps)."""
    exp = Experiment(cfg, data, devices=jax.devices()[:1])
    start = time.perf_counter()
    exp.train_step(0)
    jax.block_until_ready(exp.state["params"])
    first = time.perf_counter() - start
    times = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        exp.train_step(step % exp.steps_per_epoch)
        jax.block_until_ready(exp.state["params"])
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def row(task: str, model: str, args) -> dict:
    cfg = make_config(task, model)
    batch, length = cfg.batch_size, cfg.max_len
    overrides = {"progress": False, "eval_batch_size": 0}
    if args.small:
        length, batch = min(length, 256), 2
        overrides.update(n_layers=1, max_len=length, pad_multiple=length)
    out = {"task": task, "model": model, "batch": batch, "length": length,
           "width": cfg.d_model, "layers": 1 if args.small else cfg.n_layers}  # fmt: skip
    probe = min(batch, args.probe_batch)
    cfg_probe = make_config(task, model, overrides={**overrides, "batch_size": probe})
    compile_s, probe_s = time_steps(cfg_probe, synthetic_task(task, probe, length), args.repeats)
    estimate = probe_s * batch / probe
    if probe == batch:
        out.update(seconds=probe_s, compile_s=compile_s, how="measured")
    elif estimate <= args.max_step_s:
        cfg_full = make_config(task, model, overrides={**overrides, "batch_size": batch})
        compile_s, full_s = time_steps(cfg_full, synthetic_task(task, batch, length), args.repeats)
        out.update(seconds=full_s, compile_s=compile_s, how="measured")
    else:
        out.update(seconds=estimate, compile_s=compile_s, how=f"scaled from B={probe}")
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | model | batch | length | width | layers | s / step | how | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['task']} | {r['model']} | {r['batch']} | {r['length']} | {r['width']} | "
                f"{r['layers']} | – | failed: {r['error']} | – |"
            )
            continue
        lines.append(
            f"| {r['task']} | {r['model']} | {r['batch']} | {r['length']} | {r['width']} | "
            f"{r['layers']} | {r['seconds']:.2f} | {r['how']} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after compiling")
    parser.add_argument("--probe-batch", type=int, default=2)
    parser.add_argument("--max-step-s", type=float, default=60.0,
                        help="run the full batch if the probe predicts at most this")  # fmt: skip
    parser.add_argument("--small", action="store_true", help="quick check, tiny shapes")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.probe_batch < 1 or args.max_step_s <= 0:
        parser.error("--repeats and --probe-batch must be >= 1 and --max-step-s > 0")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{jax.device_count()} device(s)", flush=True)  # fmt: skip
    rows, start = [], time.perf_counter()
    for task in args.tasks:
        for model in args.models:
            try:
                r = row(task, model, args)
            except Exception as e:  # a failing row is reported, the others still run
                cfg = make_config(task, model)
                r = {"task": task, "model": model, "batch": cfg.batch_size,
                     "length": cfg.max_len, "width": cfg.d_model, "layers": cfg.n_layers,
                     "error": f"{type(e).__name__}: {str(e)[:80]}"}  # fmt: skip
            rows.append(r)
            took = time.perf_counter() - start
            what = r.get("error") or f"{r['seconds']:.2f} s/step ({r['how']})"
            print(f"[{took:7.1f} s] {task:10s} {model:7s} {what}", flush=True)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
