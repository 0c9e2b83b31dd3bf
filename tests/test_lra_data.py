"""LRA loaders on tiny fixtures written in the published layouts, and host batching."""

import pickle

import numpy as np
import pytest
from PIL import Image

from experiments.lra import data as lra


def _write_listops(root, rows=None):
    root.mkdir(parents=True, exist_ok=True)
    rows = rows or {
        "train": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [SM 4 ) ( ( [MIN 7 ) 3 ) ) ] )", 1)],
        "val": [("( ( ( [MED 1 ) 5 ) ] )", 3)],
        "test": [("7", 7)],
    }
    for split, items in rows.items():
        lines = ["Source\tTarget"] + [f"{s}\t{t}" for s, t in items]
        (root / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_listops_loader(tmp_path):
    data = lra.load_listops(_write_listops(tmp_path / "listops-1000"))
    assert (len(data.train), len(data.val), len(data.test)) == (2, 1, 1)
    assert data.n_classes == 10 and data.vocab_size == 17 and data.kind == "tokens"
    v = lra.LISTOPS_VOCAB
    first = data.train.inputs.values[: data.train.inputs.offsets[1]]
    assert first.tolist() == [v["[MAX"], v["2"], v["9"], v["]"], lra.EOS]
    assert data.train.labels.tolist() == [9, 1]
    # Truncation keeps max_len tokens, the last one the end token.
    short = lra.load_listops(tmp_path / "listops-1000", max_len=3)
    assert short.train.inputs.lengths.tolist() == [3, 3]


@pytest.mark.parametrize(
    "content, message",
    [
        ("Source\tTarget\n( [MAX 2 ] )\t12\n", "outside 0-9"),
        ("Source\tTarget\n( [MAX 2 ] )\tx\n", "not an integer"),
        ("Source\tTarget\n( [FOO 2 ] )\t1\n", "unknown ListOps token '\\[FOO'"),
        ("Source\tTarget\n( [MAX 2 ] )\n", "expected 2 tab-separated fields"),
        ("Src\tTgt\n( [MAX 2 ] )\t1\n", "expected the header"),
        ("Source\tTarget\n", "no samples"),
    ],
)
def test_listops_malformed(tmp_path, content, message):
    root = _write_listops(tmp_path)
    (root / "basic_val.tsv").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        lra.load_listops(root)
    assert "basic_val.tsv" in str(info.value)


def test_missing_data_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        lra.load_task("listops", tmp_path / "nowhere")
    text = str(info.value)
    assert "nowhere" in text and "basic_train.tsv" in text and "listops-1000" in text
    for task in ("text", "retrieval", "image", "pathfinder", "pathx"):
        with pytest.raises(FileNotFoundError, match=lra.LAYOUTS[task][0]):
            lra.load_task(task, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="task must be one of"):
        lra.load_task("mnist")


def _write_imdb(root):
    for split in ("train", "test"):
        for label, text in (("pos", "great film é"), ("neg", "dull")):
            folder = root / split / label
            folder.mkdir(parents=True)
            (folder / "0_9.txt").write_text(text, encoding="utf-8")
            (folder / "1_8.txt").write_text(text + "!", encoding="utf-8")
    return root


def test_text_loader(tmp_path):
    data = lra.load_text(_write_imdb(tmp_path / "aclImdb"), max_len=6)
    assert len(data.train) == 4 and data.val is data.test
    assert data.train.labels.tolist() == [0, 0, 1, 1]  # neg first, then pos, files sorted
    first = data.train.inputs.values[: data.train.inputs.offsets[1]]
    assert first.tolist() == [b + lra.BYTE_OFFSET for b in b"dull"] + [lra.EOS]
    full = lra.load_text(tmp_path / "aclImdb")
    pos = full.train.inputs.values[full.train.inputs.offsets[2] : full.train.inputs.offsets[3]]
    assert len(pos) == len("great film é".encode()) + 1  # UTF-8 bytes, not characters
    (tmp_path / "aclImdb" / "test" / "neg" / "2_1.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="2_1.txt: not valid UTF-8"):
        lra.load_text(tmp_path / "aclImdb")


def _write_aan(root, bad_line=None):
    root.mkdir(parents=True)
    for name in ("train", "eval", "test"):
        lines = ['1.0\tid1\tid2\tpaper "one"\tpaper two', "0\tid3\tid4\tabc\td"]
        if bad_line and name == "eval":
            lines.append(bad_line)
        (root / f"new_aan_pairs.{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_retrieval_loader(tmp_path):
    data = lra.load_retrieval(_write_aan(tmp_path / "tsv_data"))
    assert data.paired and len(data.val) == 2 and data.val.labels.tolist() == [1, 0]
    assert data.train.inputs.lengths.tolist() == [len('paper "one"') + 1, 4]
    assert data.train.inputs2.lengths.tolist() == [len("paper two") + 1, 2]
    batch = lra.make_batch(data, data.train, np.array([0, 1]), pad_multiple=8)
    assert batch["x"].shape == batch["x2"].shape == (2, 16)
    assert batch["mask2"].sum(1).tolist() == [10, 2]


@pytest.mark.parametrize(
    "line, message",
    [("2\ta\tb\tc\td", "not 0 or 1"), ("1\ta\tb\tc", "expected 5 tab-separated"),
     ("yes\ta\tb\tc\td", "not a number")],
)  # fmt: skip
def test_retrieval_malformed(tmp_path, line, message):
    root = _write_aan(tmp_path / "tsv_data", bad_line=line)
    with pytest.raises(ValueError, match=message) as info:
        lra.load_retrieval(root)
    assert "new_aan_pairs.eval.tsv:3" in str(info.value)


def _write_cifar(root, n=4):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_image_loader(tmp_path):
    root = _write_cifar(tmp_path / "cifar-10-batches-py")
    data = lra.load_image(root, val_size=3)
    assert (len(data.train), len(data.val), len(data.test)) == (17, 3, 4)
    assert data.kind == "pixels" and data.max_len == 1024
    with open(root / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    rgb = raw[b"data"][0].reshape(3, 1024).astype(float)
    gray = np.round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert data.test.inputs.values[:1024].tolist() == gray.astype(np.uint8).tolist()
    batch = lra.make_batch(data, data.test, np.array([0]), pad_multiple=1024)
    assert batch["x"].shape == (1, 1024, 1) and batch["x"].dtype == np.float32
    np.testing.assert_allclose(batch["x"][0, :, 0], (gray / 255 - 0.5) / 0.5, atol=1e-6)
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10"):
        lra.load_image(root, val_size=3)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\)"):
        lra.load_image(root, val_size=3)


def _write_pathfinder(root, resolution, n_folders=2, per=5):
    base = root / lra.PATHFINDER_DIFFICULTY
    (base / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for b in range(n_folders):
        (base / "imgs" / str(b)).mkdir(parents=True)
        rows = []
        for i in range(per):
            px = rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
            Image.fromarray(px, mode="L").save(base / "imgs" / str(b) / f"sample_{i}.png")
            rows.append(f"imgs/{b} sample_{i}.png {i} {i % 2} 14 1.5 5\n")
        (base / "metadata" / f"{b}.npy").write_text("".join(rows))
    return root


@pytest.mark.parametrize("task, resolution", [("pathfinder", 32), ("pathx", 128)])
def test_pathfinder_loader(tmp_path, task, resolution):
    root = _write_pathfinder(tmp_path / f"pathfinder{resolution}", resolution)
    data = lra.load_task(task, root)
    assert data.task == task and data.max_len == resolution**2
    assert (len(data.train), len(data.val), len(data.test)) == (8, 1, 1)
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 4
    # Every image reaches the split intact (pixels match the file of its metadata row).
    img = np.asarray(Image.open(root / lra.PATHFINDER_DIFFICULTY / "imgs/0/sample_0.png"))
    rows = np.concatenate(
        [s.inputs.values.reshape(-1, resolution**2) for s in (data.train, data.val, data.test)]
    )
    assert any((r == img.reshape(-1)).all() for r in rows)


def test_pathfinder_malformed(tmp_path):
    root = _write_pathfinder(tmp_path / "pathfinder32", 32)
    meta = root / lra.PATHFINDER_DIFFICULTY / "metadata" / "1.npy"
    meta.write_text("imgs/1 sample_0.png 0 7 14\n")
    with pytest.raises(ValueError, match="1.npy:1: label"):
        lra.load_task("pathfinder", root)
    meta.write_text("imgs/1 sample_9.png 0 1 14\n")
    with pytest.raises(ValueError, match="sample_9.png listed in the metadata does not exist"):
        lra.load_task("pathfinder", root)
    meta.write_text("imgs/1 sample_0.png 0 1 14\n")
    (root / lra.PATHFINDER_DIFFICULTY / "imgs/1/sample_0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="unreadable image"):
        lra.load_task("pathfinder", root)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(
        root / lra.PATHFINDER_DIFFICULTY / "imgs/1/sample_0.png"
    )
    with pytest.raises(ValueError, match="expected 32x32"):
        lra.load_task("pathfinder", root)


def test_batching_padding_and_order(tmp_path):
    seqs = [[5, 6, 7], [8], [9, 9, 9, 9, 9, 9]]
    split = lra.Split(lra.Ragged.from_lists(seqs), np.array([1, 2, 3], np.int32))
    data = lra.TaskData("listops", split, split, split, 10, "tokens", max_len=8, vocab_size=17)
    batch = lra.make_batch(data, split, np.array([1, 0]), pad_multiple=4)
    assert batch["x"].tolist() == [[8, 0, 0, 0], [5, 6, 7, 0]]
    assert batch["mask"].tolist() == [[True, False, False, False], [True, True, True, False]]
    assert batch["y"].tolist() == [2, 1] and batch["weight"].tolist() == [1.0, 1.0]
    assert lra.make_batch(data, split, np.array([2]), pad_multiple=4)["x"].shape == (1, 8)
    assert lra.padded_length(np.array([9]), 4, max_len=8) == 8
    batches = list(lra.eval_batches(data, split, 2, pad_multiple=4))
    assert [b["weight"].tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0]]
    assert [b["y"].tolist() for b in batches] == [[2, 1], [3, 2]]  # shortest first
    # The order of an epoch is a pure function of (seed, epoch).
    a = lra.epoch_order(50, seed=3, epoch=2)
    np.testing.assert_array_equal(a, lra.epoch_order(50, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, lra.epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, lra.epoch_order(50, seed=4, epoch=2))


def test_length_grouped_batches():
    lengths = np.random.default_rng(0).integers(1, 1000, 103)
    plain = lra.epoch_batches(lengths, 8, seed=1, epoch=0)
    np.testing.assert_array_equal(plain.reshape(-1), lra.epoch_order(103, 1, 0)[:96])
    grouped = lra.epoch_batches(lengths, 8, seed=1, epoch=0, length_grouping=4)
    np.testing.assert_array_equal(grouped, lra.epoch_batches(lengths, 8, 1, 0, length_grouping=4))
    # The same examples as the plain order, regrouped: batches of similar length.
    assert sorted(grouped.reshape(-1).tolist()) == sorted(plain.reshape(-1).tolist())
    spread = lambda b: (lengths[b].max(1) - lengths[b].min(1)).mean()
    assert spread(grouped) < 0.5 * spread(plain)
    pad = lambda b: lengths[b].max(1).sum()
    assert pad(grouped) < pad(plain)
    other_epoch = lra.epoch_batches(lengths, 8, seed=1, epoch=1, length_grouping=4)
    assert not np.array_equal(grouped, other_epoch)
