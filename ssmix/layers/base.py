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

Precision policy
----------------

Three dtypes meet in a layer: the input's, the **storage** dtype of the parameters
(``param_dtype``) and the **computation** dtype of the activations (``dtype``).

- *Every layer returns its input's dtype*: ``bfloat16`` in, ``bfloat16`` out; ``float32`` in,
  ``float32`` out; ``float64`` in (under ``jax_enable_x64``), ``float64`` out, whatever
  ``dtype`` and ``param_dtype`` are. Integer input is a ``TypeError`` (it would be truncated).
- *SSM parameters* (Λ / A, P, B, C, Δ of S4, S4D, S5 and the PTD variants) are stored in
  ``param_dtype`` ∈ {``float32`` (default), ``float64``}. They are complex, and JAX has no
  complex ``bfloat16`` / ``float16``, so ``param_dtype=jnp.bfloat16`` (or ``float16``) on these
  layers is a ``ValueError`` that says to keep ``float32`` parameters and pass
  ``dtype=jnp.bfloat16`` instead (:func:`check_param_dtype`). Hydra's and the matrix mixers'
  real SSM parameters (``A_log``, ``dt_bias``) and their dense weights are float32 (Flax's
  default).
- ``dtype`` (argument of S4, S4D, S5, S4PTD, S5PTD, Hydra, ``MatrixMixer``,
  ``ShortConv``, ``GatedRMSNorm``; None = the input's dtype, :func:`check_dtype`) is the
  dtype of the activations and of the dense work on them: ``in_proj`` / ``out_proj``
  matmuls, the short convolution and the gating of Hydra and ``MatrixMixer`` (weights
  are cast to it on the fly, as ``nnx.Linear(dtype=)`` does). ``dtype=jnp.bfloat16`` on
  float32 inputs therefore runs those parts in bfloat16 and still returns float32.
- *The recurrence stays in float32*: the SSM core — S4 / S4D kernel generation, the FFT
  convolution, the chunked / scan recurrences, S5's scans, the SSD / quasiseparable kernels,
  and every matrix mixer's mixing matrix and its product (a ``cos(2π q s / max_len)`` at
  positions past 256 is not representable in bfloat16; ``jnp.fft.rfft`` refuses bfloat16)
  — runs in ``promote(dtype, param_dtype, float32)`` (:func:`ssm_dtype`): float32
  (complex64) for bfloat16, float16 or float32 activations, float64 (complex128) for float64
  ones. A state kept in bfloat16 would be rounded to 8 significant bits at every one of the
  ``L`` steps (and JAX has no complex bfloat16), so that is never offered. The core's output
  is cast back to ``dtype`` before the gate and ``out_proj``. For S4, S4D and S5, which have
  no projection, ``dtype`` sets the precision the input is read in (``x.astype(dtype)``) and
  whether the core runs in float32 or float64.
- Gated RMSNorm computes its statistics (mean square, rsqrt) in at least float32 and gates
  in ``dtype``.

Linen interop
-------------

``flax.nnx.bridge.to_linen`` puts each variable in the Linen collection named by
``flax.nnx.variablelib.variable_name_from_type``, which knows ``nnx.Param`` as ``'params'``
but would register :class:`SSMParam` under a collection of its own (``'SSMParam'``), which
``TrainState.create(params=variables['params'])`` would then silently leave untrained.
Flax's registry maps one name to one type, so ``'params'`` cannot name both classes; instead,
importing this module wraps that function so that :class:`SSMParam` (and any subclass not
registered under a name of its own) lands in ``'params'``. To keep the SSM parameters in a
collection of their own, register one:
``flax.nnx.variablelib.register_variable_name("ssm_params", SSMParam)``. NNX code is not
affected: ``nnx.state(model, SSMParam)`` and :mod:`ssmix.optim` still see the type.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import variablelib

from ssmix._checks import check_floating, check_ndim

#: Storage dtypes of complex SSM parameters (``param_dtype`` of S4, S4D, S5, S4PTD, S5PTD).
SSM_PARAM_DTYPES = ("float32", "float64")


class SSMParam(nnx.Param):
    """A state-space parameter (Λ / A, P, B, Δ): own learning rate, no weight decay."""


def check_param_dtype(param_dtype: Any, layer: str) -> jnp.dtype:
    """``param_dtype`` of a layer with complex SSM parameters, as a dtype: float32 or float64.

    ``bfloat16`` / ``float16`` raise a ``ValueError`` that says why (no complex type of that
    width; the state recurrence needs float32) and what to use instead (``dtype=``).
    """
    try:
        dt = jnp.dtype(param_dtype)
    except TypeError as err:
        raise ValueError(
            f"{layer}: param_dtype must be float32 or float64; got {param_dtype!r}"
        ) from err
    if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"{layer}: param_dtype={dt.name} cannot store the complex SSM parameters (Λ, B, C, "
            f"Δ): JAX has no complex {dt.name}, and the state recurrence must run in float32. "
            f"Keep param_dtype=float32 (or float64) and pass dtype=jnp.{dt.name} to compute "
            f"the activations in {dt.name}"
        )
    if dt.name not in SSM_PARAM_DTYPES:
        raise ValueError(f"{layer}: param_dtype must be float32 or float64; got {dt.name}")
    return dt


def check_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype | None:
    """A layer's computation ``dtype``: None (the input's) or a floating dtype (bfloat16,
    float16, float32, float64), returned as a dtype; anything else is a ``ValueError``."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(
            f"{name} must be None or a floating dtype (bfloat16, float16, float32, float64); "
            f"got {dtype!r}"
        ) from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{name} must be None or a floating dtype (bfloat16, float16, float32, float64); "
            f"got {dt.name}"
        )
    return dt


def activation_dtype(x_dtype: Any, dtype: jnp.dtype | None) -> jnp.dtype:
    """The dtype activations are computed in: ``dtype``, or the input's when it is None."""
    return jnp.dtype(x_dtype if dtype is None else dtype)


def ssm_dtype(act_dtype: Any, param_dtype: Any = jnp.float32) -> jnp.dtype:
    """The real dtype of an SSM core: ``promote(act_dtype, param_dtype, float32)``
    (float32 for bfloat16 / float16 / float32 activations, float64 for float64 ones)."""
    return jnp.promote_types(jnp.promote_types(act_dtype, param_dtype), jnp.float32)


def _ssm_params_in_linen_params() -> None:
    """Make ``variable_name_from_type`` name :class:`SSMParam` ``'params'`` (module docstring).

    Idempotent; a reload of this module re-wraps flax's original function, not the wrapper.
    """
    original = getattr(
        variablelib.variable_name_from_type,
        "_ssmix_original",
        variablelib.variable_name_from_type,
    )

    @functools.wraps(original)
    def variable_name_from_type(typ, /, *, allow_register=False):
        registered = any(t is typ for t in variablelib.VariableTypeCache.values())
        if not registered and isinstance(typ, type) and issubclass(typ, SSMParam):
            return "params"
        return original(typ, allow_register=allow_register)

    variable_name_from_type._ssmix_original = original
    variablelib.variable_name_from_type = variable_name_from_type
    nnx.variable_name_from_type = variable_name_from_type


_ssm_params_in_linen_params()


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
    check_floating("x_t", x_t)
    if x_t.shape[1] != features:
        raise ValueError(f"x_t must have shape (B, {features}); got {x_t.shape}")
