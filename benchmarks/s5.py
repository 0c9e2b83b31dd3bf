"""S5 forward + backward: every scan method, time ratio to the associative scan.

The methods are those of :data:`ssmix.kernels.s5.METHODS`: ``"sequential"``, ``"chunked"``
and ``"parallel"`` (closed-form chunks, no loop: the GPU / TPU rules' choice) against
``"associative"``; ``--chunk-size`` is the chunk length of ``"chunked"`` and ``"parallel"``.

Shapes B = 16, H = 128, P = 64 (stored modes, conjugate symmetric), L ∈ {1024, 4096, 16384}
(``--small``: B = 4, L ∈ {256, 1024}). The loss is ``Σ y²`` of :func:`ssmix.kernels.s5.s5_ssm`
and the gradient is taken with respect to every parameter and the input, so the timing covers
the projections, both scans of the custom VJP and the read-out. The last two columns time the
scan alone (:func:`ssmix.kernels.scan.linear_scan` forward + backward on the complex
``(B, L, P)`` inputs): the projections are the same real matmuls for every method, so they
dilute the scans' ratio in the S5 column.

Run: ``python benchmarks/s5.py [--small] [--bidirectional]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    compiled,
    median_time,
    memory_mb,
    print_table,
    progress,
)
from ssmix.kernels.s5 import METHODS, s5_ssm  # noqa: E402
from ssmix.kernels.scan import linear_scan  # noqa: E402


def _inputs(Bsz, L, H, P, bidirectional):
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    Lambda = jax.lax.complex(-0.5 * jnp.ones(P), -jnp.pi * jnp.arange(P, dtype=jnp.float32))
    B = jax.lax.complex(jax.random.normal(k[0], (P, H)), jax.random.normal(k[1], (P, H))) / H**0.5
    n_out = 2 * P if bidirectional else P
    C = jax.lax.complex(jax.random.normal(k[2], (H, n_out)), jax.random.normal(k[3], (H, n_out)))
    D = jax.random.normal(k[4], (H,))
    step = jnp.exp(jax.random.uniform(k[5], (P,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
    u = jax.random.normal(k[6], (Bsz, L, H))
    return Lambda, B, C, D, step, u


def _loss_grad(method, bidirectional, chunk_size):
    def loss(Lambda, B, C, D, step, u):
        y = s5_ssm(
            Lambda,
            B,
            C,
            D,
            step,
            u,
            bidirectional=bidirectional,
            method=method,
            chunk_size=chunk_size,
        )
        return jnp.sum(y * y)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _scan_grad(method, chunk_size):
    """Forward + backward of the scan alone on the complex ``(B, L, P)`` inputs ``B̄ u``."""

    def loss(a, b):
        states, _ = linear_scan(a, b, method=method, chunk_size=chunk_size)
        return jnp.sum(states.real * states.imag)

    return jax.grad(loss, argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick run at small sizes")
    parser.add_argument("--bidirectional", action="store_true", help="add the backward scan")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk of chunked / parallel")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    Bsz, H, P = (4, 128, 64) if args.small else (16, 128, 64)
    lengths = (256, 1024) if args.small else (1024, 4096, 16384)
    order = ("associative",) + tuple(m for m in METHODS if m != "associative")
    rows = []
    for L in lengths:
        inputs = _inputs(Bsz, L, H, P, args.bidirectional)
        Lambda, _, _, _, step, u = inputs
        scan_inputs = (jnp.exp(step * Lambda), jax.lax.complex(u[..., :P], u[..., P:]))
        base = scan_base = None
        for method in order:
            exe = compiled(_loss_grad(method, args.bidirectional, args.chunk_size), *inputs)
            t = median_time(exe, *inputs, repeats=args.repeats)
            scan_t = median_time(
                compiled(_scan_grad(method, args.chunk_size), *scan_inputs),
                *scan_inputs,
                repeats=args.repeats,
            )
            base = t if base is None else base
            scan_base = scan_t if scan_base is None else scan_base
            rows.append(
                (
                    f"({Bsz}, {L}, {H}) P={P}",
                    method,
                    f"{t * 1e3:.1f}",
                    f"{base / t:.2f}x",
                    f"{memory_mb(exe):.0f}",
                    f"{scan_t * 1e3:.1f}",
                    f"{scan_base / scan_t:.2f}x",
                )
            )
            progress(f"L={L} {method}: S5 {t * 1e3:.1f} ms, scan {scan_t * 1e3:.1f} ms")
    print(
        f"S5 forward+backward, {'bidirectional' if args.bidirectional else 'causal'}, "
        f"float32, chunk_size={args.chunk_size}, device={jax.devices()[0].platform}"
    )
    headers = (
        "u (B, L, H)",
        "method",
        "S5 ms",
        "S5 vs assoc.",
        "S5 MiB",
        "scan ms",
        "scan vs assoc.",
    )
    print_table(headers, rows)


if __name__ == "__main__":
    main()
