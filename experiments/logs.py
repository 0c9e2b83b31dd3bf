"""Logging for the command-line tools: one handler on the ``experiments`` and ``ssmix``
loggers, independent of the root logger.

``logging.basicConfig`` does nothing once any handler sits on the root logger, and importing
orbax (through absl) puts one there; a tool that relied on it printed none of its INFO
lines. :func:`setup_logging` attaches its own stderr handler to the package loggers instead
(idempotent: calling it twice does not double the lines) and quiets absl's INFO chatter.
The package loggers stop propagating to the root logger (absl's handler there would print
every line twice), so tests read the lines with ``capsys`` rather than ``caplog``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_HANDLER_NAME = "ssmix-cli"
PACKAGE_LOGGERS = ("experiments", "ssmix")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's ``capsys`` sees it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(level: int | str = logging.INFO, *, fmt: str | None = None) -> None:
    """Send the ``experiments.*`` and ``ssmix.*`` log records at ``level`` and above to stderr.

    Args:
      level: a ``logging`` level (``logging.INFO``) or its name (``"DEBUG"``).
      fmt: the line format; default ``"HH:MM:SS message"``.
    """
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown logging level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = value
    formatter = logging.Formatter(fmt or "%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in PACKAGE_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(level)
        log.propagate = False  # the root logger's handlers (absl's) would print it twice
        handler = next((h for h in log.handlers if h.get_name() == _HANDLER_NAME), None)
        if handler is None:
            handler = _StderrHandler()
            handler.set_name(_HANDLER_NAME)
            log.addHandler(handler)
        handler.setLevel(level)
        handler.setFormatter(formatter)
    logging.getLogger("absl").setLevel(logging.WARNING)


def program_name(module: str) -> str:
    """The name a command's usage line shows: the console script's (``ssmix-lra-train``)
    when run as one, else ``python -m <module>``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("ssmix-") else f"python -m {module}"
