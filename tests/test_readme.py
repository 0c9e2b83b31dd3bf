"""The README stays true: its usage example runs, and its Linen example is the one that
tests/test_linen.py trains."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_usage_example_runs():
    usage = re.findall(r"```python\n(.*?)```", _section("Usage"), flags=re.S)
    assert len(usage) == 1
    namespace: dict = {}
    exec(compile(usage[0], "README: Usage", "exec"), namespace)
    assert namespace["y"].shape == (2, 64, 16)
    loss = float(namespace["loss"])
    assert loss == loss and loss > 0  # finite cross-entropy from the training step


def test_linen_example_is_the_tested_one():
    from tests.test_linen import EXAMPLE

    blocks = re.findall(r"```python\n(.*?)```", _section("Using ssmix from Linen"), flags=re.S)
    assert [b.strip() for b in blocks] == [EXAMPLE.strip()]
