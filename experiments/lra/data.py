"""LRA data: loaders for the six tasks in their published layouts, and host-side batching.

Default locations (``DATA_ROOT = data/`` under the repository, git-ignored) hold the
folders of the public releases, unpacked or symlinked (the LRA tarball's own tree,
``lra_release/lra_release/<folder>``, is found too; see :func:`default_path`):

============  =================================  ============================================
task          folder under the data root         layout
============  =================================  ============================================
listops       ``listops-1000/``                  ``basic_{train,val,test}.tsv``, header
                                                 ``Source<TAB>Target``
text          ``aclImdb/``                       ``{train,test}/{pos,neg}/*.txt``
retrieval     ``tsv_data/``                      ``new_aan_pairs.{train,eval,test}.tsv``, no
                                                 header: label, id1, id2, text1, text2
image         ``cifar-10-batches-py/``           ``data_batch_{1..5}``, ``test_batch`` (pickle)
pathfinder    ``pathfinder32/``                  ``curv_contour_length_14/{imgs/<b>/*.png,
                                                 metadata/<b>.npy}``
pathx         ``pathfinder128/``                 as pathfinder, 128×128
============  =================================  ============================================

Tokenisation (per task): ListOps drops parentheses and maps the 15 symbols to ids 2-16;
Text and Retrieval are bytes (id = byte + 2), read as LRA reads them: the files' raw bytes,
never decoded, so a review that is not valid UTF-8 loads like any other (LRA's
``text_classification/input_pipeline.py`` feeds the bytes TFDS stores for ``imdb_reviews``
(the file's bytes, ``.strip()``-ed) to ``ByteTextEncoder``; ``matching/input_pipeline.py``
reads the AAN TSV as byte strings without quote handling). All three append an end token
(id 1) after truncating to ``max_len - 1``; id 0 is padding.

Pixels (one feature per position, through a linear encoder) are scaled as the anchors'
loaders do (state-spaces/s4 ``src/dataloaders/basic.py`` and ``lra.py`` at the V3 release
that the published configs ran, identical in lindermanlab/S5 ``s5/dataloaders/``):
``x = (v / 255 - mean) / std`` in float32 (torchvision's ``ToTensor`` then ``Normalize``),
see :data:`PIXEL_NORM`. Image: grayscale CIFAR-10 by PIL's ``convert("L")`` (torchvision's
``Grayscale``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``), mean 122.6/255, std
61.0/255. Pathfinder / Path-X: mean 0.5, std 0.5, i.e. [-1, 1] (state-spaces/s4's 2023
configs set ``center: False``, [0, 1]: pass ``pixel_norm=(0.0, 1.0)``).

Splits: ListOps and Retrieval ship train / val / test; IMDB's test split doubles as
validation (as in LRA); CIFAR-10 keeps a seeded 5,000-image validation split out of the 50,000
training images; Pathfinder is split 80 / 10 / 10 by a seeded permutation.

Loaders read everything before returning: a malformed file (including text that is not
valid UTF-8 where text is parsed: ListOps, Pathfinder metadata) raises ``ValueError``
naming the file and line (nothing half-loaded is returned); a missing folder raises
``FileNotFoundError`` naming the expected path and layout. Pathfinder / Path-X decode their
PNGs once (in parallel, with a progress bar) into a cache file keyed by the sources' names,
sizes and modification times (:func:`load_pathfinder`).

Batching: sequences are stored ragged (concatenated tokens + offsets); a batch is padded to
the longest sequence rounded up to ``pad_multiple`` (at most ``max_len``), with a boolean
mask (True = valid). The training order is a pure function of ``(seed, epoch)``;
optionally batches group examples of similar length (:func:`epoch_batches`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# data/ of the git checkout, or of the current directory for an installed package (the rule
# of experiments.lra.train.resolve_path).
DATA_ROOT = (REPO_ROOT if (REPO_ROOT / ".git").exists() else Path.cwd()) / "data"

PAD, EOS = 0, 1
LISTOPS_SYMBOLS = tuple(str(d) for d in range(10)) + ("[MIN", "[MAX", "[MED", "[SM", "]")
LISTOPS_VOCAB = {s: i + 2 for i, s in enumerate(LISTOPS_SYMBOLS)}
_NO_PARENS = str.maketrans("()", "  ")
BYTE_OFFSET = 2
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")

# Pixel scaling x = (v / 255 - mean) / std per task, as (mean, std); see the module docstring.
# state-spaces/s4 src/dataloaders/basic.py (CIFAR10, grayscale: Normalize(mean=122.6 / 255,
# std=61.0 / 255)) and src/dataloaders/lra.py (PathFinder: Normalize(mean=0.5, std=0.5)), at
# the V3 release (commit d589d98) and in lindermanlab/S5 s5/dataloaders/{basic,lra}.py.
PIXEL_NORM: dict[str, tuple[float, float]] = {
    "image": (122.6 / 255.0, 61.0 / 255.0),
    "pathfinder": (0.5, 0.5),
    "pathx": (0.5, 0.5),
}
DEFAULT_PIXEL_NORM = (0.5, 0.5)  # pixel data of any other task name: [-1, 1]
# The LRA tarball unpacks to lra_release/lra_release/{listops-1000, tsv_data, pathfinder*}.
RELEASE_SUBDIR = Path("lra_release") / "lra_release"

LAYOUTS = {
    "listops": (
        "listops-1000",
        "basic_train.tsv, basic_val.tsv, basic_test.tsv (tab-separated, header Source\\tTarget)",
    ),
    "text": ("aclImdb", "train/pos/*.txt, train/neg/*.txt, test/pos/*.txt, test/neg/*.txt"),
    "retrieval": (
        "tsv_data",
        "new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv, new_aan_pairs.test.tsv "
        "(no header; columns label, id1, id2, text1, text2)",
    ),
    "image": ("cifar-10-batches-py", "data_batch_1 ... data_batch_5, test_batch (python pickle)"),
    "pathfinder": (
        "pathfinder32",
        "curv_contour_length_14/metadata/<b>.npy (text: subpath filename index label ...) "
        "and curv_contour_length_14/imgs/<b>/sample_<i>.png",
    ),
    "pathx": (
        "pathfinder128",
        "curv_contour_length_14/metadata/<b>.npy and curv_contour_length_14/imgs/<b>/*.png",
    ),
}


@dataclass(frozen=True)
class Ragged:
    """Variable-length sequences: sequence i is ``values[offsets[i]:offsets[i + 1]]``.

    ``values (total,)`` integer array, ``offsets (N + 1,)`` int64 non-decreasing from 0.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int] | np.ndarray], dtype=np.uint16) -> Ragged:
        """Pack a list of integer sequences."""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.zeros(int(offsets[-1]), dtype=dtype)
        for seq, start, stop in zip(seqs, offsets[:-1], offsets[1:], strict=True):
            values[start:stop] = seq
        return cls(values, offsets)

    @classmethod
    def from_fixed(cls, array: np.ndarray) -> Ragged:
        """Pack equal-length sequences ``(N, L)``."""
        n, length = array.shape
        return cls(array.reshape(-1), np.arange(n + 1, dtype=np.int64) * length)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``(N,)`` sequence lengths."""
        return np.diff(self.offsets)

    def pad(self, indices: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences ``indices`` right-padded (or truncated) to ``length``: ``(B, length)``
        values (padding 0) and the ``(B, length)`` boolean mask."""
        out = np.zeros((len(indices), length), dtype=self.values.dtype)
        mask = np.zeros((len(indices), length), dtype=bool)
        for row, i in enumerate(indices):
            seq = self.values[self.offsets[i] : self.offsets[i + 1]][:length]
            out[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return out, mask


@dataclass(frozen=True)
class Split:
    """One split: ``inputs`` (and ``inputs2`` for retrieval pairs) and ``labels (N,)``."""

    inputs: Ragged
    labels: np.ndarray
    inputs2: Ragged | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    """A loaded task: three splits and what a model needs to know about the input.

    ``kind`` is ``"tokens"`` (ids in ``[0, vocab_size)``, id 0 = padding) or ``"pixels"``
    (uint8 values, one feature per position); ``paired`` marks two-input retrieval;
    ``pixel_norm`` ``(mean, std)`` scales pixels as ``(v / 255 - mean) / std`` (None: the
    task's entry of :data:`PIXEL_NORM`).
    """

    task: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    kind: str
    max_len: int
    vocab_size: int | None = None
    paired: bool = False
    pixel_norm: tuple[float, float] | None = None

    @property
    def pixel_scaling(self) -> tuple[float, float]:
        """The ``(mean, std)`` in effect: ``pixel_norm`` or the task's default."""
        if self.pixel_norm is not None:
            return self.pixel_norm
        return PIXEL_NORM.get(self.task, DEFAULT_PIXEL_NORM)

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test'; got {name!r}")
        return getattr(self, name)


def default_path(task: str, data_root: str | Path | None = None) -> Path:
    """Where ``task``'s release folder is expected: ``<data_root>/<folder>``, or, when only
    the unpacked LRA tarball is there, ``<data_root>/lra_release/lra_release/<folder>``."""
    if task not in LAYOUTS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    root = Path(data_root if data_root is not None else DATA_ROOT)
    direct, in_release = root / LAYOUTS[task][0], root / RELEASE_SUBDIR / LAYOUTS[task][0]
    return in_release if not direct.exists() and in_release.is_dir() else direct


# How to obtain each task's data (named by the missing-data error).
LRA_RELEASE = (
    "the LRA release (https://github.com/google-research/long-range-arena: "
    "lra_release.gz, unpacked under the data folder as lra_release/lra_release/<folder>)"
)
OBTAIN = {
    "listops": "generate a set with 'python -m experiments.lra.listops --out {path}' "
    "(seeded, the published procedure) or use " + LRA_RELEASE,
    "text": "download the IMDB reviews (aclImdb_v1.tar.gz, "
    "https://ai.stanford.edu/~amaas/data/sentiment/) and unpack them there",
    "retrieval": "use " + LRA_RELEASE,
    "image": "download CIFAR-10 for python (cifar-10-python.tar.gz, "
    "https://www.cs.toronto.edu/~kriz/cifar.html) and unpack it there",
    "pathfinder": "generate a set with 'python -m experiments.lra.pathfinder --resolution 32 "
    "--out {path}' or use " + LRA_RELEASE,
    "pathx": "generate a set with 'python -m experiments.lra.pathfinder --resolution 128 "
    "--out {path}' or use " + LRA_RELEASE,
}


def _missing(task: str, path: Path, what: Path) -> FileNotFoundError:
    folder, layout = LAYOUTS[task]
    obtain = OBTAIN[task].format(path=path)
    return FileNotFoundError(
        f"{task} data not found: {what} does not exist. Expected the folder '{folder}' at "
        f"{path} containing {layout}. To get it: {obtain}; or point data_dir (--data) at an "
        "existing copy."
    )


def _require_file(task: str, root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise _missing(task, root, path)
    return path


def _bytes_tokens(text: bytes | str, max_len: int) -> np.ndarray:
    """Byte ids ``(n,)``: the first ``max_len - 1`` bytes (+ 2), then the end token."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    data = np.frombuffer(raw, dtype=np.uint8)[: max_len - 1]
    return np.concatenate([data.astype(np.uint16) + BYTE_OFFSET, [EOS]]).astype(np.uint16)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a byte sequence that is not UTF-8 raises ``ValueError``
    naming the file, line and column (1-based) and the offending bytes."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start : e.end]
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 at column {column} (byte(s) {bad!r}: {e.reason})"
        ) from None


# ---------------------------------------------------------------------------- ListOps


def tokenize_listops(source: str, max_len: int = 2048, where: str = "") -> np.ndarray:
    """ListOps source string -> ids ``(n,)``: parentheses dropped, end token appended."""
    tokens = source.translate(_NO_PARENS).split()
    try:
        ids = [LISTOPS_VOCAB[tok] for tok in tokens]
    except KeyError as e:
        raise ValueError(f"{where}unknown ListOps token {e.args[0]!r}") from None
    return np.array(ids[: max_len - 1] + [EOS], dtype=np.uint16)


def read_listops_tsv(path: Path, max_len: int = 2048) -> Split:
    """Read one ``basic_<split>.tsv`` (header ``Source<TAB>Target``, targets 0-9)."""
    seqs, labels = [], []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise ValueError(f"{path}: expected the header 'Source\\tTarget'; got {header!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}: "
            if len(row) != 2:
                raise ValueError(f"{where}expected 2 tab-separated fields; got {len(row)}")
            try:
                label = int(row[1])
            except ValueError:
                raise ValueError(f"{where}target {row[1]!r} is not an integer") from None
            if not 0 <= label <= 9:
                raise ValueError(f"{where}target {label} is outside 0-9")
            seqs.append(tokenize_listops(row[0], max_len, where))
            labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no samples")
    return Split(Ragged.from_lists(seqs), np.array(labels, dtype=np.int32))


def load_listops(path: str | Path | None = None, *, max_len: int = 2048) -> TaskData:
    """ListOps from ``path`` (default ``data/listops-1000``); 10 classes, 17 token ids."""
    root = Path(path) if path is not None else default_path("listops")
    files = {s: _require_file("listops", root, f"basic_{s}.tsv") for s in ("train", "val", "test")}
    splits = {s: read_listops_tsv(p, max_len) for s, p in files.items()}
    return TaskData(
        "listops", **splits, n_classes=10, kind="tokens", max_len=max_len,
        vocab_size=len(LISTOPS_VOCAB) + 2,
    )  # fmt: skip


# ------------------------------------------------------------------------------- Text


def read_review(path: Path) -> bytes:
    """One IMDB review as LRA reads it: the file's bytes, leading and trailing ASCII
    whitespace removed (TFDS ``imdb_reviews`` stores ``f.read().strip()`` of the archive
    member, bytes), never decoded: bytes that are not UTF-8 are kept as they are."""
    return Path(path).read_bytes().strip()


def _read_imdb_split(root: Path, split: str, max_len: int) -> Split:
    seqs, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        folder = root / split / name
        if not folder.is_dir():
            raise _missing("text", root, folder)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise ValueError(f"{folder}: no *.txt reviews")
        for file in files:
            seqs.append(_bytes_tokens(read_review(file), max_len))
            labels.append(label)
    return Split(Ragged.from_lists(seqs), np.array(labels, dtype=np.int32))


def load_text(path: str | Path | None = None, *, max_len: int = 4096) -> TaskData:
    """IMDB reviews as bytes from ``aclImdb/{train,test}/{pos,neg}/*.txt``; test = val."""
    root = Path(path) if path is not None else default_path("text")
    if not root.is_dir():
        raise _missing("text", root, root)
    train = _read_imdb_split(root, "train", max_len)
    test = _read_imdb_split(root, "test", max_len)
    return TaskData(
        "text", train, test, test, n_classes=2, kind="tokens", max_len=max_len,
        vocab_size=BYTE_VOCAB_SIZE,
    )  # fmt: skip


# -------------------------------------------------------------------------- Retrieval


def read_aan_tsv(path: Path, max_len: int = 4000) -> Split:
    """Read one ``new_aan_pairs.<split>.tsv``: label (0/1, possibly ``1.0``), id1, id2,
    text1, text2; tab-separated, no header, quotes are literal characters. Read as bytes,
    as LRA's ``matching/input_pipeline.py`` does (``make_csv_dataset`` with
    ``use_quote_delim=False``, texts as byte strings): the texts are never decoded."""
    seqs1, seqs2, labels = [], [], []
    with open(path, "rb") as f:
        for line_num, line in enumerate(f, start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if not line:
                continue
            where = f"{path}:{line_num}: "
            fields = line.split(b"\t")
            if len(fields) != 5:
                raise ValueError(
                    f"{where}expected 5 tab-separated fields (label, id1, id2, text1, text2); "
                    f"got {len(fields)}"
                )
            label_text = fields[0].decode("ascii", errors="backslashreplace")
            try:
                value = float(label_text)
            except ValueError:
                raise ValueError(f"{where}label {label_text!r} is not a number") from None
            if value not in (0.0, 1.0):
                raise ValueError(f"{where}label {label_text!r} is not 0 or 1")
            labels.append(int(value))
            seqs1.append(_bytes_tokens(fields[3], max_len))
            seqs2.append(_bytes_tokens(fields[4], max_len))
    if not labels:
        raise ValueError(f"{path}: no samples")
    return Split(
        Ragged.from_lists(seqs1), np.array(labels, dtype=np.int32), Ragged.from_lists(seqs2)
    )


def load_retrieval(path: str | Path | None = None, *, max_len: int = 4000) -> TaskData:
    """AAN document pairs from ``tsv_data/new_aan_pairs.{train,eval,test}.tsv``; bytes."""
    root = Path(path) if path is not None else default_path("retrieval")
    files = {
        s: _require_file("retrieval", root, f"new_aan_pairs.{f}.tsv")
        for s, f in (("train", "train"), ("val", "eval"), ("test", "test"))
    }
    splits = {s: read_aan_tsv(p, max_len) for s, p in files.items()}
    return TaskData(
        "retrieval", **splits, n_classes=2, kind="tokens", max_len=max_len,
        vocab_size=BYTE_VOCAB_SIZE, paired=True,
    )  # fmt: skip


# ------------------------------------------------------------------------------ Image


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python pickle batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072); got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: b'labels' must be N={data.shape[0]} integers in 0-9")
    return grayscale(data.reshape(-1, 3, 1024)), labels


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """``rgb (..., 3, P)`` uint8 -> ``(..., P)`` uint8 luminance, exactly as PIL's
    ``Image.convert("L")`` (which torchvision's ``Grayscale`` calls): ITU-R 601-2 weights
    in 16-bit fixed point, ``(19595 R + 38470 G + 7471 B + 32768) >> 16``."""
    c = rgb.astype(np.uint32)
    luma = 19595 * c[..., 0, :] + 38470 * c[..., 1, :] + 7471 * c[..., 2, :] + 32768
    return (luma >> 16).astype(np.uint8)


def load_image(
    path: str | Path | None = None,
    *,
    val_size: int = 5000,
    seed: int = 42,
    pixel_norm: tuple[float, float] | None = None,
) -> TaskData:
    """Grayscale CIFAR-10 (L = 1024 pixels) from the python pickle batches; ``pixel_norm``
    overrides the anchors' scaling (:data:`PIXEL_NORM`)."""
    root = Path(path) if path is not None else default_path("image")
    files = [_require_file("image", root, f"data_batch_{i}") for i in range(1, 6)]
    test_file = _require_file("image", root, "test_batch")
    parts = [_read_cifar_batch(f) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(test_file)
    if not 0 < val_size < len(y):
        raise ValueError(f"val_size must be in (0, {len(y)}); got {val_size}")
    perm = np.random.default_rng(seed).permutation(len(y))
    val, train = perm[:val_size], np.sort(perm[val_size:])
    return TaskData(
        "image",
        Split(Ragged.from_fixed(x[train]), y[train]),
        Split(Ragged.from_fixed(x[np.sort(val)]), y[np.sort(val)]),
        Split(Ragged.from_fixed(x_test), y_test),
        n_classes=10,
        kind="pixels",
        max_len=1024,
        pixel_norm=pixel_norm,
    )


# ------------------------------------------------------------------------- Pathfinder

PATHFINDER_DIFFICULTY = "curv_contour_length_14"


def read_pathfinder_metadata(path: Path) -> list[tuple[str, str, int]]:
    """One metadata file (text despite ``.npy``): rows ``subpath filename ... label ...``
    with the label (0/1) at field 3. Returns ``[(subpath, filename, label)]``."""
    rows = []
    for line_num, line in enumerate(read_text(path).split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_num}: "
        if len(fields) < 4:
            raise ValueError(f"{where}expected at least 4 fields, label at field 3")
        if fields[3] not in ("0", "1"):
            raise ValueError(f"{where}label (field 3) must be 0 or 1; got {fields[3]!r}")
        rows.append((fields[0], fields[1], int(fields[3])))
    return rows


def _read_png(path: Path, resolution: int) -> np.ndarray:
    """One image as ``(resolution², )`` uint8 gray values (PIL ``convert("L")``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None
    if pixels.shape != (resolution, resolution):
        raise ValueError(f"{path}: expected {resolution}x{resolution}; got {pixels.shape}")
    return pixels.reshape(-1)


def _decode_chunk(paths: list[str], resolution: int) -> np.ndarray:
    """``(len(paths), resolution²)`` uint8: a worker's share of :func:`decode_images`."""
    out = np.empty((len(paths), resolution * resolution), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _read_png(Path(path), resolution)
    return out


DECODE_CHUNK = 500  # images per worker task


def decode_images(
    paths: Sequence[Path],
    resolution: int,
    *,
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "decoding images",
) -> np.ndarray:
    """Decode PNGs into ``(len(paths), resolution²)`` uint8, in order.

    ``workers`` processes (default: the CPU count; ``1`` or fewer than two chunks of
    :data:`DECODE_CHUNK` images: in this process) decode chunks in parallel; they are
    started with ``spawn``, never ``fork``, which is unsafe in a process running JAX's
    threads. ``progress``: a tqdm bar (None: only on a terminal).
    """
    from tqdm import tqdm

    n = len(paths)
    out = np.empty((n, resolution * resolution), dtype=np.uint8)
    workers = (os.cpu_count() or 1) if workers is None else workers
    chunks = [[str(p) for p in paths[i : i + DECODE_CHUNK]] for i in range(0, n, DECODE_CHUNK)]
    disable = None if progress is None else not progress
    with tqdm(total=n, desc=desc, unit="img", disable=disable) as bar:
        if workers <= 1 or len(chunks) < 2:
            for i, path in enumerate(paths):
                out[i] = _read_png(Path(path), resolution)
                bar.update(1)
            return out
        context = get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
            results = pool.map(_decode_chunk, chunks, [resolution] * len(chunks))
            for k, block in enumerate(results):
                out[k * DECODE_CHUNK : k * DECODE_CHUNK + len(block)] = block
                bar.update(len(block))
    return out


CACHE_VERSION = 1  # bump when the cached content changes meaning


def pathfinder_cache_key(root: Path, files: Sequence[Path], resolution: int) -> str:
    """SHA-256 over the format version, the resolution and, for every source file (metadata
    and images), its path relative to ``root``, size and modification time (ns): any
    changed, added or removed source gives a new key."""
    digest = hashlib.sha256(f"ssmix-pathfinder-cache {CACHE_VERSION} {resolution}\n".encode())
    for file in files:
        st = os.stat(file)
        rel = os.path.relpath(file, root)
        digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _load_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(pixels, labels)`` if ``path`` holds them under ``key``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                logger.info("pathfinder cache %s is stale (sources changed): rebuilding", path)
                return None
            return f["pixels"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("pathfinder cache %s unreadable (%s): rebuilding", path, e)
        return None


def _write_cache(path: Path, key: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    """Write the cache atomically (temporary file, then rename); a cache that cannot be
    written (read-only data folder) is skipped with a warning."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), pixels=pixels, labels=labels)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not write the pathfinder cache %s (%s); not cached", path, e)


def load_pathfinder(
    path: str | Path | None = None,
    *,
    resolution: int = 32,
    difficulty: str = PATHFINDER_DIFFICULTY,
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    task: str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    pixel_norm: tuple[float, float] | None = None,
) -> TaskData:
    """Pathfinder (``resolution`` 32) or Path-X (128) images with their metadata labels.

    The images are decoded once (:func:`decode_images`: ``workers`` processes, a progress
    bar) into ``<cache_dir>/pathfinder-cache-<difficulty>-<resolution>.npz`` (default
    ``cache_dir``: the release folder ``path``), holding the pixels ``(N, resolution²)``
    uint8 and labels of every metadata row in order, under :func:`pathfinder_cache_key`;
    later loads read that file while the key matches (a changed source rebuilds it).
    ``cache=False`` always decodes and writes nothing. ``pixel_norm`` overrides the
    anchors' scaling (:data:`PIXEL_NORM`).
    """
    task = task or ("pathfinder" if resolution == 32 else "pathx")
    root = Path(path) if path is not None else default_path(task)
    meta_dir = root / difficulty / "metadata"
    if not meta_dir.is_dir():
        raise _missing(task, root, meta_dir)
    meta_files = sorted(
        (p for p in meta_dir.glob("*.npy") if re.fullmatch(r"\d+", p.stem)),
        key=lambda p: int(p.stem),
    )
    if not meta_files:
        raise _missing(task, root, meta_dir / "<b>.npy")
    images, labels = [], []
    for meta in meta_files:
        for subpath, filename, label in read_pathfinder_metadata(meta):
            image = root / difficulty / subpath / filename
            if not image.is_file():
                raise ValueError(f"{meta}: image {image} listed in the metadata does not exist")
            images.append(image)
            labels.append(label)
    y = np.array(labels, dtype=np.int32)
    cached = None
    if cache:
        cache_file = Path(cache_dir or root) / f"pathfinder-cache-{difficulty}-{resolution}.npz"
        key = pathfinder_cache_key(root, meta_files + images, resolution)
        cached = _load_cache(cache_file, key)
    if cached is not None:
        x = cached[0]
    else:
        x = decode_images(
            images, resolution, workers=workers, progress=progress,
            desc=f"decoding {task} images (once; cached)" if cache else f"decoding {task}",
        )  # fmt: skip
        if cache:
            _write_cache(cache_file, key, x, y)
    n = len(y)
    n_val, n_test = int(val_fraction * n), int(test_fraction * n)
    if n - n_val - n_test <= 0:
        raise ValueError(f"{root}: {n} samples are too few for the train/val/test split")
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.split(perm, [n - n_val - n_test, n - n_test])
    train, val, test = (Split(Ragged.from_fixed(x[np.sort(p)]), y[np.sort(p)]) for p in parts)
    return TaskData(
        task, train, val, test, n_classes=2, kind="pixels", max_len=resolution * resolution,
        pixel_norm=pixel_norm,
    )  # fmt: skip


def load_task(task: str, path: str | Path | None = None, **kwargs) -> TaskData:
    """Load ``task`` (one of :data:`TASKS`) from ``path`` (default: its folder under
    ``data/``); keyword arguments go to the task's loader (e.g. ``max_len``)."""
    loaders = {
        "listops": load_listops,
        "text": load_text,
        "retrieval": load_retrieval,
        "image": load_image,
        "pathfinder": lambda p, **kw: load_pathfinder(p, resolution=32, task="pathfinder", **kw),
        "pathx": lambda p, **kw: load_pathfinder(p, resolution=128, task="pathx", **kw),
    }
    if task not in loaders:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    return loaders[task](path, **kwargs)


# --------------------------------------------------------------------------- Batching


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation of ``n`` that depends only on
    ``(seed, epoch)``, so a resumed run replays exactly the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_lengths(split: Split) -> np.ndarray:
    """``(N,)`` length of each example (the longer input of a retrieval pair)."""
    lengths = split.inputs.lengths
    return lengths if split.inputs2 is None else np.maximum(lengths, split.inputs2.lengths)


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, *, length_grouping: int = 0
) -> np.ndarray:
    """The ``(steps, batch_size)`` example indices of epoch ``epoch`` (a pure function of
    ``(seed, epoch)``); the last ``n mod batch_size`` examples of the order are dropped.

    With ``length_grouping = g > 0`` the shuffled order is cut into windows of ``g`` batches,
    each window sorted by length, and the batches shuffled again: batches hold examples of
    similar length, so padding to the longest one wastes little (random batches of ListOps
    almost always pad to the maximum length).
    """
    order = epoch_order(len(lengths), seed, epoch)
    steps = len(lengths) // batch_size
    order = order[: steps * batch_size]
    if length_grouping <= 0:
        return order.reshape(steps, batch_size)
    window = length_grouping * batch_size
    grouped = np.concatenate(
        [
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.split(order, range(window, len(order), window))
        ]
    ).reshape(steps, batch_size)
    return grouped[np.random.default_rng([seed, epoch, 1]).permutation(steps)]


def padded_length(lengths: np.ndarray, pad_multiple: int, max_len: int) -> int:
    """The batch length: the longest sequence rounded up to ``pad_multiple``, capped at
    ``max_len`` (fewer distinct shapes means fewer compilations)."""
    longest = int(lengths.max()) if len(lengths) else 1
    return min(max_len, -(-longest // pad_multiple) * pad_multiple)


def scale_pixels(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(v / 255 - mean) / std`` in float32, rounded step by step as torchvision's
    ``ToTensor`` (float32 division by 255) and ``Normalize`` (float32 mean and std) do."""
    x = values.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(mean)) / np.float32(std)


def make_batch(
    data: TaskData,
    split: Split,
    indices: np.ndarray,
    *,
    pad_multiple: int,
    weights: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Assemble one host batch from ``split[indices]``.

    Returns ``x`` (``(B, L)`` int32 tokens, or ``(B, L, 1)`` float32 normalised pixels),
    ``mask (B, L)`` bool, ``y (B,)`` int32, ``weight (B,)`` float32 (0 marks filler rows of
    a last partial evaluation batch) and, for retrieval, ``x2`` / ``mask2`` of the same shape.
    """
    seqs = [split.inputs] + ([split.inputs2] if data.paired else [])
    lengths = np.concatenate([s.lengths[indices] for s in seqs])
    length = padded_length(lengths, pad_multiple, data.max_len)
    batch = {
        "y": split.labels[indices].astype(np.int32),
        "weight": (np.ones(len(indices)) if weights is None else weights).astype(np.float32),
    }
    for suffix, seq in zip(("", "2"), seqs, strict=False):
        values, mask = seq.pad(indices, length)
        if data.kind == "pixels":
            x = scale_pixels(values, *data.pixel_scaling)[..., None]
        else:
            x = values.astype(np.int32)
        batch["x" + suffix], batch["mask" + suffix] = x, mask
    return batch


def eval_batches(
    data: TaskData, split: Split, batch_size: int, *, pad_multiple: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in batches of exactly ``batch_size``, shortest first
    (similar lengths share a batch, so little padding); the last batch is filled with
    repeats of the first example at weight 0."""
    n = len(split)
    order = np.argsort(example_lengths(split), kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        weights = np.ones(batch_size, dtype=np.float32)
        if len(idx) < batch_size:
            weights[len(idx) :] = 0.0
            idx = np.concatenate([idx, np.full(batch_size - len(idx), order[0])])
        yield make_batch(data, split, idx, pad_multiple=pad_multiple, weights=weights)
