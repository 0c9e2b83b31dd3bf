"""The ``"parallel"`` form of :func:`ssmix.kernels.scan.linear_scan`: no loop at all (the
accelerator rules' default).

The time axis is cut into chunks of ``T`` steps and everything inside a chunk is computed in
closed form. With the decay matrix ``W[t, s] = a_{s+1} ⋯ a_t`` (``t ≥ s``, zero above the
diagonal) of every chunk, the states from a zero start are one contraction
``Σ_s W[t, s] b_s`` (batched matmuls), every chunk's state at its end is the last of them and
the decay across the chunk is ``a_0 ⋯ a_{T−1}``. An ``lax.associative_scan`` over the ``L/T``
chunk summaries ``(decay, end state)`` gives the state entering each chunk, and
``x_t = local_t + (a_0 ⋯ a_t) x_in`` finishes every chunk at once. Nothing is sequential but
the ``log₂(L/T)`` levels of the chunk scan.

- Constant ``a``: ``W[t, s] = a^(t−s)``, one ``(T, T, *S_a)`` tensor shared by every chunk.
- Time-varying ``a``: ``W`` is built per chunk from segment sums of ``log|a|`` (and of the
  angle for complex ``a``), as Mamba-2's SSD does: the sums ``Σ_{s<r≤t}`` are cumulative sums
  of a masked ``(T, T)`` tile (no difference of two long prefix sums, so no cancellation),
  zero decays are counted apart (a segment containing one has ``W = 0``; ``log 0`` is never
  taken) and negative real decays by the parity of their count. The tensor is
  ``(B or 1, L/T, T, T, *S_a)``: ``T`` times the size of ``a``.

Chunk length (``chunk_size=None``): ``T = 64`` (a multiple of the matmul tiles; the
contraction costs ``O(T)`` per state element), halved while the decay tensor would exceed
:data:`DECAY_BUDGET` bytes. For S5 at ``B = 2, L = 16384`` with 32 complex modes it is
``(64, 64, 32)`` complex64, 1 MiB, and the largest array is the ``(B, L, P)`` states. A
time-varying decay tensor takes about ``T`` times the size of ``a`` (a float32 ``a`` of 4 MiB
gets ``T = 16``); at ``T = 1`` the form is a plain associative scan. The contraction runs at
``Precision.HIGHEST``: the other forms multiply in full float32, where a TPU's or TF32 GPU's
default matmul precision would round the inputs to bfloat16 / TF32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from ssmix.kernels.scan._common import int_power

#: Chunk length when none is given (halved while the decay tensor exceeds the budget).
DEFAULT_CHUNK = 64

#: Bytes the ``(…, T, T, *S_a)`` decay tensor may take when the chunk length is chosen.
DECAY_BUDGET = 64 * 2**20

_LETTERS = "defghijklmnopqruvwxyz"  # einsum labels of the state axes (not b, c, s, t)


def default_chunk(a_shape, L: int, time_varying: bool, itemsize: int) -> int:
    """The chunk length ``T`` used when none is given (module docstring)."""
    n_a = math.prod(a_shape[2:] if time_varying else a_shape)

    def decay_bytes(T):
        tiles = a_shape[0] * -(-L // T) if time_varying else 1
        return tiles * T * T * n_a * itemsize

    T = min(DEFAULT_CHUNK, L)
    while T > 1 and decay_bytes(T) > DECAY_BUDGET:
        T //= 2
    return T


def _segment_sums(x):
    """``out[..., t, s, *] = Σ_{s < r ≤ t} x[..., r, *]`` for ``x (Ba, C, T, *S)``, zero for
    ``t ≤ s``: ``(Ba, C, T, T, *S)``."""
    T = x.shape[2]
    strict = (jnp.arange(T)[:, None] > jnp.arange(T)[None, :]).reshape(T, T, *(1,) * (x.ndim - 3))
    tile = jnp.where(strict, x[:, :, :, None], 0)
    return jnp.cumsum(tile, axis=2)


def _varying_decays(a):
    """Decay matrices ``W (Ba, C, T, T, *S_a)`` and prefix products ``a_0 ⋯ a_t
    (Ba, C, T, *S_a)`` of chunked time-varying decays ``a (Ba, C, T, *S_a)``."""
    T = a.shape[2]
    trail = (1,) * (a.ndim - 3)
    lower = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]).reshape(T, T, *trail)
    mag = jnp.abs(a)
    is_zero = mag == 0
    zeros = jnp.cumsum(is_zero.astype(jnp.int32), axis=2)
    # A segment (s, t] holds a zero decay exactly when the zero counts at s and t differ.
    live = lower & (zeros[:, :, :, None] == zeros[:, :, None, :])
    log_mag = _segment_sums(jnp.log(jnp.where(is_zero, 1, mag)))
    weight = jnp.exp(jnp.where(live, log_mag, -jnp.inf))
    if jnp.iscomplexobj(a):
        phase = _segment_sums(jnp.angle(a))
        W = lax.complex(weight * jnp.cos(phase), weight * jnp.sin(phase))
    else:
        negs = jnp.cumsum((a < 0).astype(jnp.int32), axis=2)
        odd = (negs[:, :, :, None] - negs[:, :, None, :]) % 2 == 1
        W = jnp.where(odd, -weight, weight).astype(a.dtype)
    prefix = W[:, :, :, 0] * a[:, :, :1]
    return W, prefix


def _constant_decays(a, T):
    """``W[t, s] = a^(t−s)`` (``t ≥ s``) ``(T, T, *S_a)`` and ``a^(t+1)`` ``(T, *S_a)``."""
    trail = (1,) * a.ndim
    lag = (jnp.arange(T)[:, None] - jnp.arange(T)[None, :]).reshape(T, T, *trail)
    W = jnp.where(lag >= 0, int_power(a, jnp.maximum(lag, 0)), 0).astype(a.dtype)
    prefix = int_power(a, jnp.arange(1, T + 1).reshape(T, *trail))
    return W, prefix


def parallel(a, b, x0, reverse, time_varying, T, extra=None):
    """States ``(B, L, *S)`` and final state ``(B, *S)`` with closed-form chunks of ``T`` steps
    and an associative scan across them (promoted inputs; ``x0`` may be None; ``extra`` is
    added to the first input consumed)."""
    if reverse:
        # Run forward on the time-reversed sequence: one form to get right, for the price of
        # two copies (b and the states), cheap beside the contraction's T products per element.
        a = jnp.flip(a, 1) if time_varying else a
        states, final = parallel(a, jnp.flip(b, 1), x0, False, time_varying, T, extra)
        return jnp.flip(states, 1), final
    B, L = b.shape[:2]
    S = b.shape[2:]
    T = min(T, L)
    C = -(-L // T)
    pad = C * T - L
    if x0 is not None or extra is not None:
        # The initial state (and any injected term) enter with the first input.
        a0 = a[:, 0] if time_varying else a
        b = b.at[:, 0].add((0 if x0 is None else a0 * x0) + (0 if extra is None else extra))
    if pad:
        # Padding follows the last step, so it never touches the real states.
        pad_width = [(0, 0), (0, pad)] + [(0, 0)] * len(S)
        b = jnp.pad(b, pad_width)
        if time_varying:
            a = jnp.pad(a, pad_width, constant_values=1)
    bc = b.reshape(B, C, T, *S)
    axes = _LETTERS[: len(S)]
    if time_varying:
        W, prefix = _varying_decays(a.reshape(a.shape[0], C, T, *a.shape[2:]))
        span = prefix[:, :, -1]
        spec = f"bcts{axes},bcs{axes}->bct{axes}"
    else:
        W, prefix = _constant_decays(a, T)
        span = jnp.broadcast_to(prefix[-1], (1, C, *a.shape))
        spec = f"ts{axes},bcs{axes}->bct{axes}"
    local = jnp.einsum(spec, W, bc, precision=lax.Precision.HIGHEST)

    def combine(first, second):
        a1, x1 = first
        a2, x2 = second
        return a2 * a1, a2 * x1 + x2

    # End state of every chunk from a zero start before the first, then the state entering it.
    _, ends = lax.associative_scan(combine, (span, local[:, :, -1]), axis=1)
    entering = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    states = (local + prefix * entering[:, :, None]).reshape(B, C * T, *S)
    if pad:
        states = states[:, :L]
    return states, states[:, -1]
