"""Shared benchmark utilities: compiled timing with a warm-up, compiled memory, table printing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

_START = time.perf_counter()


def progress(text: str) -> None:
    """One progress line on stderr, ``[elapsed s] text``, flushed at once (the results go to
    stdout, so ``> table.md`` keeps only them)."""
    print(f"  [{time.perf_counter() - _START:6.1f} s] {text}", file=sys.stderr, flush=True)


def compiled(fn: Callable[..., Any], *args: Any) -> Any:
    """Compile ``jax.jit(fn)`` for ``args`` ahead of time and return the executable."""
    return jax.jit(fn).lower(*args).compile()


def memory_mb(executable: Any) -> float:
    """Peak memory XLA plans for an executable: arguments + outputs + temporaries, in MiB."""
    stats = executable.memory_analysis()
    if stats is None:
        return float("nan")
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


def median_time(executable: Any, *args: Any, repeats: int = 3) -> float:
    """Median wall time in seconds of ``executable(*args)`` after one warm-up call."""
    jax.block_until_ready(executable(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(executable(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
