"""Build ssmix/data/ptd_cache.npz: the packaged PTD tables of HiPPO-LegS (``ssmix.hippo.ptd``).

Usage: ``python scripts/build_ptd_cache.py [--sizes 8 16 ...] [--output PATH]``.

Computes ``ptd("legs", N)`` with its default arguments for every N in
``ssmix.hippo.PTD_CACHE_SIZES`` (about 25 minutes on one core, most of it N = 256), writes the
tables and prints their quality figures. BLAS is pinned to one thread before NumPy and JAX
load, and the archive is written with fixed timestamps, so a rerun on the same software stack
reproduces the file byte for byte.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # thread count changes BLAS rounding, hence the optimisation path

import argparse  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ssmix import hippo  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "ssmix" / "data" / hippo.PTD_CACHE_FILE


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but deterministic: sorted entries, fixed timestamps, no compression."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue()
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(hippo.PTD_CACHE_SIZES))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    opts = parser.parse_args()

    arrays: dict[str, np.ndarray] = {}
    rows = []
    for N in opts.sizes:
        start = time.perf_counter()
        arrays.update(hippo.ptd_cache_entry("legs", N))
        seconds = time.perf_counter() - start
        lam_raw, V, step = (arrays[f"legs_{N}_{k}"] for k in ("Lambda", "V", "step"))
        _, info = hippo.ptd_from_table("legs", N, lam_raw, V, int(step), cached=True)
        rows.append((N, info, seconds))
        print(f"N = {N:3d} done in {seconds:6.1f} s", flush=True)

    write_npz(opts.output, arrays)
    print(f"\nwrote {opts.output} ({opts.output.stat().st_size / 1024:.0f} KiB)\n")
    print(
        "| N | κ(V) | ‖E‖₂/‖A‖₂ | ‖VΛV⁻¹ − A‖₂/‖A‖₂ | max Re Λ (before fix) | max Re Λ "
        "| step | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for N, info, seconds in rows:
        print(
            f"| {N} | {info.kappa:.2f} | {info.perturbation:.4f} | {info.error:.4f} | "
            f"{info.max_real_before_fix:.3g} | {info.max_real:.3g} | {info.step} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
