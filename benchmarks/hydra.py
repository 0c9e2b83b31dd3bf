"""Benchmark: the Hydra layer, forward + backward, by quasiseparable method.

(a) ``Hydra(d_model=256)`` (d_state 64, headdim 64, expand 2: 8 heads), batch 8,
    L ∈ {1024, 4096, 16384}: one training step's worth of work (the gradient of a loss of
    the output with respect to every parameter and the input) for the chunked, parallel,
    sequential and materialized methods of :func:`ssmix.kernels.ssd.quasiseparable` (chunk
    size: ``--chunk-size``, else the backend's default). Median time, the ratio to the
    chunked method at the same length, XLA's planned peak memory; the materialized method
    runs only where that plan stays under ``--max-gib``.
(b) The chunked SSD kernel alone (both directions stacked: batch 16, 8 heads of 64, N = 64)
    at L = 4096 over chunk sizes, forward + backward: the measurement behind the default.
(c) The short depthwise convolution (kernel 7) as a sum of shifted slices against XLA's
    depthwise convolution, forward + backward, on Hydra's conv input (batch 8, L = 4096,
    768 channels).

Run ``python benchmarks/hydra.py`` (``--small`` for a quick check). Targets: chunked
at least 3× faster than sequential at L = 4096, and time(16384) / time(4096) ≤ 5 for the
chunked method.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    compiled,
    median_time,
    memory_mb,
    print_table,
    progress,
)
from ssmix.kernels.ssd import default_chunk_size, ssd  # noqa: E402
from ssmix.layers import Hydra  # noqa: E402
from ssmix.layers.mixers import ShortConv  # noqa: E402


def training_step(layer: Hydra):
    """``(state, x) -> gradients`` of ``Σ out·r`` for the layer's parameters and input."""
    graph, state = nnx.split(layer)

    def loss(state, x, r):
        return jnp.sum(nnx.merge(graph, state)(x) * r)

    return state, jax.grad(loss, argnums=(0, 1))


def repeats_for(seconds: float) -> int:
    """Fewer repetitions for slow cases: 5 below a second, 1 above ten."""
    return 5 if seconds < 1 else 3 if seconds < 10 else 1


def timed(step, *args, max_gib: float | None = None):
    """Compile, optionally skip when the memory plan is too large, then time."""
    exe = compiled(step, *args)
    mem = memory_mb(exe)
    if max_gib is not None and mem > max_gib * 1024:
        return None, mem
    first = median_time(exe, *args, repeats=1)
    return median_time(exe, *args, repeats=repeats_for(first)), mem


def bench_layer(lengths, batch, d_model, chunk_size, max_gib, methods):
    chunk = default_chunk_size() if chunk_size is None else chunk_size
    print(f"\n(a) Hydra layer forward + backward: batch {batch}, d_model {d_model}, chunk {chunk}")
    rows, chunked = [], {}
    for L in lengths:
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, L, d_model))
        r = jax.random.normal(jax.random.PRNGKey(1), (batch, L, d_model))
        for method in methods:
            layer = Hydra(d_model, chunk_size=chunk_size, mode=method, rngs=nnx.Rngs(0))
            state, step = training_step(layer)
            limit = max_gib if method == "materialized" else None
            t, mem = timed(step, state, x, r, max_gib=limit)
            if t is None:
                rows.append((L, method, f"skipped (plan {mem / 1024:.1f} GiB)", "", ""))
                progress(f"layer L={L} {method}: skipped (plan {mem / 1024:.1f} GiB)")
                continue
            progress(f"layer L={L} {method}: {t:.3f} s")
            if method == "chunked":
                chunked[L] = t
            ratio = f"{t / chunked[L]:.2f}" if L in chunked else ""
            rows.append((L, method, f"{t:.3f}", ratio, f"{mem:.0f}"))
    print_table(["L", "method", "time s", "× chunked", "memory MiB"], rows)
    pairs = [(a, b) for a, b in zip(lengths, lengths[1:], strict=False) if a in chunked]
    for a, b in pairs:
        if b in chunked:
            print(f"chunked time({b}) / time({a}) = {chunked[b] / chunked[a]:.2f}")


def bench_chunk_sizes(L, batch, heads, P, N, chunk_sizes):
    print(f"\n(b) chunked SSD forward + backward: batch {batch}, L {L}, {heads}×{P} heads, N {N}")
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (batch, L, heads, P))
    dt = jax.nn.softplus(jax.random.normal(k[1], (batch, L, heads)) - 3)
    A = -jnp.ones(heads)
    B, C = (jax.random.normal(kk, (batch, L, 1, N)) / 8 for kk in k[2:4])
    rows, base = [], None
    for Q in chunk_sizes:

        def loss(x, dt, A, B, C, Q=Q):
            y, h = ssd(x, dt, A, B, C, chunk_size=Q, method="chunked")
            return jnp.sum(y) + jnp.sum(h)

        t, mem = timed(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, dt, A, B, C)
        base = t if base is None else base
        rows.append((Q, f"{t:.3f}", f"{t / base:.2f}", f"{mem:.0f}"))
        progress(f"SSD chunk {Q}: {t:.3f} s")
    print_table(["chunk", "time s", f"× chunk {chunk_sizes[0]}", "memory MiB"], rows)


def bench_conv(batch, L, channels, K):
    print(f"\n(c) depthwise conv, kernel {K}, forward + backward: ({batch}, {L}, {channels})")
    graph, params = nnx.split(ShortConv(channels, K, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, L, channels))
    left = (K - 1) // 2

    def xla_conv(x, params):
        y = lax.conv_general_dilated(
            x,
            params["weight"][...][:, None, :],
            (1,),
            [(left, K - 1 - left)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=channels,
        )
        return y + params["bias"][...]

    def slices(x, params):
        return nnx.merge(graph, params)(x)

    rows, base = [], None
    for name, fn in (("shifted slices (ShortConv)", slices), ("lax depthwise conv", xla_conv)):
        step = jax.grad(lambda x, p, fn=fn: jnp.sum(jax.nn.silu(fn(x, p))), argnums=(0, 1))
        t, _ = timed(step, x, params)
        base = t if base is None else base
        rows.append((name, f"{t:.3f}", f"{t / base:.1f}"))
        progress(f"conv {name}: {t:.3f} s")
    print_table(["method", "time s", "× slices"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick run on short sequences")
    parser.add_argument("--max-gib", type=float, default=3.0, help="materialized memory cap")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="default: the backend's (64 on CPU)"
    )
    parser.add_argument(
        "--methods",
        default="chunked,parallel,sequential,materialized",
        help="comma-separated, in order",
    )
    parser.add_argument(
        "--lengths", type=int, nargs="*", help="layer lengths (default 1k, 4k, 16k)"
    )
    parser.add_argument("--layer-only", action="store_true", help="only part (a)")
    args = parser.parse_args()
    methods = tuple(args.methods.split(","))
    if not methods or methods[0] != "chunked":
        parser.error("--methods must start with chunked (the baseline of the ratios)")
    if args.small:
        bench_layer([256, 1024], 2, 64, args.chunk_size, args.max_gib, methods)
        bench_chunk_sizes(1024, 4, 4, 32, 32, [32, 64, 128])
        bench_conv(2, 1024, 192, 7)
    else:
        lengths = args.lengths or [1024, 4096, 16384]
        bench_layer(lengths, 8, 256, args.chunk_size, args.max_gib, methods)
        if args.layer_only:
            return
        bench_chunk_sizes(4096, 16, 8, 64, 64, [32, 64, 128])
        bench_conv(8, 4096, 768, 7)


if __name__ == "__main__":
    main()
