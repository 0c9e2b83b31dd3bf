"""Diagonal linear recurrences ``x_t = a_t ⊙ x_{t−1} + b_t`` along the time axis.

Shapes: ``b (B, L, *S)`` (batch, length, any state shape ``S``, real or complex). The decay
``a`` is either constant, of a shape broadcastable to ``S`` (the LTI case: it is never
broadcast to the length in memory), or time-varying, of the same rank as ``b`` and
broadcastable to it with length ``L`` on axis 1 (e.g. ``(1, L, *S)`` shared by the batch).
``initial_state (B, *S)`` is the state before the first step (after the last one for
``reverse=True``, where ``x_t = a_t ⊙ x_{t+1} + b_t``).

Four methods compute the same thing, one module each (:func:`linear_scan_naive` in
``naive.py`` is the reference):

- ``"sequential"`` (``sequential.py``): one loop step per time index, states written in place.
- ``"associative"`` (``associative.py``): ``lax.associative_scan`` over the whole length.
- ``"chunked"`` (``chunked.py``): decay-weighted chunk sums, a short loop over the ``L/T``
  chunk summaries, then the recurrence inside all chunks at once: ``T + L/T`` loop steps.
- ``"parallel"`` (``parallel.py``): closed-form chunks (a decay-matrix contraction) and an
  associative scan over the chunk summaries: no loop.
- ``"pallas"`` (``pallas.py``): one fused Pallas kernel, the state kept on chip (Mosaic TPU
  or Triton GPU; Pallas's interpreter on CPU). Explicit only: it is not in :data:`METHODS`
  (the tuple the other forms are iterated from) and ``"auto"`` never picks it until it is
  measured faster on a device.

``method="auto"`` (the default) picks by :func:`auto_method`: ``"chunked"`` on CPU, as
measured there (``benchmarks/kernels.py``), ``"parallel"`` on GPU and TPU, where every loop
step is a round of kernel launches.

Packed sequences (``segment_ids (B, L)``, integer; equal ids = same document): the state is
reset wherever the id changes from one position to the next in the direction of the
recurrence, by a zero decay there (``a_t := 0`` where ``id_t ≠ id_{t−1}``; in reverse, where
``id_t ≠ id_{t+1}``, i.e. the boundary seen from the right). A constant decay therefore
becomes a time-varying ``(B, L, *S_a)`` one. Every method runs the same recurrence, so packed
rows equal running each segment alone and concatenating: ``initial_state`` enters only the
first segment processed (the first one, or the last one in reverse); every later segment
starts from zero; the final state is the last processed segment's. Ids need not be sorted or
distinct between segments: only changes between neighbours count.

Gradients: the adjoint of a linear recurrence is the same recurrence run the other way
(``λ_t = g_t + a_{t+1} λ_{t+1}``), so every method differentiates by calling itself in
reverse (a ``custom_vjp``), as fast as the forward pass and without storing anything but
the states. The decay's gradient ``Σ λ_t ⊙ x_{t−1}`` is accumulated by a loop over time slabs
under the CPU rules (measured faster there) and as one shifted product and a reduction under
the accelerator rules. Forward-mode differentiation (``jax.jvp``) is therefore not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssmix._backend import pallas_interpret, pallas_variant, resolve_backend
from ssmix._checks import check_choice, check_positive_int
from ssmix.kernels.scan import chunked as _chunked
from ssmix.kernels.scan import parallel as _parallel
from ssmix.kernels.scan._common import (
    check_segment_ids,
    prepare,
    segment_starts,
    slice_t,
    step,
    sum_to_shape,
)
from ssmix.kernels.scan.associative import associative
from ssmix.kernels.scan.naive import linear_scan_naive
from ssmix.kernels.scan.pallas import pallas_scan
from ssmix.kernels.scan.sequential import sequential

__all__ = [
    "linear_scan",
    "linear_scan_naive",
    "step",
    "auto_method",
    "METHODS",
    "EXPLICIT_METHODS",
]

METHODS = ("sequential", "associative", "chunked", "parallel")

#: Methods accepted only when named explicitly (never chosen by ``"auto"``).
EXPLICIT_METHODS = ("pallas",)


def auto_method(backend: str | None = None) -> str:
    """The method ``method="auto"`` runs on ``backend`` (default: :func:`ssmix.auto_backend`).

    - ``"cpu"``: ``"chunked"`` (``benchmarks/kernels.py``: within a few percent of the
      sequential loop at 1k–16k and ahead of the associative scan, which is ~2× slower).
    - ``"gpu"``, ``"tpu"``: ``"parallel"``, the form without a loop (not yet measured on a
      device; the loop forms there cost a round of kernel launches per step).
    """
    return "chunked" if resolve_backend(backend) == "cpu" else "parallel"


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    reverse: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run ``x_t = a_t ⊙ x_{t−1} + b_t`` over axis 1 and return all states and the last one.

    Jitted (the options static). ``"auto"`` and the decay gradient's form are resolved for
    :func:`ssmix.auto_backend` before the jitted call, so they are part of its cache key.

    Args:
      a: decay, constant ``(*S')`` broadcastable to ``S`` or time-varying ``(B|1, L, *S')``.
      b: input ``(B, L, *S)``, real or complex.
      initial_state: ``(B, *S)`` state before the first step; zeros when omitted.
      reverse: run from ``t = L − 1`` down to 0 (``x_t = a_t ⊙ x_{t+1} + b_t``).
      method: ``"auto"`` (:func:`auto_method`), ``"sequential"``, ``"associative"``,
        ``"chunked"``, ``"parallel"`` or ``"pallas"`` (module docstring).
      chunk_size: chunk length ``T`` of ``"chunked"`` and ``"parallel"`` (any positive
        integer; ``L`` need not be a multiple of it). None: 64 for ``"chunked"``, the memory
        rule of :mod:`ssmix.kernels.scan.parallel` (64 unless the decay tensor is large) for
        ``"parallel"``; for ``"pallas"`` the time block of the TPU / interpret variant
        (None: :data:`ssmix.kernels.scan.pallas.DEFAULT_BLOCK`).
      interpret: ``"pallas"`` only: run the kernel in Pallas's interpreter. None: when
        ``jax.default_backend()`` is CPU (compiled on GPU / TPU).
      segment_ids: packed sequences: an integer ``(B, L)`` array, equal ids = same document
        (module docstring, *Packed sequences*). None: one sequence per row.

    Returns:
      ``(states (B, L, *S), final_state (B, *S))`` in the promoted dtype of the inputs;
      ``final_state`` is ``states[:, -1]`` (``states[:, 0]`` for ``reverse=True``), with
      ``segment_ids`` the final state of the last segment processed.

    Raises:
      ValueError: inconsistent shapes, an unknown method, a non-positive chunk size,
        ``segment_ids`` not ``(B, L)``.
      TypeError: integer inputs, non-integer ``segment_ids``.
    """
    check_choice("method", method, ("auto", *METHODS, *EXPLICIT_METHODS))
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    backend = resolve_backend(None)
    if method == "auto":
        method = auto_method(backend)
    return _linear_scan(
        a,
        b,
        initial_state,
        reverse=bool(reverse),
        method=method,
        chunk_size=chunk_size,
        loop_grad=backend == "cpu",
        kernel=_pallas_options(method, backend, interpret),
        segment_ids=segment_ids,
    )


