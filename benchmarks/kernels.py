"""Forward+backward time of the FFT convolution and of every linear_scan method.

Problem: H = 128 features, N = 64 complex modes per feature, so the recurrence
has a state of shape (H, N) per sequence and `b`, the states and their cotangents are each
B·L·H·N complex64 values. At B = 16 that is 1 GiB per tensor at L = 1024 and 16 GiB at
L = 16384, more than this 24 GiB machine can hold for a forward+backward pass, so the batch
shrinks as L grows to keep B·L = 16384 tokens per call (B = 16, 4, 1 for L = 1024, 4096,
16384). The FFT convolution runs on `u (B, L, H)` with a kernel `(H, L)`, the convolution
an LTI state space layer of the same shape reduces to. Ratios are to the sequential scan
measured in the same run.

    python benchmarks/kernels.py            # the full table
    python benchmarks/kernels.py --small    # seconds, for make demo and smoke tests
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import compiled, median_time, memory_mb, print_table, progress  # noqa: E402

from ssmix.kernels.fftconv import fft_conv  # noqa: E402
from ssmix.kernels.scan import METHODS, linear_scan  # noqa: E402


def scan_loss(method: str, chunk_size: int):
    def loss(a, b):
        states, _ = linear_scan(a, b, method=method, chunk_size=chunk_size)
        return jnp.sum(jnp.real(states))

    return jax.value_and_grad(loss, argnums=(0, 1))


def conv_loss(u, k):
    return jnp.sum(fft_conv(u, k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes, for smoke runs")
    parser.add_argument("--tokens", type=int, default=16384, help="B·L per call")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.small:
        H, N, tokens, lengths = 16, 16, 2048, args.lengths or [256, 1024]
    else:
        H, N, tokens, lengths = 128, 64, args.tokens, args.lengths or [1024, 4096, 16384]

    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
    rows = []
    key = jax.random.PRNGKey(0)
    for L in lengths:
        B = max(1, tokens // L)
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, L), 3)
        # A stable diagonal decay, as a ZOH-discretised S4D layer would produce.
        a = jnp.exp(
            -0.5 * 0.01 + 1j * 0.01 * jnp.pi * jnp.arange(N)[None, :] * jnp.ones((H, 1))
        ).astype(jnp.complex64)
        b = (jax.random.normal(k1, (B, L, H, N)) + 1j * jax.random.normal(k2, (B, L, H, N))).astype(
            jnp.complex64
        )
        u = jax.random.normal(k3, (B, L, H))
        kern = jax.random.normal(k1, (H, L)) / L
        results = {}
        for method in METHODS:
            exe = compiled(scan_loss(method, args.chunk_size), a, b)
            results[f"scan {method}"] = (
                median_time(exe, a, b, repeats=args.repeats),
                memory_mb(exe),
            )
            del exe
            progress(f"L={L} B={B} scan {method}: {results[f'scan {method}'][0] * 1e3:.1f} ms")
        exe = compiled(jax.value_and_grad(conv_loss, argnums=(0, 1)), u, kern)
        results["fft_conv"] = (median_time(exe, u, kern, repeats=args.repeats), memory_mb(exe))
        progress(f"L={L} B={B} fft_conv: {results['fft_conv'][0] * 1e3:.1f} ms")
        base = results["scan sequential"][0]
        fastest = min(t for name, (t, _) in results.items() if name.startswith("scan"))
        for name, (t, mem) in results.items():
            rows.append(
                [
                    L,
                    B,
                    name,
                    f"{t * 1e3:.1f}",
                    f"{base / t:.2f}x",
                    f"{t / fastest:.2f}",
                    f"{mem:.0f}",
                ]
            )
        del b
    print(
        f"H = {H}, N = {N} complex modes, B·L = {tokens}, chunk_size = {args.chunk_size}; "
        "forward+backward"
    )
    print_table(
        [
            "L",
            "B",
            "method",
            "median ms",
            "speed-up vs sequential",
            "time / fastest scan",
            "XLA memory MiB",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
