"""Collect LRA run summaries into one table, next to the published numbers.

``python -m experiments.lra.results RUN_DIR_OR_GLOB ... [--json out.json] [--markdown out.md]``

Each argument is a run directory (holding ``summary.json`` and ``config.json``, written by
:func:`experiments.lra.train.train`), a glob of them, or a folder searched recursively for
runs. Runs are grouped by (task, model, preset); within a group the seeds are averaged:
the reported number is the **test accuracy at the best validation step** (what the papers
report), as mean ± sample standard deviation over seeds (no ± for a single seed), in
percent. Runs of one group whose configs differ in anything besides the seed and the paths
are flagged under the table. The markdown goes to stdout (and ``--markdown``); ``--json``
writes the groups with every number.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
from pathlib import Path

from experiments.logs import program_name, setup_logging
from experiments.lra.configs import MODELS, TASKS

logger = logging.getLogger("experiments.lra")

TASK_TITLES = {
    "listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
    "pathfinder": "Pathfinder", "pathx": "Path-X",
}  # fmt: skip

# Test accuracy (%) reported by the papers (their LRA tables: S4 and S4D by Gu et al.,
# S5 by Smith et al., S4-PTD / S5-PTD by Yu et al.). Only numbers that could be checked are
# listed: for S4-PTD / S5-PTD the average and Path-X.
PUBLISHED: dict[str, dict] = {
    "s4": {
        "source": "S4 (Gu et al. 2022, v3 configs)",
        "listops": 59.60, "text": 86.82, "retrieval": 90.90, "image": 88.65,
        "pathfinder": 94.20, "pathx": 96.35, "avg": 86.09,
    },
    "s4d": {
        "source": "S4D-LegS (Gu et al. 2022)",
        "listops": 60.47, "text": 86.18, "retrieval": 89.46, "image": 88.19,
        "pathfinder": 93.06, "pathx": 91.95, "avg": 84.89,
    },
    "s5": {
        "source": "S5 (Smith et al. 2023)",
        "listops": 62.15, "text": 89.31, "retrieval": 91.40, "image": 88.00,
        "pathfinder": 95.33, "pathx": 98.58, "avg": 87.46,
    },
    "s4-ptd": {"source": "S4-PTD (Yu et al. 2024)", "pathx": 96.39, "avg": 86.58},
    "s5-ptd": {"source": "S5-PTD (Yu et al. 2024)", "avg": 87.61},
}  # fmt: skip

# Config fields that may differ between the seeds of one group.
_PER_RUN = ("seed", "run_name", "out_dir", "data_dir", "progress")


def find_runs(patterns: list[str]) -> list[Path]:
    """The run directories named by ``patterns`` (directories, globs, or folders searched
    recursively for ``summary.json``), sorted and deduplicated. A pattern that names no run
    is a ``FileNotFoundError``."""
    runs: set[Path] = set()
    for pattern in patterns:
        paths = [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
        found = set()
        for path in paths:
            if path.is_file() and path.name == "summary.json":
                path = path.parent
            if (path / "summary.json").is_file():
                found.add(path)
            elif path.is_dir():
                found.update(p.parent for p in path.rglob("summary.json"))
        if not found:
            raise FileNotFoundError(
                f"{pattern!r} names no finished run (a directory with summary.json)"
            )
        runs |= found
    return sorted(runs)


def load_run(path: Path) -> dict:
    """``{"path", "config", "summary"}`` of one run directory."""
    out = {"path": str(path)}
    for name, key in (("config.json", "config"), ("summary.json", "summary")):
        try:
            out[key] = json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path / name}: {e}") from e
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def collect(runs: list[dict]) -> list[dict]:
    """Group runs by (task, model, preset) and average over seeds.

    Each group: ``task``, ``model``, ``preset``, ``n``, ``seeds``, ``runs`` (paths),
    ``best_steps``; ``test_at_best``, ``val_best``, ``test_final`` as ``{"mean", "std",
    "values"}`` in percent (``std`` None for one seed); ``config_differences`` (fields other
    than the seed and paths whose values differ between the runs) and ``duplicate_seeds``.
    """
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        cfg = run["config"]
        groups.setdefault((cfg["task"], cfg["model"], cfg["preset"]), []).append(run)
    out = []
    for (task, model, preset), members in groups.items():
        members = sorted(members, key=lambda r: (r["config"]["seed"], r["path"]))
        seeds = [r["config"]["seed"] for r in members]

        def stat(get, members=members):
            values = [100.0 * get(r["summary"]) for r in members]
            mean, std = _mean_std(values)
            return {"mean": mean, "std": std, "values": values}

        keys = sorted({k for r in members for k in r["config"]} - set(_PER_RUN))
        differ = [
            k for k in keys
            if len({json.dumps(r["config"].get(k), sort_keys=True) for r in members}) > 1
        ]  # fmt: skip
        out.append(
            {
                "task": task, "model": model, "preset": preset, "n": len(members),
                "seeds": seeds, "runs": [r["path"] for r in members],
                "best_steps": [r["summary"]["best"]["step"] for r in members],
                "test_at_best": stat(lambda s: s["best"]["test"]["accuracy"]),
                "val_best": stat(lambda s: s["best"]["val"]["accuracy"]),
                "test_final": stat(lambda s: s["final"]["test"]["accuracy"]),
                "config_differences": differ,
                "duplicate_seeds": sorted({s for s in seeds if seeds.count(s) > 1}),
            }
        )  # fmt: skip
    order = {m: i for i, m in enumerate(MODELS)}
    tasks = {t: i for i, t in enumerate(TASKS)}
    out.sort(key=lambda g: (order.get(g["model"], 99), g["preset"], tasks.get(g["task"], 99)))
    return out


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def to_markdown(groups: list[dict]) -> str:
    """The results table (test accuracy at the best validation step, %, mean ± std over
    seeds), each model followed by its published row, then a per-group detail table."""
    header = "| model | preset | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " | Avg |"
    lines = [
        "Test accuracy (%) at the best validation step, mean ± std over seeds "
        "(sample std; number of seeds in the detail table).",
        "",
        header,
        "|" + "---|" * (len(TASKS) + 3),
    ]
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for g in groups:
        rows.setdefault((g["model"], g["preset"]), {})[g["task"]] = g["test_at_best"]
    shown_published = set()
    for (model, preset), by_task in rows.items():
        cells = [_cell(by_task.get(t)) for t in TASKS]
        avg = (
            f"{sum(by_task[t]['mean'] for t in TASKS) / len(TASKS):.2f}"
            if all(t in by_task for t in TASKS)
            else "—"
        )
        lines.append(f"| {model} | {preset} | " + " | ".join(cells) + f" | {avg} |")
        if model in PUBLISHED and model not in shown_published:
            shown_published.add(model)
            pub = PUBLISHED[model]
            cells = [f"{pub[t]:.2f}" if t in pub else "—" for t in TASKS]
            avg = f"{pub['avg']:.2f}" if "avg" in pub else "—"
            lines.append(
                f"| {model} | published: {pub['source']} | " + " | ".join(cells) + f" | {avg} |"
            )
    lines += [
        "",
        "| task | model | preset | seeds | best val | best step | test at best val "
        "| test at last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for g in groups:
        lines.append(
            f"| {TASK_TITLES.get(g['task'], g['task'])} | {g['model']} | {g['preset']} "
            f"| {g['n']} ({', '.join(map(str, g['seeds']))}) | {_cell(g['val_best'])} "
            f"| {', '.join(map(str, g['best_steps']))} | {_cell(g['test_at_best'])} "
            f"| {_cell(g['test_final'])} |"
        )
        name = f"{g['task']} / {g['model']} / {g['preset']}"
        if g["config_differences"]:
            notes.append(
                f"- {name}: the runs' configs differ in {', '.join(g['config_differences'])} "
                "(averaged anyway)"
            )
        if g["duplicate_seeds"]:
            notes.append(f"- {name}: seed(s) {g['duplicate_seeds']} appear more than once")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the markdown table; write ``--json`` / ``--markdown``."""
    parser = argparse.ArgumentParser(
        prog=program_name("experiments.lra.results"),
        description="Collect LRA run summaries into a table.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, globs, or folders of runs")
    parser.add_argument("--json", default=None, help="write the groups as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        paths = find_runs(args.runs)
        groups = collect([load_run(p) for p in paths])
    except (OSError, ValueError) as e:
        logger.error("error: %s", e)
        return 1
    logger.info("collected %d run(s) into %d group(s)", len(paths), len(groups))
    text = to_markdown(groups)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        payload = {"groups": groups, "published": PUBLISHED}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
