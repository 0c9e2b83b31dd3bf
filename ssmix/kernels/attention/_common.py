"""Helpers shared by the attention kernels: dtype and input checks, masked softmax pieces,
the online-softmax step, block reshaping and the accelerator rules' tile budget.

Private to :mod:`ssmix.kernels.attention`; the public functions live in its modules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

#: Largest per-step array the accelerator rules give a blocked kernel (the memory target of
#: ``benchmarks/accelerator.py``). Under ``auto_backend("gpu" | "tpu")`` the default blocks
#: are the largest whose per-step tiles fit in it: the fewest loop steps that memory allows.
ACCEL_TILE_BYTES = 256 * 2**20


def tile_fits(nbytes: int) -> bool:
    """Whether one array of ``nbytes`` fits in :data:`ACCEL_TILE_BYTES`."""
    return nbytes <= ACCEL_TILE_BYTES


def tile_fit(per_unit_bytes: int) -> int:
    """How many units of ``per_unit_bytes`` fit in :data:`ACCEL_TILE_BYTES`: a power of two ≥ 1."""
    units = ACCEL_TILE_BYTES // max(per_unit_bytes, 1)
    return 1 << max(units.bit_length() - 1, 0)


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """float32 for low-precision inputs, else the inputs' common floating dtype."""
    return jnp.result_type(*xs, jnp.float32)


def check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{name} must be a real floating-point array; got dtype {x.dtype}")


def check_mask(mask: jax.Array | None, shape: tuple[int, ...], shape_doc: str) -> None:
    if mask is None:
        return
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid); got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"mask must have shape {shape_doc} = {tuple(shape)}; got {mask.shape}")


def isolate(mask: jax.Array | None, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Zero every ``x (B, n, ..., c)`` where ``mask (B, n)`` (or ``(B, *grid)``) is False.

    ``jnp.where``, never a product with the mask: the weights of masked keys are 0, and
    ``0 · NaN`` is NaN, so without this a NaN or inf stored at a padded position would make
    every valid output (and gradient) NaN. ``mask=None`` returns ``xs`` unchanged. The mask
    is broadcast over the axes between the masked ones and the last (e.g. heads).
    """
    if mask is None:
        return xs
    out = []
    for x in xs:
        keep = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        out.append(jnp.where(keep, x, jnp.zeros((), x.dtype)))
    return tuple(out)


def default_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")
    return float(scale)


def softmax_parts(s: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax over the last axis restricted to ``valid`` (None: all valid).

    Returns ``e = exp(s − max)`` (0 where invalid) and its row sums ``z`` (keepdims; 0 for a
    row without a valid entry). Invalid scores are replaced before ``exp`` (not only after) so
    that neither the value nor the gradient can see an overflow there. Callers normalise
    after contracting with the values (:func:`normalise`): one pass less over the scores.
    """
    if valid is None:
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - m)
    else:
        m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.where(valid, jnp.exp(jnp.where(valid, s, m) - m), 0.0)
    return e, jnp.sum(e, axis=-1, keepdims=True)


def normalise(o: jax.Array, z: jax.Array) -> jax.Array:
    """Divide by the softmax row sums; rows without a valid entry (z = 0) stay 0."""
    return o / jnp.where(z > 0, z, 1.0)


def masked_softmax(s: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Softmax over the last axis restricted to ``valid``; rows with no valid entry give 0."""
    return normalise(*softmax_parts(s, valid))


def online_update(carry, s, valid, axes, weighted_values):
    """One online-softmax step: fold a block of scores ``s`` into ``(m, l, acc)``.

    ``axes`` are the block's key axes of ``s``; ``m`` and ``l`` (running max and normaliser)
    have the shape of ``s`` without them, ``acc`` has a trailing value axis.
    ``weighted_values(p)`` returns ``Σ_keys p · value`` for the block.
    """
    m, l, acc = carry
    # The output does not depend on the running max, so no gradient flows through it.
    m_blk = jax.lax.stop_gradient(jnp.max(jnp.where(valid, s, -jnp.inf), axis=axes))
    m_new = jnp.maximum(m, m_blk)
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    m_b = jnp.expand_dims(m_safe, axes)
    p = jnp.where(valid, jnp.exp(jnp.where(valid, s, m_b) - m_b), 0.0)
    alpha = jnp.exp(m - m_safe)  # exp(-inf) = 0 while nothing valid has been seen
    l_new = alpha * l + jnp.sum(p, axis=axes)
    acc_new = alpha[..., None] * acc + weighted_values(p)
    return m_new, l_new, acc_new


def finish(m, l, acc):
    """Output and log-normaliser from the online-softmax state; empty rows give 0."""
    has = l > 0
    o = acc / jnp.where(has, l, 1.0)[..., None]
    lse = jnp.where(has, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(has, l, 1.0)), 0.0)
    return o, lse


def blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Pad ``axis`` to a multiple of ``block`` and move the block index to the front."""
    n = x.shape[axis]
    nb = -(-n // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, nb * block - n)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def unblock(x: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of :func:`blocks` for an array whose block index is in front."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)