def _pallas_options(method, backend, interpret):
    """``(variant, interpret)`` of the Pallas kernel, static and thus part of the jit cache
    key (None for the other methods): the GPU variant under the GPU rules, the TPU variant
    (also the interpreter's on CPU) otherwise."""
    if method != "pallas":
        return None
    return pallas_variant(backend), pallas_interpret(interpret)


@functools.partial(
    jax.jit, static_argnames=("reverse", "method", "chunk_size", "loop_grad", "kernel")
)
def _linear_scan(
    a, b, initial_state, *, reverse, method, chunk_size, loop_grad, kernel, segment_ids=None
):
    a, b, x0, time_varying, out_dtype = prepare(a, b, initial_state)
    if segment_ids is not None:
        a = _reset_decays(a, b.shape, segment_ids, reverse, time_varying)
        time_varying = True
    options = (reverse, method, chunk_size, time_varying, loop_grad, kernel)
    states, final = _scan(a, b, x0, *options)
    return states.astype(out_dtype), final.astype(out_dtype)


def _reset_decays(a, b_shape, segment_ids, reverse, time_varying):
    """The time-varying decay ``(B, L, *S_a)`` of a packed batch: ``a`` with a zero wherever a
    segment starts (:func:`~ssmix.kernels.scan._common.segment_starts`), so the state entering
    that step is dropped. The zero is a constant, so no gradient reaches ``a`` there."""
    ids = check_segment_ids(segment_ids, b_shape[0], b_shape[1])
    starts = segment_starts(ids, reverse)
    if not time_varying:
        a = a[None, None]
    starts = starts.reshape(starts.shape + (1,) * (a.ndim - 2))
    return jnp.where(starts, jnp.zeros((), a.dtype), a)


