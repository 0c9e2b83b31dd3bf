"""Semiseparable (SSD, Mamba-2) sequence mixing and the quasiseparable (Hydra) mixer.

Shapes: ``x (B, L, Hh, P)`` (batch, length, heads, head dim), ``dt (B, L, Hh)`` positive steps,
``A (Hh,)`` negative decay rates, ``B, C (B, L, G, N)`` with ``G`` groups dividing ``Hh`` (head
``h`` reads group ``h // (Hh // G)``), states ``(B, Hh, P, N)``. Per head the recurrence is

    h_t = exp(dt_t·A)·h_{t−1} + dt_t·x_t B_tᵀ,      y_t = h_t C_t,

i.e. ``y = M x`` with the lower-triangular (semiseparable) matrix

    M[t, s] = C_t·B_s · exp(A·(cum_t − cum_s)) · dt_s   (s ≤ t),   cum_t = Σ_{r≤t} dt_r.

``reverse=True`` runs it from the end (``h_t = exp(dt_t·A)·h_{t+1} + dt_t·x_t B_tᵀ``), which is
the same as flipping every input along the length, running forward and flipping ``y`` back.

Five methods compute the same thing, one file each:

- ``"chunked"`` (:mod:`.chunked`): chunks of ``Q`` steps, the quadratic form inside a chunk
  and one ``lax.fori_loop`` over the chunks carrying the ``(P, N)`` states, with a
  hand-written reverse loop as its gradient. The fastest form on XLA:CPU.
- ``"parallel"`` (:mod:`.parallel`): the same chunks, all at once: Mamba-2's four batched
  contractions with the chunk-to-chunk state passing as one small matmul or an
  ``associative_scan``; no loop, forward or backward. The form for accelerators, where every
  loop step of the chunked form is a round of kernel launches.
- ``"sequential"`` (:mod:`.sequential`): one ``lax.scan`` step per position.
- ``"materialized"`` (:mod:`.naive`): build ``M`` explicitly (:func:`ssd_matrix`), O(L²);
  the oracle.
- ``"pallas"`` (:mod:`.pallas`): one fused Pallas kernel per (batch, head) walking the
  chunks with the ``(P, N)`` state on chip, and a reverse kernel as its gradient; Mosaic on
  TPU, Triton on GPU, interpret mode on CPU (``interpret=None``). Explicit only: ``"auto"``
  does not pick it until it has been measured faster on a device.

``method="auto"`` (the default) picks by :func:`auto_method` from the backend
(:func:`ssmix.auto_backend`): ``"chunked"`` on CPU (measured fastest there), ``"parallel"``
on GPU and TPU. ``chunk_size=None`` (the default) is :func:`default_chunk_size`: 64 on CPU
(the chunked method's measured optimum, ``benchmarks/hydra.py``), 128 on GPU and TPU. Both
are resolved in Python before the jitted kernel is called, so the compiled program is keyed
on the concrete method.

Packed sequences (:func:`ssd`'s ``segment_ids (B, L)``, integer; equal ids = same document,
as ``seq_idx`` in state-spaces/mamba): the state is reset to zero wherever the id changes
between neighbours, so a packed row equals running each segment alone and concatenating.
The reset sits at the boundary in the direction of the recurrence (forward: at ``t`` where
``id_t ≠ id_{t−1}``; ``reverse``: at ``t`` where ``id_t ≠ id_{t+1}``, the boundary seen from
the right). ``initial_state`` enters only the first segment processed (the first, or the
last when ``reverse``), every later one starts from zero, and the final state is the last
processed segment's. In matrix form ``M[t, s] = 0`` when ``s`` and ``t`` lie in different
segments; the forms never form ``dt·A = −∞``: every factor spanning a boundary (inside a
chunk, to or from a chunk's edge, across chunks) is masked to an exact zero before or after
its exponential, so exponents stay ≤ 0 and gradients stay finite.

The quasiseparable mixer of Hydra (Hwang et al. 2024; SSD: Dao & Gu 2024) adds a backward
SSD and a diagonal:

    QS(x) = shift(SS_fw(x)) + flip(shift(SS_bw(flip(x)))) + diag·x,

where ``shift`` moves outputs one step later (row 0 becomes zero). Explicitly, with ``cf``
and ``cb`` the cumulative sums of ``dt_fw`` and ``dt_bw``,

    M[t, s] = C_fw[t−1]·B_fw[s]·exp(A·(cf[t−1] − cf[s]))·dt_fw[s]     (s < t)
    M[t, s] = C_bw[t+1]·B_bw[s]·exp(A·(cb[s−1] − cb[t]))·dt_bw[s]     (s > t)
    M[t, t] = diag[t].

Packed sequences in the quasiseparable mixer (:func:`quasiseparable`'s ``segment_ids``):
both SSDs reset at every boundary (as in :func:`ssd`) and row ``t`` takes the forward output
of ``t − 1`` and the backward output of ``t + 1`` only when that position lies in ``t``'s
segment, so ``M[t, s] = 0`` across segments and a packed row equals every segment run alone;
the diagonal is per position and needs nothing.

Forward-mode differentiation (``jax.jvp``) of the chunked method is not supported (it has a
custom reverse-mode rule); the other methods support both.

Signs: ``dt ≥ 0`` and ``A ≤ 0`` are what make the recurrence a decay (``exp(dt·A) ≤ 1``); a
negative step or a positive rate grows the state exponentially (in a probe a
negative ``dt`` gave NaN and a positive ``A`` outputs of 2.5e17). :func:`ssd` and
:func:`quasiseparable` check them with a ``ValueError`` when the arrays are concrete (an
eager call); under ``jax.jit``, ``grad`` or ``vmap`` the values are tracers, unknown at trace
time, and are not checked (a check there would need a host callback on every call). The
layers cannot produce either: Hydra and the SSD kinds of :class:`~ssmix.layers.MatrixMixer`
build ``dt = softplus(·) ≥ 0`` (zeroed on padding) and ``A = −exp(A_log) < 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssmix._backend import pallas_interpret, pallas_variant, resolve_backend
from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.scan._common import check_segment_ids
from ssmix.kernels.ssd.chunked import ssd_chunked
from ssmix.kernels.ssd.common import (
    check_qs_args,
    check_ssd_args,
    compute_dtype,
    segment_labels,
    shift_earlier,
    shift_keeps,
    shift_later,
)
from ssmix.kernels.ssd.naive import (
    initial_state_output,
    qs_matrix_naive,
    ssd_matrix_naive,
    ssd_naive,
)
from ssmix.kernels.ssd.pallas import ssd_pallas
from ssmix.kernels.ssd.parallel import ssd_parallel
from ssmix.kernels.ssd.sequential import ssd_sequential

__all__ = [
    "METHODS",
    "auto_method",
    "default_chunk_size",
    "ssd",
    "ssd_matrix",
    "quasiseparable",
    "quasiseparable_matrix",
]

#: ``"pallas"`` (:mod:`.pallas`, one fused kernel) is explicit only: ``"auto"`` never picks it
#: until it has been measured faster on a device.
METHODS = ("auto", "chunked", "parallel", "sequential", "materialized", "pallas")

#: Chunk length per backend when ``chunk_size=None``. CPU: the chunked loop's measured
#: optimum. GPU / TPU: 128, inside Mamba-2's 128–256; the parallel form's ``(…, Q, Q)``
#: tensors hold ``Q/P`` times the activations (2× at head dim 64, Hydra's default) and the
#: intra-chunk work O(L·Q·(N + P)) balances the state work O(L·N·P) at ``Q ≈ N·P/(N + P)``
#: for N = P = 64; 128 also fills a TPU MXU tile.
DEFAULT_CHUNK_SIZE = {"cpu": 64, "gpu": 128, "tpu": 128}


def auto_method(backend: str | None = None) -> str:
    """The method ``method="auto"`` resolves to: ``"chunked"`` on ``"cpu"`` (measured fastest
    on XLA:CPU, ``benchmarks/hydra.py``), ``"parallel"`` on ``"gpu"`` and ``"tpu"`` (no loop:
    a loop step is a round of kernel launches there). ``backend=None`` means
    :func:`ssmix.auto_backend`."""
    return "chunked" if resolve_backend(backend) == "cpu" else "parallel"


def default_chunk_size(backend: str | None = None) -> int:
    """The chunk length ``chunk_size=None`` resolves to (:data:`DEFAULT_CHUNK_SIZE`)."""
    return DEFAULT_CHUNK_SIZE[resolve_backend(backend)]


def _check_signs(dts, A) -> None:
    """``ValueError`` unless every ``dt`` in ``dts`` (``(name, array)`` pairs) is ≥ 0 and ``A``
    ≤ 0; skipped when any of them is a tracer (under ``jit`` / ``grad`` / ``vmap``: the values
    are unknown at trace time) or not an array (the shape checks report those)."""
    arrays = [v for _, v in dts] + [A]
    if any(isinstance(v, jax.core.Tracer) or not hasattr(v, "shape") for v in arrays):
        return
    if any(getattr(v, "size", 1) == 0 for v in arrays):
        return
    # One device-to-host transfer for all the checks.
    lows = [float(v) for v in jnp.stack([jnp.min(jnp.asarray(v)) for v in arrays[:-1]])]
    high = float(jnp.max(jnp.asarray(A)))
    for (name, _), low in zip(dts, lows, strict=True):
        if low < 0:
            raise ValueError(
                f"{name} must be non-negative (steps; 0 is an identity step); got a minimum of "
                f"{low:g} (a negative step grows the state exponentially)"
            )
    if high > 0:
        raise ValueError(
            f"A must be non-positive (decay rates: exp(dt·A) ≤ 1); got a maximum of {high:g} "
            "(a positive rate grows the state exponentially; Hydra uses A = −exp(A_log))"
        )


def _resolve(method, chunk_size):
    """Check ``method`` and ``chunk_size`` and replace ``"auto"`` / ``None`` by the backend's
    choice, in Python, so the jitted kernels are keyed on concrete values."""
    check_choice("method", method, METHODS)
    if chunk_size is None:
        chunk_size = default_chunk_size()
    check_positive_int("chunk_size", chunk_size)
    return (auto_method() if method == "auto" else method), chunk_size


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    chunk_size: int | None = None,
    initial_state: jax.Array | None = None,
    reverse: bool = False,
    method: str = "auto",
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run the SSD (Mamba-2 scalar-decay) recurrence over axis 1.

    Args:
      x: inputs ``(B, L, Hh, P)``.
      dt: positive steps ``(B, L, Hh)`` (a zero step is an identity step: no decay, no input).
      A: negative decay rates ``(Hh,)``.
      B, C: input and output projections ``(B, L, G, N)``, ``G`` dividing ``Hh``.
      chunk_size: chunk length ``Q`` of the chunked and parallel methods; any positive
        integer (``L`` is padded internally to a multiple of ``min(Q, L)``), or None for
        :func:`default_chunk_size` (64 on CPU, 128 on GPU / TPU).
      initial_state: ``(B, Hh, P, N)`` state before the first step (after the last one when
        ``reverse``); zeros when omitted.
      reverse: run from ``t = L − 1`` down to 0.
      method: ``"auto"`` (:func:`auto_method`), ``"chunked"``, ``"parallel"``,
        ``"sequential"``, ``"materialized"`` (module docstring) or ``"pallas"``
        (:mod:`.pallas`: one fused Pallas kernel, reverse-mode gradients only).
      interpret: ``method="pallas"`` only: Pallas interpret mode; None means interpret mode
        when ``jax.default_backend()`` is CPU, compiled elsewhere.
      segment_ids: packed sequences, an integer ``(B, L)`` array (equal ids = same
        document; module docstring, *Packed sequences*), or None.

    Returns:
      ``(y (B, L, Hh, P), final_state (B, Hh, P, N))``: ``y`` in the dtype of ``x``, the
      state in the promoted compute dtype (at least float32). The final state is the one
      after the last step processed (``t = L − 1``, or ``t = 0`` when ``reverse``): with
      ``segment_ids``, the last processed segment's.

    Raises:
      ValueError: wrong ranks or shapes (``segment_ids`` not ``(B, L)`` included), ``G`` not
        dividing ``Hh``, a non-positive ``chunk_size``, an unknown ``method``; a negative
        ``dt`` or a positive ``A`` when they are concrete (not under ``jit`` / ``grad`` /
        ``vmap``, module docstring).
      TypeError: non-floating inputs, non-integer ``segment_ids``.
    """
    method, chunk_size = _resolve(method, chunk_size)
    _check_signs([("dt", dt)], A)
    return _ssd(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        initial_state=initial_state,
        reverse=reverse,
        method=method,
        pallas=_pallas_options(method, interpret),
        segment_ids=segment_ids,
    )


