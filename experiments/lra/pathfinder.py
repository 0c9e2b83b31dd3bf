"""Seeded Pathfinder / Path-X generator writing the LRA release layout.

Each image shows two long dashed curves ("snakes" of ``contour_length`` paddles that turn by
at most ``max_turn`` degrees per paddle), a few short distractor curves and two round
endpoint markers. Label 1: both markers sit on the two ends of the same long curve; label 0:
one marker on an end of each long curve. Curves keep a minimum distance from each other, so
connectivity is decided by following a curve, not by local cues. Geometry scales with the
resolution; lines are drawn at 4× (32 px) or 2× (128 px) and box-downsampled, which gives
the anti-aliased grey levels of the original images.

Layout (what :func:`experiments.lra.data.load_pathfinder` reads)::

    <out>/curv_contour_length_14/imgs/<b>/sample_<i>.png        grayscale, res × res
    <out>/curv_contour_length_14/metadata/<b>.npy               text, one row per image:
        imgs/<b> sample_<i>.png <i> <label> <contour_length> <paddle_length> <n_distractors>

Image ``i`` depends only on ``(seed, i)``. A metadata file is written (atomically) after all
of its images, so an interrupted run never lists a missing image.

This is a procedural stand-in for the published generator (Linsley et al., 2018), not a
pixel-exact copy: use the real release for reported numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.logs import program_name, setup_logging
from experiments.lra.data import PATHFINDER_DIFFICULTY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathfinderStyle:
    """Geometry in units of the image size S (fractions of S unless stated)."""

    contour_length: int = 14  # paddles per long curve
    distractor_length: int = 3  # paddles per distractor
    paddle: float = 0.035  # dash length
    gap: float = 0.02  # gap between dashes
    width_px: float = 1.0  # line width in output pixels (thin lines make Path-X harder)
    marker_radius: float = 0.045
    separation: float = 0.06  # minimum distance between different curves
    max_turn: float = 30.0  # degrees per paddle
    n_distractors: int = 5


def _dash_points(start, angle, length, step):
    """Points every ``step`` along a straight dash from ``start`` in direction ``angle``."""
    n = max(2, int(np.ceil(length / step)) + 1)
    t = np.arange(n) * (length / (n - 1))
    return start + t[:, None] * np.array([np.cos(angle), np.sin(angle)])


class _Occupancy:
    """Pixel grid of positions closer than ``radius`` to drawn points (a cheap distance test)."""

    def __init__(self, size: int, radius: float):
        self.grid = np.zeros((size, size), dtype=bool)
        r = int(np.ceil(radius))
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
        keep = dy**2 + dx**2 <= radius**2
        self.offsets = np.stack([dx[keep], dy[keep]], axis=-1)

    def hits(self, points: np.ndarray) -> bool:
        """Whether any of ``points (n, 2)`` (x, y) falls on a blocked pixel."""
        ij = np.clip(np.round(points).astype(int), 0, self.grid.shape[0] - 1)
        return bool(self.grid[ij[:, 1], ij[:, 0]].any())

    def stamp(self, points: np.ndarray) -> None:
        """Block every pixel within the radius of ``points (n, 2)``."""
        if len(points) == 0:
            return
        ij = np.round(points).astype(int)[:, None, :] + self.offsets[None]
        ij = np.clip(ij.reshape(-1, 2), 0, self.grid.shape[0] - 1)
        self.grid[ij[:, 1], ij[:, 0]] = True


def _draw_curve(rng, size, n_paddles, style, occupied: _Occupancy, tries=200):
    """A curve as ``(dashes [(p0, p1)], points (n, 2))`` in pixel coordinates that stays
    inside the image, off the ``occupied`` grid and away from itself; None after ``tries``."""
    paddle, gap = style.paddle * size, style.gap * size
    step = 0.25 * min(paddle, gap)
    sep = style.separation * size
    margin = style.marker_radius * size + 1.0
    max_turn = np.deg2rad(style.max_turn)
    # Self-avoidance ignores the last stretch of the curve (about 2 separations of arc
    # length, previous dash included): those points are meant to be close.
    recent = int(np.ceil((paddle + gap + 2.0 * sep) / step)) + 2
    for _ in range(tries):
        pos = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        dashes, own = [], np.zeros((0, 2))
        own_grid = _Occupancy(size, sep)
        stamped = 0
        for k in range(n_paddles):
            # Several candidate turns per paddle: growing a curve inside a small image fails
            # far less often than redrawing the whole curve on the first collision.
            for attempt in range(16):
                turn = rng.uniform(-max_turn, max_turn) if k or attempt else 0.0
                pts = _dash_points(pos, angle + turn, paddle + gap, step)
                if (
                    np.all((pts >= margin) & (pts <= size - margin))
                    and not occupied.hits(pts)
                    and not own_grid.hits(pts)
                ):
                    break
            else:
                break
            angle += turn
            end = pos + paddle * np.array([np.cos(angle), np.sin(angle)])
            dashes.append((pos.copy(), end))
            own = np.concatenate([own, pts])
            pos = pts[-1]
            old = max(0, len(own) - recent)
            own_grid.stamp(own[stamped:old])
            stamped = max(stamped, old)
        if len(dashes) == n_paddles:
            return dashes, own
    return None


@dataclass(frozen=True)
class PathfinderSample:
    """One image and the geometry behind it (pixel coordinates, x then y).

    ``pixels (res, res)`` uint8; ``label`` 1 if both markers sit on the same long curve;
    ``curves``: the two long curves and ``distractors``, each a list of dashes ``(p0, p1)``;
    ``markers (2, 2)``: the marker centres.
    """

    pixels: np.ndarray
    label: int
    curves: list
    distractors: list
    markers: np.ndarray


def generate_sample(
    rng: np.random.Generator, resolution: int, style: PathfinderStyle = PathfinderStyle()
) -> PathfinderSample:
    """Draw one Pathfinder sample at ``resolution`` × ``resolution``."""
    from PIL import Image, ImageDraw

    scale = 4 if resolution <= 64 else 2
    while True:
        occupied = _Occupancy(resolution, style.separation * resolution)
        curves = []
        for _ in range(2):
            curve = _draw_curve(rng, resolution, style.contour_length, style, occupied)
            if curve is None:
                break
            curves.append(curve[0])
            occupied.stamp(curve[1])
        if len(curves) == 2:
            break
    distractors = []
    for _ in range(style.n_distractors):
        curve = _draw_curve(rng, resolution, style.distractor_length, style, occupied, tries=20)
        if curve is not None:
            distractors.append(curve[0])
            occupied.stamp(curve[1])
    label = int(rng.random() < 0.5)
    first, second = curves
    if label:
        markers = [first[0][0], first[-1][1]]
    else:
        markers = [
            first[0][0] if rng.random() < 0.5 else first[-1][1],
            second[0][0] if rng.random() < 0.5 else second[-1][1],
        ]
    big = resolution * scale
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, int(round(style.width_px * scale)))
    for curve in curves + distractors:
        for p0, p1 in curve:
            draw.line([tuple(p0 * scale), tuple(p1 * scale)], fill=255, width=width)
    radius = style.marker_radius * resolution * scale
    for m in markers:
        cx, cy = m * scale
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return PathfinderSample(
        np.asarray(small, dtype=np.uint8), label, curves, distractors, np.stack(markers)
    )


def write_pathfinder(
    out_dir: str | os.PathLike,
    *,
    n_samples: int,
    resolution: int = 32,
    seed: int = 0,
    per_folder: int = 1000,
    style: PathfinderStyle = PathfinderStyle(),
    progress: bool | None = None,
) -> Path:
    """Generate ``n_samples`` images into ``out_dir/curv_contour_length_14`` (see module
    docstring); returns ``out_dir``. ``progress``: a bar over the images on stderr (default
    ``None``: only when stderr is a terminal)."""
    from PIL import Image
    from tqdm.auto import tqdm

    if n_samples <= 0 or per_folder <= 0 or resolution < 16:
        raise ValueError(
            "need n_samples > 0, per_folder > 0 and resolution >= 16; got "
            f"{n_samples}, {per_folder}, {resolution}"
        )
    root = Path(out_dir) / PATHFINDER_DIFFICULTY
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    progress_bar = tqdm(
        total=n_samples, desc=f"Pathfinder {resolution}x{resolution}", unit="image",
        disable=None if progress is None else not progress,
    )  # fmt: skip
    with progress_bar as bar:
        for b, start in enumerate(range(0, n_samples, per_folder)):
            folder = root / "imgs" / str(b)
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for i in range(start, min(start + per_folder, n_samples)):
                sample = generate_sample(np.random.default_rng([seed, i]), resolution, style)
                name = f"sample_{i}.png"
                Image.fromarray(sample.pixels, mode="L").save(folder / name)
                rows.append(
                    f"imgs/{b} {name} {i} {sample.label} {style.contour_length} "
                    f"{style.paddle * resolution:.2f} {len(sample.distractors)}\n"
                )
                bar.update(1)
            meta = root / "metadata" / f"{b}.npy"
            tmp = meta.with_name(meta.name + ".tmp")
            tmp.write_text("".join(rows), encoding="utf-8")
            os.replace(tmp, meta)
    logger.info("wrote %d Pathfinder images (%dx%d) to %s", n_samples, resolution, resolution, root)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m experiments.lra.pathfinder --out data/pathfinder32 --resolution 32``."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.pathfinder"), description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=None, help="default: data/pathfinder<resolution>")
    parser.add_argument("--resolution", type=int, default=32, help="32 (Pathfinder) or 128")
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    from experiments.lra.data import DATA_ROOT

    out = args.out or DATA_ROOT / f"pathfinder{args.resolution}"
    logger.info(
        "generating %d Pathfinder images (%dx%d) into %s",
        args.n_samples, args.resolution, args.resolution, out,
    )  # fmt: skip
    write_pathfinder(
        out,
        n_samples=args.n_samples,
        resolution=args.resolution,
        seed=args.seed,
        per_folder=args.per_folder,
        progress=False if args.no_progress else None,
    )


if __name__ == "__main__":
    main()
