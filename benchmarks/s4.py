"""S4D and S4 layers: forward+backward time and peak memory of every mode vs a naive baseline.

For B = 16, H = 128, N = 64 and L ∈ {1024, 4096, 16384} (``--small``: B = 4, H = 32,
L ∈ {256, 1024}) it prints, per layer and mode, the median time of one forward+backward pass
(gradients with respect to the parameters and the input, after a compile / warm-up call), the
speed-up over the naive baseline measured in the same run, and the peak memory of the
compiled computation (temp + argument + output bytes from XLA's memory analysis, so the
figure is per computation, not the process RSS).

The baseline is the textbook S4D: the Vandermonde kernel built as an ``(H, N/2, L)`` tensor of
powers, then an FFT convolution along the length axis of ``(B, L, H)`` padded to ``2L``.
Modes whose compiled peak memory exceeds ``--max-gib`` are skipped (``materialized`` builds
``H·L²`` matrices, so it only runs at the shortest length). For S4, ``fft`` forms the kernel by
blocked powers (the default, ``kernel="auto"``) and ``fft:cauchy`` by Cauchy sums; S4D has one
kernel, so its ``fft:cauchy`` row is not run.

``--rules cpu|gpu|tpu`` traces every form under that backend's ``"auto"`` rules
(:func:`ssmix.auto_backend`; default: the device's own), so one device can time both: e.g. on a
GPU, ``--rules cpu`` forms S4's power-kernel rows by a scan and ``--rules gpu`` by doubling.

Usage: ``python -m benchmarks.s4 [--small] [--reps 5] [--lengths 1024 4096] [--max-gib 3]
[--rules gpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import ssmix
from ssmix.layers.s4 import S4
from ssmix.layers.s4d import S4D

MODES = ("fft", "fft:cauchy", "chunked", "scan", "materialized")


def naive_s4d(layer: S4D):
    """The baseline forward ``x (B, L, H) -> y`` with the layer's parameters (ZOH)."""

    def forward(params, x):
        lay = nnx.merge(nnx.graphdef(layer), params)
        A = jax.lax.complex(-jnp.exp(lay.A_re_log[...]), lay.A_im[...])
        B = lay.B[..., 0] + 1j * lay.B[..., 1]
        C = lay.C[0, ..., 0] + 1j * lay.C[0, ..., 1]
        dtA = jnp.exp(lay.log_dt[...])[:, None] * A
        L = x.shape[1]
        powers = jnp.exp(dtA[:, :, None] * jnp.arange(L))  # (H, N/2, L)
        k = 2 * jnp.real(jnp.einsum("hn,hnl->hl", C * B * (jnp.exp(dtA) - 1) / A, powers))
        n = 2 * L
        y = jnp.fft.irfft(
            jnp.fft.rfft(x, n=n, axis=1) * jnp.fft.rfft(k, n=n, axis=-1).T[None], n=n, axis=1
        )
        return y[:, :L] + lay.D[0] * x

    return forward


def layer_forward(layer):
    graphdef = nnx.graphdef(layer)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x)

    return forward


def fwd_bwd(forward):
    def f(params, x, ct):
        return jax.grad(lambda p, u: jnp.sum(forward(p, u) * ct), argnums=(0, 1))(params, x)

    return jax.jit(f)


def peak_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def measure(forward, params, x, ct, reps: int, max_bytes: float):
    """Median seconds of a jitted forward+backward, and its peak bytes (None if skipped)."""
    compiled = fwd_bwd(forward).lower(params, x, ct).compile()
    peak = peak_bytes(compiled)
    if peak is not None and peak > max_bytes:
        return None, peak
    jax.block_until_ready(compiled(params, x, ct))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x, ct))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes for a quick run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="*")
    parser.add_argument("--max-gib", type=float, default=3.0, help="skip modes above this peak")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--layers", nargs="*", default=["S4D", "S4"])
    parser.add_argument("--rules", choices=ssmix.BACKENDS, help="auto rules (default: device)")
    args = parser.parse_args()
    rules = args.rules or ssmix.auto_backend()
    with ssmix.auto_backend(rules):
        run(args, rules)


def run(args, rules: str) -> None:
    """Print the table for the parsed ``args`` (traced under ``rules``' auto rules)."""
    B, H, N = (4, 32, 64) if args.small else (16, 128, 64)
    lengths = args.lengths or ([256, 1024] if args.small else [1024, 4096, 16384])
    max_bytes = args.max_gib * 2**30
    print(
        f"S4D / S4 forward+backward, B={B} H={H} N={N}, median of {args.reps}, "
        f"{rules} rules, {jax.devices()}"
    )
    header = f"{'L':>6} {'layer':<6} {'mode':<13} {'time ms':>9} {'vs naive':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for L in lengths:
        kx, kc = jax.random.split(jax.random.PRNGKey(L))
        x = jax.random.normal(kx, (B, L, H), jnp.float32)
        ct = jax.random.normal(kc, (B, L, H), jnp.float32)
        ref = S4D(H, N, rngs=nnx.Rngs(0))
        t_naive, m_naive = measure(naive_s4d(ref), nnx.state(ref), x, ct, args.reps, max_bytes)
        print(
            f"{L:>6} {'S4D':<6} {'naive':<13} {t_naive * 1e3:>9.1f} {1.0:>9.2f} "
            f"{m_naive / 2**20:>9.0f}",
            flush=True,
        )
        for name in args.layers:
            cls = {"S4D": S4D, "S4": S4}[name]
            for mode in args.modes:
                base, _, kernel = mode.partition(":")
                if kernel and name != "S4":
                    continue
                extra = {"kernel": kernel} if kernel else {}
                layer = cls(H, N, mode=base, rngs=nnx.Rngs(0), **extra)
                t, peak = measure(
                    layer_forward(layer), nnx.state(layer), x, ct, args.reps, max_bytes
                )
                mib = "?" if peak is None else f"{peak / 2**20:.0f}"
                if t is None:
                    print(f"{L:>6} {name:<6} {mode:<13} {'skipped':>9} {'':>9} {mib:>9}")
                else:
                    print(
                        f"{L:>6} {name:<6} {mode:<13} {t * 1e3:>9.1f} {t_naive / t:>9.2f} {mib:>9}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
