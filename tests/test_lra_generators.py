"""ListOps and Pathfinder generators: the published procedure, statistics, layout, seeds."""

import csv
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from experiments.lra import data as lra
from experiments.lra.listops import generate_listops, write_listops
from experiments.lra.pathfinder import PathfinderStyle, generate_sample, write_pathfinder


def _published_listops(seed, n, min_length=500, max_length=2000):
    """A direct transcription of the LRA script's tree drawing (nested pairs, VALUE_P 0.25,
    operator chosen after the arguments), driven by random.Random(seed), deduplicated in
    generation order."""
    ops = ["[MIN", "[MAX", "[MED", "[SM"]

    def tree(depth):
        r = rng.random() if depth < 10 else 1
        if r > 0.25:
            return rng.choice(range(10)), 1
        length, values = 2, []
        for _ in range(rng.randint(2, 10)):
            sub, sub_length = tree(depth + 1)
            values.append(sub)
            length += sub_length
        t = (rng.choice(ops), values[0])
        for v in values[1:]:
            t = (t, v)
        return (t, "]"), length

    def to_string(t):
        if isinstance(t, (str, int)):
            return str(t)
        return "( " + to_string(t[0]) + " " + to_string(t[1]) + " )"

    rng = random.Random(seed)
    out = {}
    while len(out) < n:
        t, length = tree(1)
        if min_length < length < max_length:
            out.setdefault(to_string(t), None)
    return list(out)


def _evaluate(tokens):
    """Independent ListOps evaluator over the parenthesis-free token list (a stack)."""
    stack = [[None, []]]
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok, []])
        elif tok == "]":
            op, args = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda a: int(np.median(a)),
                "[SM": lambda a: sum(a) % 10,
            }[op](args)
            stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(tok))
    assert len(stack) == 1 and len(stack[0][1]) == 1
    return stack[0][1][0]


@pytest.fixture(scope="module")
def listops_rows():
    return generate_listops(200, seed=7)


def test_listops_matches_published_procedure(listops_rows):
    assert [s for s, _ in listops_rows[:40]] == _published_listops(7, 40)


def test_listops_statistics(listops_rows):
    sources = [s for s, _ in listops_rows]
    assert len(set(sources)) == len(sources)
    tokens = [[t for t in s.split() if t not in "()"] for s in sources]
    lengths = np.array([len(t) for t in tokens])
    assert lengths.min() > 500 and lengths.max() < 2000
    assert np.median(lengths) < 1300  # the tree-size distribution favours the short end
    for toks, (_, target) in zip(tokens, listops_rows, strict=True):
        assert _evaluate(toks) == target
    counts = Counter(t for _, t in listops_rows)
    assert set(counts) == set(range(10))
    # As in the released data, the extreme digits (MIN/MAX outcomes) are the most common
    # labels, but no class dominates.
    assert max(counts.values()) / len(listops_rows) < 0.3
    assert counts[0] + counts[9] > 2 * len(listops_rows) / 10


def test_listops_seeds_and_files(tmp_path):
    assert generate_listops(5, seed=1) == generate_listops(5, seed=1)
    assert generate_listops(5, seed=1) != generate_listops(5, seed=2)
    root = write_listops(tmp_path / "lo", n_train=6, n_val=2, n_test=3, seed=1)
    with open(root / "basic_train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["Source", "Target"] and len(rows) == 7
    data = lra.load_listops(root)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 3)
    all_rows = generate_listops(11, seed=1)
    assert [r[0] for r in rows[1:]] == [s for s, _ in all_rows[:6]]
    assert data.test.labels.tolist() == [t for _, t in all_rows[8:]]
    with pytest.raises(ValueError, match="min_length"):
        generate_listops(3, seed=0, min_length=10, max_length=11)


def _point_distance(a, b):
    return float(np.min(np.linalg.norm(a[:, None] - b[None], axis=-1)))


def _dense(curve):
    return np.concatenate([np.linspace(p0, p1, 8) for p0, p1 in curve])


@pytest.mark.parametrize("resolution", [32, 128])
def test_pathfinder_samples(resolution):
    style = PathfinderStyle()
    labels = []
    for i in range(12):
        s = generate_sample(np.random.default_rng([3, i]), resolution, style)
        labels.append(s.label)
        assert s.pixels.shape == (resolution, resolution) and s.pixels.dtype == np.uint8
        assert len(s.curves) == 2 and all(len(c) == style.contour_length for c in s.curves)
        ends = [(c[0][0], c[-1][1]) for c in s.curves]
        on = [
            [min(np.linalg.norm(m - e) for e in curve_ends) < 1e-9 for curve_ends in ends]
            for m in s.markers
        ]
        if s.label:  # both markers on the two ends of one curve
            assert on[0][0] and on[1][0]
            assert np.linalg.norm(s.markers[0] - s.markers[1]) > 0
        else:  # one marker on each long curve
            assert on[0][0] and on[1][1]
        # Different curves never touch, so connectivity is only decided along a curve.
        curves = [_dense(c) for c in s.curves + s.distractors]
        gap = min(
            _point_distance(curves[a], curves[b])
            for a in range(len(curves))
            for b in range(a + 1, len(curves))
        )
        assert gap >= style.separation * resolution - 1.5
        assert s.pixels.max() == 255 and (s.pixels > 0).mean() < 0.5
    assert 0 < sum(labels) < len(labels)


def test_pathfinder_layout_and_seed(tmp_path):
    root = write_pathfinder(tmp_path / "pf", n_samples=7, resolution=32, seed=5, per_folder=4)
    base = root / lra.PATHFINDER_DIFFICULTY
    assert sorted(p.name for p in (base / "metadata").iterdir()) == ["0.npy", "1.npy"]
    rows = (base / "metadata" / "1.npy").read_text().splitlines()
    fields = rows[0].split()
    assert fields[:3] == ["imgs/1", "sample_4.png", "4"] and fields[3] in ("0", "1")
    data = lra.load_task("pathfinder", root)
    assert len(data.train) + len(data.val) + len(data.test) == 7
    again = write_pathfinder(tmp_path / "pf2", n_samples=7, resolution=32, seed=5, per_folder=4)
    img = base / "imgs/1/sample_5.png"
    twin = again / lra.PATHFINDER_DIFFICULTY / "imgs/1/sample_5.png"
    np.testing.assert_array_equal(np.asarray(Image.open(img)), np.asarray(Image.open(twin)))
    other = generate_sample(np.random.default_rng([6, 5]), 32).pixels
    assert not np.array_equal(np.asarray(Image.open(img)), other)
    with pytest.raises(ValueError, match="n_samples > 0"):
        write_pathfinder(tmp_path / "x", n_samples=0)
