"""Every notebook in ``notebooks/`` runs top to bottom, and its committed copy is current.

The notebooks are written from the cell sources in ``notebooks/build.py``; executing the
committed ``.ipynb`` (not the build script) is what a user does, so that is what runs here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = ["01_hippo", "02_ssm_kernels", "03_matrix_mixers", "04_attention", "05_causal_models"]

sys.path.insert(0, str(NOTEBOOK_DIR))
import build  # noqa: E402  (notebooks/build.py, the notebooks' cell sources)

sys.path.pop(0)


def test_every_notebook_is_listed():
    on_disk = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert on_disk == NAMES
    assert sorted(build.NOTEBOOKS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
    """The committed cells are the build script's cells (nobody edited one side only)."""
    committed = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    expected = build.parse(build.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in expected
    ]
    # Committed with outputs: every code cell ran, in order.
    counts = [c.execution_count for c in committed.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))


def test_notebooks_import_only_the_public_api():
    for name in NAMES:
        source = build.NOTEBOOKS[name]
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ssmix", "from ssmix")):
                module = stripped.split()[1]
                assert not any(part.startswith("_") for part in module.split(".")), line
                assert " _" not in stripped.split(" import ", 1)[-1], line


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, json.dumps(errors, default=str)[:2000]
    images = sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert images >= 3, f"{name} produced {images} plots"
