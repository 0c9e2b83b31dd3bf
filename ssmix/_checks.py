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


def check_floating(name: str, x: Any, hint: str = "") -> None:
    """``TypeError`` unless ``x`` is a floating-point array: an integer input would come back
    truncated. ``hint`` is appended to the message's advice."""
    import jax.numpy as jnp

    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float32, float64, bfloat16, ...); got "
            f"{x.dtype}: cast it, e.g. {name}.astype(jnp.float32){hint}"
        )


def check_sequence_input(
    x: Any, mask: Any, features: int, *, name: str = "x", features_name: str | None = None
) -> None:
    """The one input rule of every sequence layer.

    ``x`` must be a floating-point array of shape ``(B, L, features)`` with ``L >= 1``
    (integer input would be truncated on the way out: ``TypeError``); ``mask`` is ``None`` or
    a **boolean** ``(B, L)`` array, True = valid position (a float weight such as 0.3 is not a
    validity flag: ``TypeError``, convert with ``mask > 0``). ``features_name`` (e.g.
    ``"d_model"``) names the feature axis in the shape errors: ``(B, L, d_model=8)``.
    """
    import jax.numpy as jnp

    label = str(features) if features_name is None else f"{features_name}={features}"
    shape_doc = f"(B, L, {label})"
    check_ndim(name, x, 3, shape_doc)
    check_floating(name, x, ", or embed integer tokens first")
    if x.shape[-1] != features:
        raise ValueError(f"{name} must have shape {shape_doc}; got {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have a positive length (axis 1); got shape {x.shape}")
    if mask is not None:
        dtype = getattr(mask, "dtype", None)
        if dtype is None or jnp.dtype(dtype) != jnp.bool_:
            raise TypeError(
                f"mask must be a boolean array of shape (B, L), True = valid position; got "
                f"{dtype if dtype is not None else type(mask).__name__} (convert with mask > 0)"
            )
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"mask must have shape (B, L) = {tuple(x.shape[:2])}; got {mask.shape}"
            )