def _forward(a, b, x0, reverse, method, chunk_size, time_varying, extra=None, kernel=None):
    if method == "pallas":
        return pallas_scan(a, b, x0, reverse, time_varying, chunk_size, extra, *kernel)
    if method == "sequential":
        return sequential(a, b, x0, reverse, time_varying, extra)
    if method == "associative":
        return associative(a, b, x0, reverse, time_varying, extra)
    if method == "chunked":
        T = _chunked.DEFAULT_CHUNK if chunk_size is None else chunk_size
        return _chunked.chunked(a, b, x0, reverse, time_varying, T, extra)
    T = chunk_size
    if T is None:
        T = _parallel.default_chunk(a.shape, b.shape[1], time_varying, a.dtype.itemsize)
    return _parallel.parallel(a, b, x0, reverse, time_varying, T, extra)


# --------------------------------------------------------------------------------------
# Gradients: the adjoint recurrence runs the other way with the decay shifted by one step.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _scan(a, b, x0, reverse, method, chunk_size, time_varying, loop_grad, kernel):
    return _forward(a, b, x0, reverse, method, chunk_size, time_varying, kernel=kernel)


def _scan_fwd(a, b, x0, reverse, method, chunk_size, time_varying, loop_grad, kernel):
    states, final = _forward(a, b, x0, reverse, method, chunk_size, time_varying, kernel=kernel)
    return (states, final), (a, states, x0)


def _decay_grad_loop(lam, states, x0, a_shape, reverse, time_varying):
    """dL/da_t = λ_t ⊙ x_{t−1} (x_{t+1} in reverse; the initial state at the first step),
    summed over the axes along which ``a`` was broadcast. Accumulated step by step: on
    XLA:CPU a fused reduction over the leading axes of a large complex product is many times
    slower than a loop over time slabs."""
    L = lam.shape[1]
    first = L - 1 if reverse else 0
    offset = 1 if reverse else -1
    head = jnp.zeros_like(lam[:, 0]) if x0 is None else slice_t(lam, first) * x0

    def term(i):
        t = L - 1 - i if reverse else i
        return t, slice_t(lam, t) * slice_t(states, t + offset)

    if time_varying:
        step_shape = (a_shape[0], *a_shape[2:])

        def write(i, out):
            t, value = term(i)
            return lax.dynamic_update_index_in_dim(out, sum_to_shape(value, step_shape), t, 1)

        out = jnp.empty(a_shape, lam.dtype)
        out = lax.dynamic_update_index_in_dim(out, sum_to_shape(head, step_shape), first, 1)
        return lax.fori_loop(1, L, write, out)
    acc = lax.fori_loop(1, L, lambda i, acc: acc + term(i)[1], head)
    return sum_to_shape(acc, a_shape)


def _decay_grad_loop_free(lam, states, x0, a_shape, reverse, time_varying):
    """The same gradient as :func:`_decay_grad_loop` as one product of ``λ`` with the states
    shifted by one step and a reduction (the accelerator form: no loop over time)."""
    if reverse:
        body = lam[:, :-1] * states[:, 1:]
        lam_first = lam[:, -1:]
    else:
        body = lam[:, 1:] * states[:, :-1]
        lam_first = lam[:, :1]
    head = jnp.zeros_like(lam_first) if x0 is None else lam_first * x0[:, None]
    if not time_varying:
        return sum_to_shape(body, a_shape) + sum_to_shape(head, a_shape)
    L = lam.shape[1]
    body = sum_to_shape(body, (a_shape[0], L - 1, *a_shape[2:]))
    head = sum_to_shape(head, (a_shape[0], 1, *a_shape[2:]))
    return jnp.concatenate([body, head] if reverse else [head, body], axis=1)


def _scan_bwd(reverse, method, chunk_size, time_varying, loop_grad, kernel, residuals, cotangents):
    a, states, x0 = residuals
    g_states, g_final = cotangents
    if time_varying:
        # λ_t = g_t + a_{t+1} λ_{t+1} (forward); the decay feeding λ_t sits one step later.
        ones = jnp.ones_like(a[:, :1])
        a_adj = (
            jnp.concatenate([ones, a[:, :-1]], axis=1)
            if reverse
            else jnp.concatenate([a[:, 1:], ones], axis=1)
        )
    else:
        a_adj = a
    # The final state's cotangent enters the adjoint recurrence at its first step.
    lam, _ = _forward(
        a_adj,
        g_states,
        None,
        not reverse,
        method,
        chunk_size,
        time_varying,
        extra=g_final,
        kernel=kernel,
    )
    decay_grad = _decay_grad_loop if loop_grad else _decay_grad_loop_free
    g_a = decay_grad(lam, states, x0, a.shape, reverse, time_varying)
    if x0 is None:
        return g_a, lam, None
    first = states.shape[1] - 1 if reverse else 0
    a_first = slice_t(a, first) if time_varying else a
    return g_a, lam, sum_to_shape(a_first * slice_t(lam, first), x0.shape)


_scan.defvjp(_scan_fwd, _scan_bwd)
