"""Packaging metadata: pyproject.toml against the code and the installed distribution.

Fast and offline: reads pyproject.toml, parses the sources' imports, and asks
importlib.metadata about the installed (editable) ssmix; nothing is built or installed here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import ssmix

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Import name -> distribution name, where they differ.
DIST_OF_MODULE = {"PIL": "pillow", "orbax": "orbax-checkpoint"}


def _dist_names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings ("jax>=0.10.1" -> "jax")."""
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}


def _third_party_imports(package_dir: Path) -> set[str]:
    """Top-level modules imported anywhere (also inside functions) by the .py files under
    ``package_dir``, less the standard library and the repository's own packages."""
    own = {"ssmix", "experiments"}
    found = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
    return {m for m in found if m not in sys.stdlib_module_names and m not in own}


def test_console_scripts_resolve_to_main_callables():
    scripts = PROJECT["scripts"]
    assert {
        "ssmix-lra-train",
        "ssmix-lra-eval",
        "ssmix-lra-demo",
        "ssmix-lra-results",
    } <= set(scripts)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        assert attr == "main", f"{name}: {target}"
        func = getattr(importlib.import_module(module_name), attr)
        assert callable(func), f"{name}: {target} is not callable"
    # The installed metadata (pip install -e) declares the same scripts as pyproject.toml.
    installed = {
        ep.name: ep.value
        for ep in md.distribution("ssmix").entry_points
        if ep.group == "console_scripts"
    }
    assert installed == scripts


def test_version_has_one_source():
    assert "version" not in PROJECT
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ssmix.__version__"}
    assert ssmix.__version__ == md.version("ssmix")
    # A literal, so that setuptools reads it without importing ssmix (and jax) at build time.
    tree = ast.parse((ROOT / "ssmix" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [ssmix.__version__]


def test_py_typed_and_license_present_and_declared():
    assert (ROOT / "ssmix" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ssmix"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert md.metadata("ssmix")["License-Expression"] == "Apache-2.0"


def test_core_dependencies_are_what_ssmix_imports():
    core = _dist_names(PROJECT["dependencies"])
    imported = {DIST_OF_MODULE.get(m, m).lower() for m in _third_party_imports(ROOT / "ssmix")}
    assert imported == core == {"jax", "flax", "optax", "numpy"}


def test_experiments_extra_covers_what_experiments_imports():
    extras = PROJECT["optional-dependencies"]
    available = _dist_names(PROJECT["dependencies"]) | _dist_names(extras["experiments"])
    imported = {
        DIST_OF_MODULE.get(m, m).lower() for m in _third_party_imports(ROOT / "experiments")
    }
    assert imported <= available, sorted(imported - available)
    assert _dist_names(extras["experiments"]) == {
        "orbax-checkpoint",
        "tqdm",
        "matplotlib",
        "pillow",
    }
    # dev runs the whole suite, experiments included, at the same floors.
    assert set(extras["experiments"]) <= set(extras["dev"])


def test_no_chex_dependency():
    declared = set(_dist_names(PROJECT["dependencies"]))
    for requirements in PROJECT["optional-dependencies"].values():
        declared |= _dist_names(requirements)
    assert "chex" not in declared
    imported = _third_party_imports(ROOT / "ssmix") | _third_party_imports(ROOT / "experiments")
    assert "chex" not in imported


BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("orbax", "tqdm", "matplotlib", "PIL")


    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked")
            return None


    sys.meta_path.insert(0, Block())
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        assert "blocked" in str(e)
    else:
        raise AssertionError("the blocker let orbax through")

    import ssmix
    import ssmix.blocks
    import ssmix.layers
    import ssmix.optim
    import ssmix.testing

    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("ok", len(ssmix.layers.__all__))
    """
)


def test_ssmix_imports_without_the_experiments_extra():
    """orbax, tqdm, matplotlib and pillow made unimportable: the library still imports."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
