"""LRA loaders on tiny fixtures written in the published layouts, and host batching."""

import csv
import os
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
    # Not UTF-8: read as the bytes they are (as LRA does), surrounding whitespace stripped
    # (as TFDS stores the reviews).
    (tmp_path / "aclImdb" / "test" / "neg" / "2_1.txt").write_bytes(b" \xff\xfe bad\n")
    test = lra.load_text(tmp_path / "aclImdb").test
    row = test.inputs.values[test.inputs.offsets[2] : test.inputs.offsets[3]]
    assert row.tolist() == [b + lra.BYTE_OFFSET for b in b"\xff\xfe bad"] + [lra.EOS]


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
    # Grayscale as torchvision's CIFAR10 + Grayscale: an HWC PIL image converted to "L".
    hwc = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    gray = np.asarray(Image.fromarray(hwc).convert("L")).reshape(-1)
    assert data.test.inputs.values[:1024].tolist() == gray.tolist()
    batch = lra.make_batch(data, data.test, np.array([0]), pad_multiple=1024)
    assert batch["x"].shape == (1, 1024, 1) and batch["x"].dtype == np.float32
    # The anchors' Normalize(mean=122.6 / 255, std=61.0 / 255) after ToTensor.
    np.testing.assert_allclose(batch["x"][0, :, 0], (gray - 122.6) / 61.0, rtol=0, atol=1e-5)
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


# ------------------------------------------------------------------ pixel scaling


def test_pixel_scaling_matches_the_anchors():
    """(v / 255 - mean) / std rounded as torchvision's float32 ToTensor + Normalize, with
    the anchors' constants: CIFAR grayscale mean 122.6/255, std 61.0/255; Pathfinder 0.5 /
    0.5 ([-1, 1]); pixel_norm overrides (the 2023 S4 configs' [0, 1] for Pathfinder)."""
    values = np.array([[0, 1, 127, 128, 200, 255]], dtype=np.uint8)
    split = lra.Split(lra.Ragged.from_fixed(values), np.zeros(1, np.int32))

    def scaled(task, pixel_norm=None):
        data = lra.TaskData(task, split, split, split, 2, "pixels", max_len=6,
                            pixel_norm=pixel_norm)  # fmt: skip
        x = lra.make_batch(data, split, np.array([0]), pad_multiple=6)["x"]
        assert x.shape == (1, 6, 1) and x.dtype == np.float32
        return x[0, :, 0]

    v = values[0].astype(np.float64)
    image = scaled("image")
    np.testing.assert_allclose(image, (v - 122.6) / 61.0, rtol=0, atol=2e-6)
    # float32 step by step: x = fl(v / 255); fl(fl(x - fl(m)) / fl(s)).
    x32 = values[0].astype(np.float32) / np.float32(255)
    exact = (x32 - np.float32(122.6 / 255)) / np.float32(61.0 / 255)
    assert image.tolist() == exact.tolist()
    for task in ("pathfinder", "pathx"):
        got = scaled(task)
        np.testing.assert_allclose(got, v / 127.5 - 1.0, rtol=0, atol=1e-6)
        assert got[0] == -1.0 and got[-1] == 1.0
    assert scaled("pathfinder", (0.0, 1.0)).tolist() == x32.tolist()
    assert scaled("something-else").tolist() == scaled("pathx").tolist()


