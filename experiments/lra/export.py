"""Export a trained LRA model to one file that loads back without the optimiser or orbax.

``python -m experiments.lra.export RUN_DIR [--step best|latest|N] --out model.npz``
writes the model of one checkpoint (default: the best validation accuracy) and
``python -m experiments.lra.export --inspect model.npz`` prints what a file holds.
In Python::

    from experiments.lra.export import load_exported
    model, cfg = load_exported("model.npz")  # an nnx.Module in eval mode, its Config
    logits = model(x, mask)  # (batch, n_classes); retrieval: model(x, x2, mask, mask2)

``x`` is ``(batch, length)`` int32 token ids or ``(batch, length, 1)`` float32 scaled pixels
(see :class:`TaskInfo`), ``mask`` ``(batch, length)`` bool, True at valid positions;
:func:`experiments.lra.data.make_batch` builds both from raw examples.

The file is a NumPy ``.npz`` archive (``numpy.load`` reads it; no pickle): member
``ssmix_export`` (UTF-8 JSON as bytes) holds the run's config, the task's input description
(:class:`TaskInfo`: classes, vocabulary or pixel scaling, paired inputs), the step and one
entry per variable (its path in ``nnx.state(model)``, ``params`` or ``rest``, dtype and
shape); member ``v<i>`` holds variable ``i``'s values. Exported are the parameters
(:class:`flax.nnx.Param`, the complex SSM parameters included) and every other model
variable the checkpoint holds (BatchNorm statistics), bit for bit; RNG state is not.
Dtypes NumPy has no name for (``bfloat16``) are stored as their raw bits and viewed back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from experiments.logs import program_name, setup_logging
from experiments.lra.configs import Config

logger = logging.getLogger("experiments.lra")

FORMAT = "ssmix-lra-export"
VERSION = 1
META_KEY = "ssmix_export"  # UTF-8 JSON bytes (member ssmix_export.npy)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What :func:`experiments.lra.models.build_model` and a user feeding the model need to
    know about a task's inputs (the fields of :class:`~experiments.lra.data.TaskData`
    without the data).

    ``kind`` ``"tokens"``: integer ids in ``[0, vocab_size)`` (0 = padding), inputs
    ``(batch, length)``; ``"pixels"``: ``(batch, length, 1)`` floats scaled as
    ``(v / 255 - mean) / std`` with ``pixel_norm = (mean, std)``. ``paired``: the model
    takes two inputs and two masks (retrieval). ``max_len``: the longest input of the run.
    """

    task: str
    n_classes: int
    kind: str
    max_len: int
    vocab_size: int | None = None
    paired: bool = False
    pixel_norm: tuple[float, float] | None = None

    @classmethod
    def for_config(cls, cfg: Config) -> TaskInfo:
        """The inputs of ``cfg.task`` as :mod:`experiments.lra.data`'s loaders produce them."""
        from experiments.lra import data

        if cfg.task == "listops":
            return cls("listops", 10, "tokens", cfg.max_len, len(data.LISTOPS_VOCAB) + 2)
        if cfg.task in ("text", "retrieval"):
            return cls(
                cfg.task, 2, "tokens", cfg.max_len, data.BYTE_VOCAB_SIZE,
                paired=cfg.task == "retrieval",
            )  # fmt: skip
        sizes = {"image": (10, 32 * 32), "pathfinder": (2, 32 * 32), "pathx": (2, 128 * 128)}
        if cfg.task not in sizes:
            raise ValueError(f"unknown task {cfg.task!r}; expected one of {', '.join(data.TASKS)}")
        n_classes, length = sizes[cfg.task]
        norm = tuple(cfg.pixel_norm) if cfg.pixel_norm else None
        norm = norm or data.PIXEL_NORM.get(cfg.task, data.DEFAULT_PIXEL_NORM)
        return cls(cfg.task, n_classes, "pixels", length, pixel_norm=tuple(map(float, norm)))


# ----------------------------------------------------------------------------- model


def _rest_filter():
    """Non-parameter variables worth keeping: everything but RNG state."""
    return nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngState))


def build_model(cfg: Config, info: TaskInfo, *, seed: int | None = None) -> nnx.Module:
    """A freshly initialised model of ``cfg`` for ``info``'s inputs (``seed``: the config's)."""
    from experiments.lra.models import build_model as build

    return build(cfg, info, rngs=nnx.Rngs(cfg.seed if seed is None else seed))


def model_variables(model: nnx.Module) -> dict[str, nnx.State]:
    """``{"params": nnx.State, "rest": nnx.State}`` of ``model``: its parameters and its other
    variables except RNG state (BatchNorm statistics), as pure arrays."""
    return {
        "params": nnx.as_pure(nnx.state(model, nnx.Param)),
        "rest": nnx.as_pure(nnx.state(model, _rest_filter())),
    }