@functools.partial(jax.jit, static_argnames=("chunk_size", "reverse", "method", "pallas"))
def _ssd(
    x, dt, A, B, C, *, chunk_size, initial_state, reverse, method, pallas=None, segment_ids=None
):
    check_ssd_args(x, dt, A, B, C, initial_state)
    labels = None
    if segment_ids is not None:
        labels = segment_labels(check_segment_ids(segment_ids, *x.shape[:2]))
    out_dtype, dtype = compute_dtype(x, dt, A, B, C, initial_state)
    x, dt, A, B, C = (v.astype(dtype) for v in (x, dt, A, B, C))
    if initial_state is not None:
        initial_state = initial_state.astype(dtype)
    if method == "materialized":
        y, final = ssd_naive(x, dt, A, B, C, initial_state, reverse, labels)
    elif method == "sequential":
        y, final = ssd_sequential(x, dt, A, B, C, initial_state, reverse, labels)
    else:
        form = _form(method, pallas)
        if reverse:
            x, dt, B, C = (jnp.flip(v, axis=1) for v in (x, dt, B, C))
            labels = None if labels is None else jnp.flip(labels, axis=1)
        y, final = form(x, dt, A, B, C, initial_state, chunk_size, labels)
        if reverse:
            y = jnp.flip(y, axis=1)
    return y.astype(out_dtype), final