def test_grayscale_is_pil_convert_l():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :8] = [[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                  [1, 2, 3], [128, 128, 127], [254, 1, 200]]  # fmt: skip
    expected = np.asarray(Image.fromarray(rgb).convert("L")).reshape(-1)
    got = lra.grayscale(rgb.reshape(-1, 3).T[None])[0]
    assert got.tolist() == expected.tolist()


# --------------------------------------------------------------- non-UTF-8 input


def test_non_utf8_text_names_file_and_line(tmp_path):
    root = _write_listops(tmp_path / "listops-1000")
    (root / "basic_val.tsv").write_bytes(b"Source\tTarget\r\n7\t7\r\n( [MAX \xe9 ] )\t1\r\n")
    with pytest.raises(ValueError, match=r"basic_val\.tsv:3: not valid UTF-8 at column 8"):
        lra.load_listops(root)
    meta = _write_pathfinder(tmp_path / "pathfinder32", 32)
    meta_file = meta / lra.PATHFINDER_DIFFICULTY / "metadata" / "1.npy"
    meta_file.write_bytes(b"imgs/1 sample_0.png 0 1 14\nimgs/1 sample_\xff.png 1 0 14\n")
    with pytest.raises(ValueError, match=r"1\.npy:2: not valid UTF-8 at column 15"):
        lra.load_task("pathfinder", meta, cache=False)
    # Retrieval texts are bytes (as LRA reads them): a non-UTF-8 byte is a token.
    aan = _write_aan(tmp_path / "tsv_data")
    (aan / "new_aan_pairs.test.tsv").write_bytes(b"1\ta\tb\tcaf\xe9\td\n")
    test = lra.load_retrieval(aan).test
    assert test.inputs.values.tolist() == [c + 2 for c in b"caf\xe9"] + [lra.EOS]


# ------------------------------------------------------ the release's own layout


def _release_tree(data_root):
    """Small files laid out as the public releases unpack: the LRA tarball
    (lra_release/lra_release/...), aclImdb_v1.tar.gz and cifar-10-python.tar.gz."""
    release = data_root / "lra_release" / "lra_release"
    # ListOps: written by the LRA generator's csv.writer (tab delimiter, '\r\n' rows).
    listops = release / "listops-1000"
    listops.mkdir(parents=True)
    rows = {
        "train": [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [SM 4 ) 3 ) ] )", 7)],
        "val": [("( ( ( [MED 1 ) 5 ) ] )", 3)],
        "test": [("( ( ( [MIN 7 ) 3 ) ] )", 3)],
    }
    for split, items in rows.items():
        with open(listops / f"basic_{split}.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["Source", "Target"])
            writer.writerows(items)
    assert (listops / "basic_val.tsv").read_bytes() == (
        b"Source\tTarget\r\n( ( ( [MED 1 ) 5 ) ] )\t3\r\n"
    )
    # AAN: no header, label id1 id2 text1 text2, quotes literal, '\n' rows.
    tsv = release / "tsv_data"
    tsv.mkdir()
    for name in ("train", "eval", "test"):
        (tsv / f"new_aan_pairs.{name}.tsv").write_bytes(
            b'1.0\tW05-0308\tP10-1011\t"Quoted" title, a\tb\n0.0\tJ93-2004\tC94-1032\tx\ty "z\n'
        )
    # Pathfinder: three difficulty folders, the loader reads curv_contour_length_14.
    for resolution in (32, 128):
        base = release / f"pathfinder{resolution}"
        for difficulty in ("curv_baseline", "curv_contour_length_9", lra.PATHFINDER_DIFFICULTY):
            (base / difficulty / "metadata").mkdir(parents=True)
            (base / difficulty / "imgs" / "0").mkdir(parents=True)
        meta = base / lra.PATHFINDER_DIFFICULTY
        lines = []
        for i in range(10):
            px = np.full((resolution, resolution), 10 * i, np.uint8)
            Image.fromarray(px, mode="L").save(meta / "imgs" / "0" / f"sample_{i}.png")
            lines.append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.0 6 2 2 0.5 1 1\n")
        (meta / "metadata" / "0.npy").write_text("".join(lines))
    # IMDB: aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt plus files the loader ignores.
    imdb = data_root / "aclImdb"
    for split in ("train", "test"):
        for label, text in (("pos", b"Great.<br /><br />Loved it"), ("neg", b"Bad \x97 film")):
            (imdb / split / label).mkdir(parents=True)
            (imdb / split / label / "0_9.txt").write_bytes(text)
        (imdb / split / "labeledBow.feat").write_text("9 0:9 1:1\n")
        (imdb / split / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0453418/\n")
    (imdb / "train" / "unsup").mkdir()
    (imdb / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    (imdb / "imdb.vocab").write_text("the\n")
    # CIFAR-10 python: pickled dicts with bytes keys, a meta file and a readme.
    cifar = data_root / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": f"batch {k}".encode(), b"labels": [k % 10, (k + 1) % 10],
                 b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                 b"filenames": [b"a.png", b"b.png"]}  # fmt: skip
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": 2, b"label_names": [b"airplane"] * 10, b"num_vis": 3072}
    (cifar / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (cifar / "readme.html").write_text("<html></html>")
    return data_root


def test_release_layout(tmp_path):
    root = _release_tree(tmp_path)
    path = lambda task: lra.default_path(task, root)  # noqa: E731
    assert path("listops") == root / "lra_release" / "lra_release" / "listops-1000"
    listops = lra.load_task("listops", path("listops"))
    assert listops.train.labels.tolist() == [9, 7] and listops.val.labels.tolist() == [3]
    v = lra.LISTOPS_VOCAB
    assert listops.val.inputs.values.tolist() == [v["[MED"], v["1"], v["5"], v["]"], lra.EOS]
    aan = lra.load_task("retrieval", path("retrieval"))
    assert aan.val.labels.tolist() == [1, 0]
    first = aan.val.inputs.values[: aan.val.inputs.offsets[1]]
    assert bytes((first[:-1] - 2).astype(np.uint8)) == b'"Quoted" title, a'
    second = aan.val.inputs2.values[aan.val.inputs2.offsets[1] :]
    assert bytes((second[:-1] - 2).astype(np.uint8)) == b'y "z'
    text = lra.load_task("text", path("text"))
    assert path("text") == root / "aclImdb" and len(text.train) == 2
    neg = text.train.inputs.values[: text.train.inputs.offsets[1]]
    assert bytes((neg[:-1] - 2).astype(np.uint8)) == b"Bad \x97 film"  # cp1252 dash: a byte
    image = lra.load_task("image", path("image"), val_size=2)
    assert (len(image.train), len(image.val), len(image.test)) == (8, 2, 2)
    for task, res in (("pathfinder", 32), ("pathx", 128)):
        data = lra.load_task(task, path(task), cache=False)
        assert path(task).name == f"pathfinder{res}" and data.max_len == res * res
        pixels = np.concatenate([s.inputs.values.reshape(-1, res * res)[:, 0]
                                 for s in (data.train, data.val, data.test)])  # fmt: skip
        labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
        assert sorted(zip(pixels.tolist(), labels.tolist(), strict=True)) == [
            (10 * i, i % 2) for i in range(10)
        ]


# ------------------------------------------------------------- Pathfinder cache


def test_pathfinder_cache(tmp_path, monkeypatch):
    root = _write_pathfinder(tmp_path / "pathfinder32", 32)
    cache_dir = tmp_path / "cache"
    decoded = lra.load_task("pathfinder", root, cache=False)
    assert not list(root.glob("*.npz"))  # cache=False writes nothing
    first = lra.load_task("pathfinder", root, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.npz")
    assert cache_file.name == "pathfinder-cache-curv_contour_length_14-32.npz"

    def values(data):
        return [(s.inputs.values, s.labels) for s in (data.train, data.val, data.test)]

    for (xa, ya), (xb, yb) in zip(values(decoded), values(first), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)

    # The second load reads the cache: decoding would fail.
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache is valid")

    monkeypatch.setattr(lra, "_read_png", no_decoding)
    monkeypatch.setattr(lra, "_decode_chunk", no_decoding)
    second = lra.load_task("pathfinder", root, cache_dir=cache_dir)
    for (xa, ya), (xb, yb) in zip(values(first), values(second), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    monkeypatch.undo()

    # A changed source (same name, new content) invalidates the cache.
    png = root / lra.PATHFINDER_DIFFICULTY / "imgs" / "1" / "sample_3.png"
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(png)
    os.utime(png, ns=(1, 1))  # a different mtime even on coarse clocks
    third = lra.load_task("pathfinder", root, cache_dir=cache_dir)
    rows = np.concatenate([s.inputs.values.reshape(-1, 1024) for s in (third.train, third.val,
                                                                        third.test)])  # fmt: skip
    assert (rows == 77).all(axis=1).sum() == 1
    with np.load(cache_file) as f:
        assert (f["pixels"] == 77).all(axis=1).sum() == 1
    # A damaged cache file is rebuilt.
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    again = lra.load_task("pathfinder", root, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.train.inputs.values, third.train.inputs.values)
    with np.load(cache_file) as f:
        assert f["pixels"].shape == (10, 1024)
    # A changed metadata file (relabelled) invalidates the cache too.
    meta = root / lra.PATHFINDER_DIFFICULTY / "metadata" / "0.npy"
    meta.write_text(meta.read_text().replace(" 0 0 14", " 0 1 14"))
    os.utime(meta, ns=(2, 2))
    relabelled = lra.load_task("pathfinder", root, cache_dir=cache_dir)
    total = sum(int(s.labels.sum()) for s in (relabelled.train, relabelled.val, relabelled.test))
    assert total == 5


def test_parallel_decoding_equals_serial(tmp_path, monkeypatch):
    root = _write_pathfinder(tmp_path / "pathfinder32", 32, n_folders=1, per=7)
    paths = sorted((root / lra.PATHFINDER_DIFFICULTY / "imgs" / "0").glob("*.png"))
    serial = lra.decode_images(paths, 32, workers=1, progress=False)
    monkeypatch.setattr(lra, "DECODE_CHUNK", 3)  # 3 chunks over 2 spawned processes
    parallel = lra.decode_images(paths, 32, workers=2, progress=False)
    np.testing.assert_array_equal(serial, parallel)
    expected = np.stack([np.asarray(Image.open(p)).reshape(-1) for p in paths])
    np.testing.assert_array_equal(serial, expected)
