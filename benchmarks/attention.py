"""Benchmark: Kronecker attention vs full attention, and the tensor-attention methods.

(a) KAO vs full softmax attention on flattened images 16², 32², 64²: median time, speed-up
    over the materialized full attention, and compiled temporary memory (XLA's
    ``memory_analysis().temp_size_in_bytes``: the peak memory beyond inputs and outputs).
(b) Tensor attention for n in {64, …, 1024}: naive vs blocked vs 2-simplicial (windows 32) vs
    approx (default degree), fitted scaling exponents (least squares of log time on log n),
    the approx error against naive; then approx alone for n in {256, …, 4096}.
(c) The approx error against naive as a function of the entry bound and the Taylor degree,
    beside the documented bound.

``--rules gpu`` (or ``tpu``) traces every form under that backend's ``"auto"`` rules
(:func:`ssmix.auto_backend`): the blocks, chunks and rematerialisation an accelerator gets, so
their cost can be timed on any device; ``full_auto`` is the Attention layer's default there.

Run ``python benchmarks/attention.py`` (``--small`` for a quick check). Targets:
KAO_KV at 64² ≥ 20× faster than full attention; approx with head dimension 8 and entries
uniform in [−½, ½]: relative error ≤ 1e-2 and fitted time exponent over 256…4096 ≤ 1.3.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssmix  # noqa: E402
from ssmix.kernels.attention import (  # noqa: E402
    kao,
    softmax_attention,
    softmax_block_size,
    tensor_attention,
    tensor_attention_error_bound,
)

# The materialized n × n² scores of the naive method at n = 1024 take 4 GiB in float32.
NAIVE_MAX_BYTES = 2**31
WINDOW = 32


def median_time(fn, *args, reps: int = 5) -> float:
    """Median wall time in seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def temp_bytes(fn, *args) -> int:
    """Temporary memory of the compiled function (beyond its arguments and outputs)."""
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def fit_exponent(ns, times) -> float:
    """Least-squares slope of log(time) on log(n)."""
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ns), np.log(times), 1)[0])