# -------------------------------------------------------------------------- the file


def _encode(value) -> tuple[np.ndarray, str]:
    """``(array to store, dtype name)``; dtypes NumPy cannot name travel as raw bits."""
    arr = np.asarray(value)
    name = arr.dtype.name
    if arr.dtype.isbuiltin and arr.dtype.kind in "biufc":
        return arr, name
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}")), name


def _decode(stored: np.ndarray, name: str) -> np.ndarray:
    dtype = np.dtype(jax.numpy.dtype(name))
    if stored.dtype == dtype:
        return stored
    if stored.dtype.kind == "u" and stored.dtype.itemsize == dtype.itemsize:
        return stored.view(dtype)
    raise ValueError(f"stored dtype {stored.dtype} cannot hold {name}")


def write_export(
    path: str | os.PathLike,
    *,
    cfg: Config,
    info: TaskInfo,
    variables: dict[str, nnx.State],
    step: int | None = None,
    source: str | None = None,
) -> Path:
    """Write an export file (see the module docstring) atomically; returns its path.

    Args:
      path: the output file (written as given; conventionally ``.npz``).
      cfg: the run's config.
      info: the task's inputs.
      variables: ``{"params": State, "rest": State}`` of pure arrays (see
        :func:`model_variables`).
      step: the checkpoint step the values come from, recorded for the user.
      source: the run directory, recorded for the user.
    """
    path = Path(path)
    entries, arrays = [], {}
    for collection in ("params", "rest"):
        for key_path, value in nnx.to_flat_state(variables[collection]):
            stored, dtype = _encode(value)
            arrays[f"v{len(entries)}"] = stored
            entries.append(
                {
                    "path": list(key_path),
                    "collection": collection,
                    "dtype": dtype,
                    "shape": list(stored.shape),
                }
            )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "task": dataclasses.asdict(info),
        "step": step,
        "source": source,
        "variables": entries,
    }
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Exported:
    """The contents of an export file: ``cfg``, ``info``, ``step``, ``source`` and
    ``variables`` (``{"params": {path: array}, "rest": {path: array}}``, paths as tuples)."""

    cfg: Config
    info: TaskInfo
    step: int | None
    source: str | None
    variables: dict[str, dict[tuple, np.ndarray]]

    @property
    def n_params(self) -> int:
        """Number of parameter values (a complex value counts once)."""
        return sum(int(v.size) for v in self.variables["params"].values())


class _Invalid(ValueError):
    """The file is not an intact export (a reason ``read_export`` states as it is)."""


def read_export(path: str | os.PathLike) -> Exported:
    """Read an export file. A missing file is a ``FileNotFoundError``; a file that is not an
    intact export (truncated, damaged, another format or version) a one-line
    ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no export file at {path}")
    bad = f"{path} is not a readable ssmix model export"
    try:
        return _read(path)
    except _Invalid as e:
        raise ValueError(f"{bad}: {e}") from None
    except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{bad} ({type(e).__name__}: {_first_line(e)})") from e


def _read(path: Path) -> Exported:
    if not zipfile.is_zipfile(path):
        raise _Invalid("it is not a .npz (zip) archive; is it truncated?")
    with np.load(path, allow_pickle=False) as archive:
        if META_KEY not in archive.files:
            raise _Invalid(f"it has no {META_KEY} member")
        meta = json.loads(archive[META_KEY].tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Invalid(f"its {META_KEY} member is not of format {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise _Invalid(
                f"it is of format version {meta.get('version')!r}; this ssmix reads "
                f"version {VERSION}"
            )
        variables: dict[str, dict[tuple, np.ndarray]] = {"params": {}, "rest": {}}
        for i, entry in enumerate(meta["variables"]):
            value = _decode(archive[f"v{i}"], entry["dtype"])
            if list(value.shape) != list(entry["shape"]):
                raise _Invalid(f"variable {i} has shape {list(value.shape)}, not {entry['shape']}")
            variables[entry["collection"]][tuple(entry["path"])] = value
    cfg = Config.from_dict(meta["config"])
    task = dict(meta["task"])
    if task.get("pixel_norm") is not None:
        task["pixel_norm"] = tuple(task["pixel_norm"])
    return Exported(cfg, TaskInfo(**task), meta.get("step"), meta.get("source"), variables)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def load_exported(path: str | os.PathLike) -> tuple[nnx.Module, Config]:
    """Rebuild the exported model: ``(model, cfg)``, the model in eval mode (dropout off,
    BatchNorm on its statistics) holding exactly the exported values.

    Raises ``FileNotFoundError`` / ``ValueError`` as :func:`read_export`, and a
    ``ValueError`` when this checkout builds a model of other variables, shapes or dtypes
    from the file's config (a layer that changed since the export)."""
    exported = read_export(path)
    model = build_model(exported.cfg, exported.info)
    expected = model_variables(model)
    for collection in ("params", "rest"):
        have = dict(nnx.to_flat_state(expected[collection]))
        saved = exported.variables[collection]
        missing, extra = (
            sorted(set(have) - set(saved), key=str),
            sorted(set(saved) - set(have), key=str),
        )
        if missing or extra:
            raise ValueError(
                f"{path}: the model this checkout builds from the exported config does not "
                f"match the file's {collection}: missing from the file "
                f"{_paths(missing)}, not in the model {_paths(extra)}"
            )
        for key, value in saved.items():
            want = have[key]
            if tuple(want.shape) != value.shape or np.dtype(want.dtype) != value.dtype:
                raise ValueError(
                    f"{path}: {'.'.join(map(str, key))} is {value.dtype}{list(value.shape)} "
                    f"in the file but {want.dtype}{list(want.shape)} in the model built from "
                    "its config"
                )
        nnx.update(
            model,
            nnx.from_flat_state({k: jax.numpy.asarray(v) for k, v in saved.items()}),
        )
    model.eval()
    return model, exported.cfg


