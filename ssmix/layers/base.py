"""Conventions shared by every ssmix layer.

- Activations are ``(batch, length, features)``. Every mixer is called as
  ``layer(x, mask=None, ...)`` where ``mask`` is an optional boolean ``(B, L)`` array, True at
  valid positions (right padding). Padded positions must not influence valid outputs in
  either direction.
- SSM parameters (the state matrix Λ / A, its low-rank term P, the input matrix B and the
  step Δ) are :class:`SSMParam` variables, a subclass of ``nnx.Param``. ``ssmix.optim``
  finds them by type to give them their own learning rate and no weight decay.
- Complex parameters are stored as real arrays with a trailing axis of size 2 (real, imag);
  :func:`complex_param` and :func:`as_complex` convert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix._checks import check_ndim


class SSMParam(nnx.Param):
    """A state-space parameter (Λ / A, P, B, Δ): own learning rate, no weight decay."""


def complex_param(value: jax.Array, cls: type[nnx.Variable] = SSMParam) -> nnx.Variable:
    """Store a complex array ``(...)`` as a real variable ``(..., 2)`` of class ``cls``."""
    value = jnp.asarray(value)
    return cls(jnp.stack([jnp.real(value), jnp.imag(value)], axis=-1))


def as_complex(var: nnx.Variable | jax.Array) -> jax.Array:
    """Read a real ``(..., 2)`` variable (or array) back as a complex array ``(...)``."""
    value = var[...] if isinstance(var, nnx.Variable) else var
    return jax.lax.complex(value[..., 0], value[..., 1])


def mask_ends(mask: jax.Array) -> jax.Array:
    """``(B,)`` one past each row's last valid position of ``mask (B, L)`` (0 if none): the
    length for right padding."""
    L = mask.shape[1]
    return jnp.max(jnp.where(mask, jnp.arange(1, L + 1), 0), axis=1)


def check_step_input(x_t: jax.Array, features: int) -> None:
    """``x_t`` of :meth:`step`: a floating ``(B, features)`` array (integers would come back
    truncated: ``TypeError``)."""
    check_ndim("x_t", x_t, 2, f"(B, {features})")
    if not jnp.issubdtype(x_t.dtype, jnp.floating):
        raise TypeError(
            f"x_t must be a floating-point array (float32, float64, bfloat16, ...); got "
            f"{x_t.dtype}: cast it, e.g. x_t.astype(jnp.float32)"
        )
    if x_t.shape[1] != features:
        raise ValueError(f"x_t must have shape (B, {features}); got {x_t.shape}")
