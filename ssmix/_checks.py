"""Input validation shared by kernels and layers: clear errors naming what was expected."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_ndim(name: str, x: Any, ndims: int | Sequence[int], shape_doc: str) -> None:
    """Raise ``ValueError`` unless ``x.ndim`` is one of ``ndims``; ``shape_doc`` names the axes."""
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if getattr(x, "ndim", None) not in ndims:
        got = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must have shape {shape_doc}; got {got}")


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


def check_even(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive even integer (conjugate-pair state sizes)."""
    check_positive_int(name, value)
    if value % 2:
        raise ValueError(
            f"{name} must be even (the state is stored as {name}/2 conjugate pairs); got {value}"
        )
    return value
