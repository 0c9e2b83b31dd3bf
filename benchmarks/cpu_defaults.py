"""CPU speed of each layer's default, this tree against a baseline checkout, in one run.

The accelerator rules of ``ssmix.auto_backend`` must leave the CPU untouched. This script
times the forward pass and the gradient (with respect to every parameter and the input) of
the default configuration of S4D, S4, S5 and Hydra at L ∈ {1024, 4096, 16384} (B = 8,
H = 128; ``--small``: B = 2, H = 32, L ∈ {256, 1024}) in fresh processes, alternating between
this tree and ``--baseline`` (a checkout of an earlier commit, e.g. made with
``git worktree add /tmp/ssmix-base <commit>``), and prints both medians and their ratio.
``--layers`` takes any layer name of ``ssmix.layers`` built as ``Layer(H)``, or
``MatrixMixer:<kind>`` (with ``max_len = L``).

Run: ``python benchmarks/cpu_defaults.py --baseline /tmp/ssmix-base [--small]`` (without
``--baseline`` it times this tree alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
LAYERS = ("S4D", "S4", "S5", "Hydra")


def _worker(layer: str, L: int, B: int, H: int, repeats: int) -> None:
    """Time one layer in this process (ssmix imported from ``sys.path[0]``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import ssmix
    from benchmarks.common import compiled, median_time
    from ssmix import layers

    name, _, kind = layer.partition(":")
    if name == "MatrixMixer":
        model = layers.MatrixMixer(H, kind, max_len=L, rngs=nnx.Rngs(0))
    else:
        model = getattr(layers, name)(H, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state, x):
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x)))

    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, H))
    exe = compiled(jax.grad(loss, argnums=(0, 1)), state, x)
    seconds = median_time(exe, state, x, repeats=repeats)
    print(json.dumps({"seconds": seconds, "source": ssmix.__file__}))


def _time(tree: Path, layer: str, L: int, B: int, H: int, repeats: int) -> float:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{HERE}", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", layer, str(L)]
    cmd += ["--batch", str(B), "--features", str(H), "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not Path(result["source"]).resolve().is_relative_to(tree):
        raise RuntimeError(f"the worker imported ssmix from {result['source']}, not {tree}")
    return result["seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout of the commit to compare with")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--layers", nargs="*", default=list(LAYERS))
    parser.add_argument("--lengths", type=int, nargs="*")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--features", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("LAYER", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    B = args.batch or (2 if args.small else 8)
    H = args.features or (32 if args.small else 128)
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), B, H, args.repeats)
        return
    lengths = args.lengths or ([256, 1024] if args.small else [1024, 4096, 16384])
    sys.path.insert(0, str(HERE))
    from benchmarks.common import print_table

    print(f"default forward + backward on CPU, B={B} H={H}, median of {args.repeats}")
    if args.baseline is None:
        print("(no --baseline given: this tree only)")
    rows = []
    for L in lengths:
        for layer in args.layers:
            new = _time(HERE, layer, L, B, H, args.repeats)
            row = [L, layer, f"{new * 1e3:.1f}"]
            if args.baseline is not None:
                base = _time(args.baseline.resolve(), layer, L, B, H, args.repeats)
                row[2:2] = [f"{base * 1e3:.1f}"]
                row.append(f"{new / base:.2f}")
            rows.append(row)
            print(f"  {layer} L={L}: done", file=sys.stderr, flush=True)
    headers = ["L", "layer", "this tree ms"]
    if args.baseline is not None:
        headers = ["L", "layer", "baseline ms", "this tree ms", "this / baseline"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
