"""How each layer's default looks to an accelerator: loop iterations and the largest array.

For every layer's default configuration (and its bidirectional variant where it has one),
trace the forward pass and the gradient with respect to the parameters and the input at
B = 2, L = 16384, H = 64 (``--small``: L = 1024) under the ``"auto"`` rules of each backend
(:func:`ssmix.auto_backend`), and print the sequential loop iterations in the jaxpr and the
largest intermediate array (:func:`ssmix.testing.trace_stats`). Nothing is executed, so this
runs on a CPU host in seconds per layer. The ``cpu`` columns are the forms the CPU rules
pick (as measured on the 2-core CPU); the ``gpu`` / ``tpu`` columns those an accelerator
gets. Targets for the accelerator rules: at most 64 loop iterations and no array over
256 MiB.

Run: ``python benchmarks/accelerator.py [--small] [--length L] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ssmix  # noqa: E402
from benchmarks.common import print_table  # noqa: E402
from ssmix import layers  # noqa: E402
from ssmix.testing import trace_stats  # noqa: E402

MAX_LOOPS = 64
MAX_BYTES = 256 * 2**20


def layer_cases(L: int, H: int) -> dict[str, Callable[[], nnx.Module]]:
    """Constructors of every layer's default configuration at width ``H`` and length ``L``.

    The TensorAttention rows use 8 heads (head dimension 8, where the approximate form is
    accurate) and windows of 64 for the 2-simplicial form.
    """
    r = lambda: nnx.Rngs(0)  # noqa: E731
    side = int(round(L**0.5))
    cases: dict[str, Callable[[], nnx.Module]] = {
        "S4": lambda: layers.S4(H, rngs=r()),
        "S4 bidirectional": lambda: layers.S4(H, bidirectional=True, rngs=r()),
        "S4D": lambda: layers.S4D(H, rngs=r()),
        "S4D bidirectional": lambda: layers.S4D(H, bidirectional=True, rngs=r()),
        "S4PTD": lambda: layers.S4PTD(H, rngs=r()),
        "S5": lambda: layers.S5(H, rngs=r()),
        "S5 bidirectional": lambda: layers.S5(H, bidirectional=True, rngs=r()),
        "S5PTD": lambda: layers.S5PTD(H, rngs=r()),
        "Hydra": lambda: layers.Hydra(H, rngs=r()),
    }
    for kind in layers.mixers.KINDS:
        if kind not in layers.mixers.DATA_INDEPENDENT_ONLY:
            cases[f"MatrixMixer {kind}"] = lambda kind=kind: layers.MatrixMixer(
                H, kind, max_len=L, rngs=r()
            )
    cases["Attention"] = lambda: layers.Attention(H, rngs=r())
    if side * side == L:
        cases["KroneckerAttention"] = lambda: layers.KroneckerAttention(H, (side, side), rngs=r())
    for method in ("blocked", "simplicial", "approx"):
        windows = {"w1": 64, "w2": 64} if method == "simplicial" else {}
        cases[f"TensorAttention {method}"] = lambda method=method, w=windows: (
            layers.TensorAttention(H, num_heads=8, method=method, rngs=r(), **w)
        )
    return cases


#: Rows checked for memory only (their loop counts follow from the method, not a rule).
MEMORY_ONLY = ("TensorAttention blocked", "TensorAttention simplicial", "TensorAttention approx")


def train_step_stats(make: Callable[[], nnx.Module], B: int, L: int, H: int, backend: str):
    """:class:`~ssmix.testing.TraceStats` of ``grad(Σ layer(x)²)`` w.r.t. params and ``x``."""
    with ssmix.auto_backend(backend):
        graphdef, state = nnx.split(make())

        def loss(state, x):
            y = nnx.merge(graphdef, state)(x)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        x = jax.ShapeDtypeStruct((B, L, H), jnp.float32)
        return trace_stats(jax.grad(loss, argnums=(0, 1)), state, x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="L = 1024")
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    parser.add_argument("--backends", nargs="*", default=list(ssmix.BACKENDS))
    args = parser.parse_args(argv)
    L = args.length or (1024 if args.small else 16384)
    B, H = args.batch, args.features
    print(f"forward + backward traced at B={B}, L={L}, H={H} (loops: sequential iterations)")
    headers = ["layer"]
    for b in args.backends:
        headers += [f"{b} loops", f"{b} largest MiB"]
    headers.append("accelerator target")
    rows = []
    for name, make in layer_cases(L, H).items():
        if args.only and name not in args.only:
            continue
        row, ok = [name], True
        for backend in args.backends:
            stats = train_step_stats(make, B, L, H, backend)
            row += [str(stats.loop_iterations), f"{stats.largest_bytes / 2**20:.0f}"]
            if backend != "cpu":
                loops_ok = name in MEMORY_ONLY or stats.loop_iterations <= MAX_LOOPS
                ok = ok and loops_ok and stats.largest_bytes <= MAX_BYTES
                ok = ok and stats.unknown_loops == 0
        row.append("met" if ok else "MISSED")
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)
    print_table(headers, rows)


if __name__ == "__main__":
    main()