@functools.partial(jax.jit, static_argnames=("reverse",))
def ssd_matrix(
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    reverse: bool = False,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The SSD mixing matrix ``M (B, Hh, L, L)`` with ``y[:, t, h] = Σ_s M[:, h, t, s] x[:, s, h]``.

    Forward: ``M[t, s] = C_t·B_s·exp(A·Σ_{r=s+1}^{t} dt_r)·dt_s`` for ``s ≤ t``, else 0.
    Reverse: ``M[t, s] = C_t·B_s·exp(A·Σ_{r=t}^{s−1} dt_r)·dt_s`` for ``s ≥ t``, else 0.
    Shapes as in :func:`ssd` (``dt (B, L, Hh)``, ``A (Hh,)``, ``B, C (B, L, G, N)``). O(L²).
    With ``segment_ids (B, L)`` (integer, packed sequences) ``M[t, s] = 0`` when ``s`` and
    ``t`` lie in different segments (masked before the exponential).
    """
    check_ndim("dt", dt, 3, "(B, L, Hh)")
    b, L, H = dt.shape
    x_like = jax.ShapeDtypeStruct((b, L, H, 1), dt.dtype)
    check_ssd_args(x_like, dt, A, B, C)
    labels = None
    if segment_ids is not None:
        labels = segment_labels(check_segment_ids(segment_ids, b, L))
    _, dtype = compute_dtype(dt, A, B, C)
    dt, A, B, C = (v.astype(dtype) for v in (dt, A, B, C))
    return ssd_matrix_naive(dt, A, B, C, reverse, labels)


def quasiseparable(
    x: jax.Array,
    dt_fw: jax.Array,
    dt_bw: jax.Array,
    A: jax.Array,
    B_fw: jax.Array,
    C_fw: jax.Array,
    B_bw: jax.Array,
    C_bw: jax.Array,
    diag: jax.Array,
    *,
    chunk_size: int | None = None,
    initial_states: tuple[jax.Array, jax.Array] | None = None,
    method: str = "auto",
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Hydra's quasiseparable mixer: ``shift(SS_fw(x)) + flip(shift(SS_bw(flip x))) + diag·x``.

    Both directions share ``A``. The chunked and parallel methods run them in one batched
    call of the SSD form (the backward inputs flipped and stacked behind the forward ones
    along the batch axis). Running the two directions instead as two lanes of one loop
    walking the chunks in opposite orders, without the flipped copy, measured 1.5× slower at
    L = 4k and 2.4× at 16k on CPU and scaled super-linearly (``benchmarks/hydra.py``). The
    sequential method runs a forward and a reverse scan; the materialized method applies
    :func:`quasiseparable_matrix`.

    Args:
      x: inputs ``(B, L, Hh, P)``.
      dt_fw, dt_bw: positive steps ``(B, L, Hh)`` of the two directions, aligned with ``x``.
      A: negative decay rates ``(Hh,)``, shared by both directions.
      B_fw, C_fw, B_bw, C_bw: projections ``(B, L, G, N)``, aligned with ``x``.
      diag: the diagonal ``(B, L, Hh)`` (Hydra: ``D_h + (W_D x_t)_h``).
      chunk_size: chunk length of the chunked and parallel methods, or None for
        :func:`default_chunk_size`.
      initial_states: optional ``(h_fw, h_bw)``, each ``(B, Hh, P, N)``: the forward state
        before position 0 and the backward state after position ``L − 1``. Because of the
        shift, ``h_fw`` reaches rows 1 … L−1 and ``h_bw`` rows 0 … L−2. With
        ``segment_ids`` (the rule of :func:`ssd`'s ``initial_state``): ``h_fw`` enters only
        the first segment (its rows after the first) and ``h_bw`` only the last segment (its
        rows before the last); every other segment starts from zero in both directions.
      method: ``"auto"`` (:func:`auto_method`), ``"chunked"``, ``"parallel"``,
        ``"sequential"``, ``"materialized"`` or ``"pallas"`` (both directions in one call
        of the fused kernel, stacked like the chunked and parallel methods).
      interpret: ``method="pallas"`` only, as in :func:`ssd`.
      segment_ids: packed sequences, an integer ``(B, L)`` array (a segment is a run of
        equal neighbouring ids; ids may repeat between segments), or None. Every method then
        equals running each segment alone (module docstring).

    Returns:
      ``y (B, L, Hh, P)`` in the dtype of ``x``.

    Raises:
      ValueError: inconsistent shapes (``segment_ids`` not ``(B, L)`` included), ``G`` not
        dividing ``Hh``, a non-positive ``chunk_size``, an unknown ``method``; a negative
        ``dt_fw`` / ``dt_bw`` or a positive ``A`` when they are concrete (not under ``jit``
        / ``grad`` / ``vmap``, module docstring).
      TypeError: non-floating inputs, non-integer ``segment_ids``.
    """
    method, chunk_size = _resolve(method, chunk_size)
    _check_signs([("dt_fw", dt_fw), ("dt_bw", dt_bw)], A)
    args = (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    return _quasiseparable(
        *args,
        chunk_size=chunk_size,
        initial_states=initial_states,
        method=method,
        pallas=_pallas_options(method, interpret),
        segment_ids=segment_ids,
    )


def _pallas_options(method, interpret):
    """``(interpret, kernel variant)`` for ``method="pallas"``, resolved in Python (from
    ``jax.default_backend()`` and :func:`ssmix.auto_backend`) so the jitted kernels are keyed
    on them; None for the other methods."""
    if method != "pallas":
        return None
    return pallas_interpret(interpret), pallas_variant()


def _form(method, pallas):
    """The chunk-based form of ``method`` (``"chunked"``, ``"parallel"`` or ``"pallas"``)."""
    if method == "pallas":
        return functools.partial(ssd_pallas, interpret=pallas[0], target=pallas[1])
    return ssd_chunked if method == "chunked" else ssd_parallel


@functools.partial(jax.jit, static_argnames=("chunk_size", "method", "pallas"))
def _quasiseparable(
    x,
    dt_fw,
    dt_bw,
    A,
    B_fw,
    C_fw,
    B_bw,
    C_bw,
    diag,
    *,
    chunk_size,
    initial_states,
    method,
    pallas=None,
    segment_ids=None,
):
    h_fw, h_bw = check_qs_args(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, initial_states)
    labels = keep_fw = keep_bw = None
    if segment_ids is not None:
        labels = segment_labels(check_segment_ids(segment_ids, *x.shape[:2]))
        keep_fw, keep_bw = shift_keeps(labels)

    def fw_term(y):  # row t takes y_fw[t − 1], only from its own segment
        return shift_later(y) if keep_fw is None else jnp.where(keep_fw, shift_later(y), 0)

    def bw_term(y):  # row t takes y_bw[t + 1], only from its own segment
        return shift_earlier(y) if keep_bw is None else jnp.where(keep_bw, shift_earlier(y), 0)

    out_dtype, dtype = compute_dtype(x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, h_fw)
    x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag = (
        v.astype(dtype) for v in (x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    )
    if h_fw is not None:
        h_fw, h_bw = h_fw.astype(dtype), h_bw.astype(dtype)
    skip = diag[..., None] * x
    if method == "materialized":
        M = qs_matrix_naive(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, labels)
        y = jnp.einsum("bhts,bshp->bthp", M, x)
        if h_fw is not None:
            y = y + fw_term(initial_state_output(h_fw, dt_fw, A, C_fw, False, labels))
            y = y + bw_term(initial_state_output(h_bw, dt_bw, A, C_bw, True, labels))
        return y.astype(out_dtype)
    if method == "sequential":
        y_fw, _ = ssd_sequential(x, dt_fw, A, B_fw, C_fw, h_fw, False, labels)
        y_bw, _ = ssd_sequential(x, dt_bw, A, B_bw, C_bw, h_bw, True, labels)
        return (fw_term(y_fw) + bw_term(y_bw) + skip).astype(out_dtype)
    form = _form(method, pallas)
    b = x.shape[0]
    flip = functools.partial(jnp.flip, axis=1)
    stack = lambda fw, bw: jnp.concatenate([fw, flip(bw)], axis=0)  # noqa: E731
    h0 = None if h_fw is None else jnp.concatenate([h_fw, h_bw], axis=0)
    # The backward half runs forward on flipped inputs: its labels are flipped too (the state
    # h_bw then enters the flipped row's first segment, the last one).
    labels2 = None if labels is None else stack(labels, labels)
    y2, _ = form(
        stack(x, x),
        stack(dt_fw, dt_bw),
        A,
        stack(B_fw, B_bw),
        stack(C_fw, C_bw),
        h0,
        chunk_size,
        labels2,
    )
    # Row t takes the forward output of t−1 and the backward output of t+1, which sits at
    # flipped index L−2−t: both are the first L−1 rows of their halves, one of them flipped.
    return (fw_term(y2[:b]) + bw_term(flip(y2[b:])) + skip).astype(out_dtype)


@jax.jit
def quasiseparable_matrix(
    dt_fw: jax.Array,
    dt_bw: jax.Array,
    A: jax.Array,
    B_fw: jax.Array,
    C_fw: jax.Array,
    B_bw: jax.Array,
    C_bw: jax.Array,
    diag: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The quasiseparable matrix ``M (B, Hh, L, L)`` of :func:`quasiseparable`, O(L²).

    Built entry by entry from the explicit formula in the module docstring (not from shifted
    and flipped SSD matrices), so comparing the two checks the shift / flip convention.
    Arguments as in :func:`quasiseparable` without ``x``; with ``segment_ids (B, L)``
    (integer, packed sequences) ``M[t, s] = 0`` when ``s`` and ``t`` lie in different
    segments (masked before the exponential: no ``exp`` of a sum across a boundary).
    """
    check_ndim("dt_fw", dt_fw, 3, "(B, L, Hh)")
    x_like = jax.ShapeDtypeStruct((*dt_fw.shape, 1), dt_fw.dtype)
    check_qs_args(x_like, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag, None)
    _, dtype = compute_dtype(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    labels = None
    if segment_ids is not None:
        labels = segment_labels(check_segment_ids(segment_ids, *dt_fw.shape[:2]))
    args = (v.astype(dtype) for v in (dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag))
    return qs_matrix_naive(*args, labels)