def _paths(keys: list[tuple]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(".".join(map(str, k)) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


# ------------------------------------------------------------------------- from a run


def export_run(
    run: str | os.PathLike, out: str | os.PathLike, *, step: int | str | None = None
) -> Exported:
    """Export checkpoint ``step`` of run directory (or step folder) ``run`` to ``out``.

    ``step``: ``"best"`` (default; the best validation accuracy), ``"latest"`` or a step
    number. Only the model's variables are read from the checkpoint (the optimiser state
    is not), and no data is loaded. Returns what was written (as :func:`read_export`).
    Raises ``FileNotFoundError`` for a path that is not a run or a missing step (listing
    the available ones), :class:`~experiments.lra.train.CheckpointError` for an unreadable
    checkpoint.
    """
    from experiments.lra.evaluate import (
        choose_step,
        locate,
        parse_step,
        read_config,
        restore_model_state,
    )

    run_path, located = locate(run)
    choice = parse_step(located if step is None and located is not None else step)
    cfg = read_config(run_path)
    chosen = choose_step(run_path, choice, cfg.keep_checkpoints)
    info = TaskInfo.for_config(cfg)
    target = {
        k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
        for k, v in model_variables(build_model(cfg, info)).items()
    }
    variables = restore_model_state(run_path / "checkpoints", chosen, target)
    write_export(out, cfg=cfg, info=info, variables=variables, step=chosen, source=str(run_path))
    return read_export(out)  # read back: what was written is intact


def describe(exported: Exported, path: str | os.PathLike) -> str:
    """One line about an export: task, model, step, parameter count."""
    cfg, info = exported.cfg, exported.info
    return (
        f"{path}: {cfg.task} / {cfg.model} ({cfg.preset}), step {exported.step} of "
        f"{exported.source}, {exported.n_params} parameter values, "
        f"{len(exported.variables['rest'])} other variables; inputs: {info.kind}"
        + (f" (vocabulary {info.vocab_size})" if info.vocab_size else "")
        + f", {info.n_classes} classes"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 after an error (printed as one line)."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.export"),
        description="Export a trained LRA model (parameters, BatchNorm statistics, config) "
        "to one .npz file that load_exported() rebuilds without the optimiser.",
    )
    parser.add_argument("run", nargs="?", help="run directory or checkpoint step folder")
    parser.add_argument("--step", default=None, help="best (default), latest or a step number")
    parser.add_argument("--out", default=None, help="the file to write, e.g. model.npz")
    parser.add_argument("--inspect", default=None, metavar="FILE", help="describe an export")
    args = parser.parse_args(argv)
    if args.inspect is not None:
        if args.run is not None or args.out is not None:
            parser.error("--inspect FILE takes no RUN_DIR or --out")
    elif args.run is None or args.out is None:
        parser.error("give RUN_DIR and --out FILE (or --inspect FILE)")
    setup_logging()
    from experiments.lra.train import USER_ERRORS

    try:
        if args.inspect is not None:
            print(describe(read_export(args.inspect), args.inspect))
        else:
            exported = export_run(args.run, args.out, step=args.step)
            print(describe(exported, args.out))
    except USER_ERRORS as e:
        logger.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