def rel_error(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def bench_kao(sizes, batch: int, channels: int, heads: int) -> None:
    print(f"\n(a) KAO vs full attention: batch {batch}, {channels} channels, {heads} heads")
    print(
        f"{'image':>7} {'L':>6} {'method':<14} {'time ms':>10} {'speed-up':>9} "
        f"{'temp MiB':>10} {'mem ratio':>10}"
    )
    rng = np.random.default_rng(0)
    dh = channels // heads

    def heads_of(x):
        return jnp.swapaxes(x.reshape(x.shape[0], -1, heads, dh), 1, 2)

    def auto(x):
        q = heads_of(x)
        return softmax_attention(q, q, q, block_size=softmax_block_size(*q.shape[:3], q.shape[2]))

    methods = {
        "full": jax.jit(lambda x: softmax_attention(*(heads_of(x),) * 3)),
        "full_blocked": jax.jit(lambda x: softmax_attention(*(heads_of(x),) * 3, block_size=256)),
        "full_auto": jax.jit(auto),
        "KAO_KV": jax.jit(partial(kao, variant="kv", num_heads=heads)),
        "KAO_QKV": jax.jit(partial(kao, variant="qkv", num_heads=heads)),
    }
    for s in sizes:
        x = jnp.asarray(rng.normal(size=(batch, s, s, channels)), jnp.float32)
        base_t = base_m = None
        for name, fn in methods.items():
            t = median_time(fn, x, reps=3 if s >= 64 else 5)
            m = temp_bytes(fn, x)
            base_t = base_t or t
            base_m = base_m or m
            print(
                f"{s:>4}²{'':>2} {s * s:>6} {name:<14} {t * 1e3:>10.2f} {base_t / t:>8.1f}× "
                f"{m / 2**20:>10.2f} {base_m / max(m, 1):>9.1f}×",
                flush=True,
            )


def tensor_inputs(n: int, d: int, seed: int = 0, bound: float = 0.5):
    rng = np.random.default_rng(seed)
    qk = [jnp.asarray(rng.uniform(-bound, bound, (1, n, d)), jnp.float32) for _ in range(3)]
    vs = [jnp.asarray(rng.normal(size=(1, n, d)), jnp.float32) for _ in range(2)]
    return qk + vs


def bench_tensor(ns, approx_ns, d: int) -> None:
    print(
        f"\n(b) tensor attention: batch·heads 1, head dim {d}, q/k entries U[−½, ½], "
        f"simplicial windows w1 = w2 = {WINDOW}"
    )
    methods = {
        "naive": jax.jit(partial(tensor_attention, method="naive")),
        "blocked": jax.jit(partial(tensor_attention, method="blocked")),
        "simplicial": jax.jit(
            partial(tensor_attention, method="simplicial", causal=True, w1=WINDOW, w2=WINDOW)
        ),
        "approx": jax.jit(partial(tensor_attention, method="approx")),
    }
    print(
        f"{'n':>6} {'method':<11} {'time ms':>11} {'vs naive':>9} {'temp MiB':>10} "
        f"{'rel err vs naive':>17}"
    )
    times = {name: ([], []) for name in methods}
    for n in ns:
        args = tensor_inputs(n, d)
        naive_ok = 4 * n**3 <= NAIVE_MAX_BYTES
        ref = methods["naive"](*args) if naive_ok else None
        t_naive = None
        for name, fn in methods.items():
            if name == "naive" and not naive_ok:
                need = f"skipped: the n × n² scores need {4 * n**3 / 2**30:.0f} GiB"
                print(f"{n:>6} {name:<11} {need}")
                continue
            reps = 1 if n >= 1024 and name in ("naive", "blocked") else 3
            t = median_time(fn, *args, reps=reps)
            m = temp_bytes(fn, *args)
            times[name][0].append(n)
            times[name][1].append(t)
            t_naive = t if name == "naive" else t_naive
            ratio = f"{t_naive / t:>8.1f}×" if t_naive else f"{'-':>9}"
            err = "-"
            if ref is not None and name in ("blocked", "approx"):
                err = f"{rel_error(ref, fn(*args)):.2e}"
            print(
                f"{n:>6} {name:<11} {t * 1e3:>11.2f} {ratio} {m / 2**20:>10.2f} {err:>17}",
                flush=True,
            )
    print("fitted time exponents (log time on log n):")
    for name, (n_list, t_list) in times.items():
        print(f"  {name:<11} {fit_exponent(n_list, t_list):5.2f}  over n = {n_list}")

    print("\napprox alone (default degree):")
    print(f"{'n':>6} {'time ms':>10}")
    a_times = []
    for n in approx_ns:
        t = median_time(methods["approx"], *tensor_inputs(n, d), reps=9)
        a_times.append(t)
        print(f"{n:>6} {t * 1e3:>10.3f}", flush=True)
    print(
        f"fitted exponent over n = {list(approx_ns)}: {fit_exponent(approx_ns, a_times):.2f} "
        "(target ≤ 1.3)"
    )


def bench_error(n: int, d: int) -> None:
    print(f"\n(c) approx error vs naive: n = {n}, head dim {d}, q/k entries U[−b, b], float64")
    print(
        f"{'b':>5} {'degree':>7} {'rel err':>10} {'max abs err':>12} {'bound (max abs)':>16} "
        f"{'eps (weights)':>14}"
    )
    with jax.enable_x64(True):
        naive = jax.jit(partial(tensor_attention, method="naive"))
        for bound in (0.25, 0.5, 1.0):
            rng = np.random.default_rng(1)
            args = [jnp.asarray(rng.uniform(-bound, bound, (1, n, d))) for _ in range(3)]
            args += [jnp.asarray(rng.normal(size=(1, n, d))) for _ in range(2)]
            ref = naive(*args)
            for degree in (2, 4, 6):
                got = jax.jit(partial(tensor_attention, method="approx", degree=degree))(*args)
                eps, out_bound = tensor_attention_error_bound(*args, degree=degree)
                abs_err = float(jnp.max(jnp.abs(got - ref)))
                print(
                    f"{bound:>5} {degree:>7} {rel_error(ref, got):>10.2e} {abs_err:>12.2e} "
                    f"{float(jnp.max(out_bound)):>16.2e} {float(eps[0]):>14.2e}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes, quick check")
    parser.add_argument("--part", choices=["all", "kao", "tensor", "error"], default="all")
    parser.add_argument(
        "--rules", choices=ssmix.BACKENDS, default=None, help="auto rules (default: the device's)"
    )
    args = parser.parse_args()
    rules = ssmix.auto_backend(args.rules) if args.rules else contextlib.nullcontext()
    with rules:
        print(
            f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, "
            f"{ssmix.auto_backend()} rules"
        )
        run(args)


def run(args) -> None:
    """The parts of the benchmark chosen on the command line."""
    if args.part in ("all", "kao"):
        bench_kao([8, 16] if args.small else [16, 32, 64], batch=2, channels=64, heads=4)
    if args.part in ("all", "tensor"):
        if args.small:
            bench_tensor([32, 64, 128], [128, 256, 512], d=8)
        else:
            bench_tensor([64, 128, 256, 512, 1024], [256, 512, 1024, 2048, 4096], d=8)
    if args.part in ("all", "error"):
        bench_error(64 if args.small else 256, d=8)


if __name__ == "__main__":
    main()
