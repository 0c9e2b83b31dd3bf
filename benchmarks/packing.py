"""Benchmark: packed sequences (``segment_ids``) against padded batches, on a training step.

A corpus of documents with log-normal lengths (median 200 tokens, σ 0.8, capped at 1024;
``--tokens`` valid tokens in all) goes through a causal token model, ``SequenceModel(head=
"token")`` with 2 blocks of width 64, vocabulary 256, one epoch of loss-and-gradient steps
(next-token cross-entropy on valid positions). Three ways to batch the same documents:

- ``pad to max_len``: one document per row, every row padded to 1024 (a mask);
- ``pad to batch max``: one document per row, padded to the longest in its batch, rounded up
  to a multiple of 128 (fewer shapes to compile);
- ``packed``: documents concatenated in order into rows of 1024 (a document that does not fit
  starts the next row), ``segment_ids`` marking them, the row's tail masked.

Padded batches hold 8 documents; packed batches 4 rows (about the same valid tokens per step
at the median length). Per mixer (S4D, whose ``"auto"`` mode runs its ``"chunked"`` form on
packed rows, and Mamba2): valid tokens per second over the epoch (the sum of each step's
time after every shape was compiled and warmed up), the share of computed positions that are
valid, and the speed-up over the first row in the same run.
Run ``python benchmarks/packing.py`` (``--small`` for a quick check).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, progress  # noqa: E402
from ssmix.blocks import SequenceModel  # noqa: E402
from ssmix.layers import S4D, Mamba2  # noqa: E402

MAX_LEN = 1024
VOCAB = 256


def corpus(total_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """Documents of log-normal length (median 200, σ 0.8, in [2, MAX_LEN]) with random tokens."""
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < total_tokens:
        length = int(np.clip(rng.lognormal(np.log(200), 0.8), 2, MAX_LEN))
        docs.append(rng.integers(1, VOCAB, length, dtype=np.int32))
        n += length
    return docs


def padded_batches(docs, batch: int, multiple: int | None):
    """One document per row; padded to ``MAX_LEN`` (``multiple=None``) or to the batch's longest
    rounded up to ``multiple``. Yields ``(tokens, mask, None)``."""
    for i in range(0, len(docs), batch):
        group = docs[i : i + batch]
        longest = max(len(d) for d in group)
        width = MAX_LEN if multiple is None else min(-(-longest // multiple) * multiple, MAX_LEN)
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        for r, d in enumerate(group):
            tokens[r, : len(d)], mask[r, : len(d)] = d, True
        yield tokens, mask, None


def packed_rows(docs):
    """Documents concatenated in order into rows of ``MAX_LEN``: ``(tokens, mask, ids)`` per
    row, ids counting documents within the row, the unused tail masked (its id repeats the
    last document's, so no extra segment starts there)."""
    rows, current = [], []
    for d in docs:
        if sum(len(c) for c in current) + len(d) > MAX_LEN:
            rows.append(current)
            current = []
        current.append(d)
    rows.append(current)
    for row in rows:
        tokens = np.zeros(MAX_LEN, np.int32)
        mask = np.zeros(MAX_LEN, bool)
        ids = np.zeros(MAX_LEN, np.int32)
        t = 0
        for k, d in enumerate(row):
            tokens[t : t + len(d)], mask[t : t + len(d)], ids[t : t + len(d)] = d, True, k
            t += len(d)
        ids[t:] = len(row) - 1
        yield tokens, mask, ids


def packed_batches(docs, batch: int):
    rows = list(packed_rows(docs))
    for i in range(0, len(rows), batch):
        group = rows[i : i + batch]
        group += [
            (np.zeros(MAX_LEN, np.int32), np.zeros(MAX_LEN, bool), np.zeros(MAX_LEN, np.int32))
        ] * (batch - len(group))
        yield tuple(np.stack(parts) for parts in zip(*group, strict=True))


def make_model(kind: str, d_model: int) -> SequenceModel:
    if kind == "s4d":
        factory = functools.partial(S4D, d_state=32)
    else:
        factory = functools.partial(Mamba2, d_state=32, headdim=32, expand=2)
    return SequenceModel(
        lambda d, rngs: factory(d, rngs=rngs),
        n_layers=2,
        d_model=d_model,
        n_classes=VOCAB,
        vocab_size=VOCAB,
        head="token",
        rngs=nnx.Rngs(0),
    )


def step_fn(model: SequenceModel, packed: bool):
    """``(params, tokens, mask, ids) -> (loss, grads)``: next-token cross-entropy on valid
    positions whose successor is valid and in the same document."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tokens, mask, ids):
        m = nnx.merge(graph, params, rest)
        logits = m(tokens, mask, segment_ids=ids) if packed else m(tokens, mask)
        keep = mask[:, :-1] & mask[:, 1:]
        if packed:
            keep = keep & (ids[:, :-1] == ids[:, 1:])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1)

    return jax.jit(jax.value_and_grad(loss)), params


def epoch_time(step, params, batches, packed: bool) -> tuple[float, int, int]:
    """Seconds for one pass over ``batches`` (each shape compiled and warmed up first), valid
    tokens and computed positions."""
    batches = [tuple(None if a is None else jnp.asarray(a) for a in b) for b in batches]
    seen = set()
    for tokens, mask, ids in batches:
        if tokens.shape not in seen:
            seen.add(tokens.shape)
            jax.block_until_ready(step(params, tokens, mask, ids))
    start = time.perf_counter()
    for tokens, mask, ids in batches:
        jax.block_until_ready(step(params, tokens, mask, ids))
    elapsed = time.perf_counter() - start
    valid = sum(int(m.sum()) for _, m, _ in batches)
    computed = sum(int(m.size) for _, m, _ in batches)
    return elapsed, valid, computed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=60_000, help="valid tokens in the corpus")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--mixers", default="s4d,mamba2")
    parser.add_argument("--small", action="store_true", help="6000 tokens, d_model 32")
    args = parser.parse_args(argv)
    if args.small:
        args.tokens, args.d_model = 6000, 32
    docs = corpus(args.tokens)
    lengths = np.array([len(d) for d in docs])
    progress(
        f"{len(docs)} documents, {lengths.sum()} tokens, median length {int(np.median(lengths))}"
    )
    rows = []
    for kind in args.mixers.split(","):
        model = make_model(kind, args.d_model)
        base = None
        plans = [
            ("pad to max_len", False, lambda: padded_batches(docs, 8, None)),
            ("pad to batch max", False, lambda: padded_batches(docs, 8, 128)),
            ("packed", True, lambda: packed_batches(docs, 4)),
        ]
        for name, packed, batches in plans:
            progress(f"{kind}: {name}")
            step, params = step_fn(model, packed)
            seconds, valid, computed = epoch_time(step, params, list(batches()), packed)
            rate = valid / seconds
            base = base or rate
            rows.append(
                [kind, name, f"{valid / computed:.0%}", f"{seconds:.2f}", f"{rate:,.0f}",
                 f"{rate / base:.2f}"]
            )  # fmt: skip
    print_table(["mixer", "batches", "valid share", "epoch s", "valid tokens/s", "speed-up"], rows)


if __name__ == "__main__":
    main()
