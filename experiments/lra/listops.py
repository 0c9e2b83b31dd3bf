"""Seeded ListOps generator: the LRA procedure and TSV format, reproducible.

The published generator (google-research/long-range-arena, ``lra_benchmarks/data/listops.py``)
draws trees recursively from depth 1: below ``max_depth`` a node is an operator with
probability 0.25 (``random.random() <= 0.25``), otherwise (and always at ``max_depth``) a
digit 0-9; an operator takes ``randint(2, max_args)`` arguments, drawn first, and then its
operator is chosen uniformly from MIN, MAX, MED (``int(np.median)``) and SM (sum mod 10).
The length counts digits, operators and closing brackets (parentheses are not tokens); trees
with ``min_length < length < max_length`` are kept, duplicates dropped. Sources are written
with the published nested parentheses, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``, into
``basic_{train,val,test}.tsv`` with the header ``Source<TAB>Target``.

Differences from the published script, both for reproducibility: randomness comes from one
``random.Random(seed)`` consumed in the published order, and duplicates are removed in
generation order (the original iterates a Python ``set``, whose order varies between runs).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
from pathlib import Path

import numpy as np

from experiments.logs import program_name, setup_logging
from experiments.lra.data import DATA_ROOT

logger = logging.getLogger(__name__)  # experiments.lra.listops

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = range(10)  # the published VALUES; random.choice draws from it
OPERATOR_PROBABILITY = 0.25  # the published VALUE_P: a node is a digit when r > 0.25
SPLITS = ("train", "val", "test")


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10):
    """Draw one tree; returns ``(tree, length)`` with ``tree`` a digit or ``(op, [children])``.

    ``length`` counts the tokens without parentheses: 1 per digit, operator + children + ``]``
    per operator node. Random draws happen in the published order.
    """
    # Bound methods: this recursion is the generator's hot loop.
    uniform, choice, randint = rng.random, rng.choice, rng.randint

    def draw(depth):
        r = uniform() if depth < max_depth else 1.0
        if r > OPERATOR_PROBABILITY:
            return choice(DIGITS), 1
        children, length = [], 2
        for _ in range(randint(2, max_args)):
            child, child_length = draw(depth + 1)
            children.append(child)
            length += child_length
        return (choice(OPERATORS), children), length

    return draw(depth)


def tree_to_source(tree) -> str:
    """The published string form: left-nested pairs, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = f"( {op} {tree_to_source(children[0])} )"
    for child in children[1:]:
        text = f"( {text} {tree_to_source(child)} )"
    return f"( {text} {END} )"


def tree_value(tree) -> int:
    """Evaluate a tree: MIN, MAX, MED (``int(np.median)``, i.e. the floor of the mean of the
    two middle values for an even count) and SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [tree_value(child) for child in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        values.sort()
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) // 2
    return sum(values) % 10


def generate_listops(
    n_samples: int,
    *,
    seed: int,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool | None = False,
) -> list[tuple[str, int]]:
    """``n_samples`` distinct ``(source, target)`` pairs with ``min_length < length < max_length``.

    Deterministic for a given seed (and Python's ``random`` implementation). ``progress``:
    a bar over the samples on stderr (``None``: only when stderr is a terminal).
    """
    if n_samples < 0 or min_length < 0 or max_length <= min_length + 1:
        raise ValueError(
            "need n_samples >= 0 and 0 <= min_length < max_length - 1; got "
            f"n_samples={n_samples}, min_length={min_length}, max_length={max_length}"
        )
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    samples: dict[str, int] = {}
    disable = None if progress is None else not progress
    with tqdm(total=n_samples, desc="ListOps", unit="sample", disable=disable) as bar:
        while len(samples) < n_samples:
            tree, length = generate_tree(rng, 1, max_depth, max_args)
            if min_length < length < max_length:
                source = tree_to_source(tree)
                if source not in samples:
                    samples[source] = tree_value(tree)
                    bar.update(1)
    return list(samples.items())


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write ``Source<TAB>Target`` rows atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)
    os.replace(tmp, path)


def write_listops(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    progress: bool | None = None,
) -> Path:
    """Generate a dataset into ``out_dir/basic_{train,val,test}.tsv`` (the release layout).

    Splits are consecutive slices of one deduplicated, seeded stream, so no source appears
    in two splits. ``progress``: a bar over the samples on stderr (default ``None``: only
    when stderr is a terminal). Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_listops(
        n_train + n_val + n_test, seed=seed, min_length=min_length, max_length=max_length,
        progress=progress,
    )  # fmt: skip
    bounds = np.cumsum([0, n_train, n_val, n_test])
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        write_tsv(out / f"basic_{split}.tsv", rows[lo:hi])
    logger.info("wrote %d ListOps samples to %s", len(rows), out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m experiments.lra.listops --out data/listops-1000 [--n-train N ...]``."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.listops"), description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: data/listops-1000)",
    )
    parser.add_argument("--n-train", type=int, default=96_000)
    parser.add_argument("--n-val", type=int, default=2_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-length", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(DATA_ROOT / "listops-1000")
    setup_logging()
    logger.info(
        "generating %d ListOps samples (%d < length < %d) into %s",
        args.n_train + args.n_val + args.n_test, args.min_length, args.max_length, args.out,
    )  # fmt: skip
    write_listops(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        min_length=args.min_length,
        max_length=args.max_length,
        progress=False if args.no_progress else None,
    )


if __name__ == "__main__":
    main()
