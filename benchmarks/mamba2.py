"""Benchmark: the Mamba2 layer's forward pass on CPU, chunked against sequential SSD.

``Mamba2(d_model=256)`` (d_state 64, headdim 64, expand 2: 8 heads, d_conv 4), batch 2,
L = 4096 (``--length``), float32: the jitted forward pass for the ``"chunked"`` and
``"sequential"`` modes (``--modes``), and, with ``--packed``, the same with ``segment_ids``
(8 documents per row); then the SSD core alone at the layer's shapes (8 heads of 64, N 64)
per mode. Median wall time after a warm-up, the ratio to the first row of its kind in the
same run, XLA's planned peak memory. All rows are measured in one process, one after
another. Run ``python benchmarks/mamba2.py`` (``--small`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import compiled, median_time, memory_mb, print_table  # noqa: E402
from ssmix.kernels.ssd import ssd  # noqa: E402
from ssmix.layers.mamba2 import Mamba2  # noqa: E402


def forward(layer: Mamba2, mode: str, packed: bool):
    """``(state, x, ids) -> y`` of the layer in ``mode``."""
    graph, _ = nnx.split(layer)

    def run(state, x, ids):
        model = nnx.merge(graph, state)
        model.mode = mode
        return model(x, segment_ids=ids if packed else None)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--modes", default="chunked,sequential")
    parser.add_argument("--packed", action="store_true", help="also time with segment_ids")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="L = 256, d_model 64")
    args = parser.parse_args(argv)
    if args.small:
        args.length, args.d_model = 256, 64
    layer = Mamba2(args.d_model, rngs=nnx.Rngs(0))
    _, state = nnx.split(layer)
    B, L = args.batch, args.length
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, args.d_model), jnp.float32)
    ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) * 8 // L, (B, L))
    rows, base = [], None
    for packed in (False, True) if args.packed else (False,):
        for mode in args.modes.split(","):
            exe = compiled(forward(layer, mode, packed), state, x, ids)
            t = median_time(exe, state, x, ids, repeats=args.repeats)
            base = t if base is None else base
            label = f"{mode}{' (packed, 8 docs/row)' if packed else ''}"
            rows.append([label, f"{t * 1e3:.1f}", f"{t / base:.2f}", f"{memory_mb(exe):.0f}"])
    # The SSD core alone at the layer's shapes (what the modes differ in).
    H, P, N = layer.nheads, layer.headdim, layer.d_state
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    xs = jax.random.normal(keys[0], (B, L, H, P), jnp.float32)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (B, L, H), jnp.float32) - 4)
    Bm, Cm = (jax.random.normal(k, (B, L, 1, N), jnp.float32) for k in keys[2:])
    A = -jnp.arange(1, H + 1, dtype=jnp.float32)
    core_base = None
    for mode in args.modes.split(","):
        core = lambda xs, dt, A, Bm, Cm, mode=mode: ssd(xs, dt, A, Bm, Cm, method=mode)[0]  # noqa: E731
        exe = compiled(core, xs, dt, A, Bm, Cm)
        t = median_time(exe, xs, dt, A, Bm, Cm, repeats=args.repeats)
        core_base = t if core_base is None else core_base
        rows.append(
            [
                f"{mode}: SSD core only",
                f"{t * 1e3:.1f}",
                f"{t / core_base:.2f}",
                f"{memory_mb(exe):.0f}",
            ]
        )
    print(
        f"Mamba2 forward, d_model {args.d_model}, batch {B}, L {L}, float32, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores)"
    )
    print_table(["mode", "ms", "vs first", "peak MiB"], rows)


if __name__ == "__main__":
    main()
