"""The S4 layer (DPLR state matrix) and the module code it shares with S4D.

Both layers are linear time-invariant SSMs per feature, ``y = K * u + D·u`` with a kernel
``K_ℓ = C Ā^ℓ B̄``, and share everything except how ``Ā``, ``B̄`` and the kernel are formed
(:class:`LTISSM`). Each runs in one of four modes that compute the same function (the tests
check outputs, states and gradients of every pair):

- ``"fft"``: the full kernel (S4: blocked powers of ``Ā`` or Cauchy sums, see :class:`S4`;
  S4D: Vandermonde), then an FFT convolution.
- ``"chunked"``: chunks of ``chunk_size`` steps; inside a chunk a Toeplitz matmul with the
  kernel's first taps, across chunks the state
  (:func:`~ssmix.kernels.vandermonde.chunked_ssm_conv`).
- ``"scan"``: the recurrence itself, one step at a time (S4D through
  :func:`~ssmix.kernels.scan.linear_scan`, S4 through its O(N) bilinear step), in blocks that
  are rematerialised for the backward pass so memory stays ``O(B·H·N·L/block)``.
- ``"materialized"``: the ``L × L`` mixing matrices from :meth:`LTISSM.materialize`, times
  the input; O(L²), the oracle.
- ``"auto"`` (default) picks by :func:`auto_mode`.

The state is complex ``(B, H, N/2)``: the half modes of the conjugate-symmetric full state
(for S4 in the HiPPO eigenbasis). ``__call__`` takes and returns it for chunked inference;
``step`` advances it one position for autoregressive decoding.

``n_ssm`` (as in state-spaces/s4, ``src/models/sequence/kernels/ssm.py``): the state matrix
(``Λ``, ``P``) and ``B`` are stored once per SSM, ``(n_ssm, N/2)``, and feature ``h`` uses SSM
``h mod n_ssm`` (the anchor's ``repeat(A, 't n -> (v t) n')``); ``Δ``, ``C`` and ``D`` stay per
feature. ``n_ssm=None`` (default) is one SSM per feature.

Masks: padded positions (``mask`` False) are zero inputs: the state decays through them as
through any zero input, and a non-finite value there never reaches an output (it is replaced,
not multiplied, by zero). The returned state is the state right after each sequence's last
valid position, so it is right for right padding, left padding and holes alike, and the same
in every mode; nothing reads the mask's values outside the computation, so the same holds
under ``jit``. Without a mask an input position reaches every output in the ``"fft"`` mode
(the FFT mixes all positions: a NaN anywhere makes every output NaN) and every output of its
chunk in the ``"chunked"`` mode (``0·NaN`` in the in-chunk Toeplitz product); only the
``"scan"`` mode keeps a non-finite future input away from earlier outputs.

Packed sequences (``segment_ids (B, L)``, integer; a segment is a run of equal neighbouring
ids, as in :func:`~ssmix.kernels.scan.linear_scan`): every segment's outputs equal running it
alone, in both directions when bidirectional. ``"scan"`` zeroes the state where a segment
starts; ``"chunked"`` masks the in-chunk Toeplitz block to same-segment pairs, lets the state
entering a chunk reach only the positions before its first start and resets the state passed
on when the chunk holds a start (:func:`~ssmix.kernels.vandermonde.chunked_ssm_conv_packed`:
the in-chunk product runs the shared Toeplitz block once per segment piece of the most
fragmented chunk, 1, 2, 4 or 8 passes, and a per-chunk masked product,
``O(B·H·L·chunk_size)`` memory, when some chunk holds more than 8 pieces); ``"materialized"``
zeroes the ``L × L`` entries between different segments. The states passed between chunks
(packed or not) come from a ``lax.scan`` over the chunks under the CPU rule and from a
loop-free doubling prefix scan, ``⌈log2(L/chunk_size)⌉`` levels of one batched product each,
under the GPU / TPU rules (:func:`ssmix.auto_backend`).
An FFT convolution cannot reset its state, so ``"fft"`` and ``"auto"`` run the ``"chunked"``
mode when ``segment_ids`` is given. A state passed in enters only the first segment; the state
returned is the last segment's. :meth:`LTISSM.step` is unchanged: a new segment starts from a
fresh :meth:`LTISSM.init_state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix import hippo
from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_even, check_positive_int, check_sequence_input
from ssmix.kernels.cauchy import (
    _to_real,
    dplr_chunk_operators,
    dplr_dense,
    dplr_power_kernel,
    dplr_ssm_kernel,
    dplr_step,
    dplr_step_setup,
)
from ssmix.kernels.fftconv import fft_conv, fft_conv_bidirectional
from ssmix.kernels.scan._common import check_segment_ids, segment_starts
from ssmix.kernels.vandermonde import (
    ChunkOps,
    chunked_ssm_conv,
    chunked_ssm_conv_bidirectional,
    chunked_ssm_conv_packed,
    chunked_state_forward,
    chunked_state_output,
)
from ssmix.layers.base import (
    SSMParam,
    activation_dtype,
    as_complex,
    check_dtype,
    check_param_dtype,
    check_step_input,
    complex_param,
    mask_ends,
    ssm_dtype,
)

__all__ = ["MODES", "LTISSM", "S4", "S4_INITS", "S4_KERNELS", "auto_kernel", "auto_mode"]

#: Execution modes of the S4 / S4D layers.
MODES = ("auto", "fft", "chunked", "scan", "materialized")

#: How an S4 layer forms its convolution kernel (``kernel=``): ``"auto"`` picks by
#: :func:`auto_kernel` (``"powers"`` on every backend).
S4_KERNELS = ("auto", "powers", "cauchy")

#: HiPPO measures an S4 layer can start from (``init=``).
S4_INITS = ("legs", "legt", "lagt", "fout")

# Real parts of Λ are stored as log(−Re Λ); the S4 code clamps them the same way so that
# measures whose normal part is purely imaginary (FouT) get a tiny decay instead of log(0).
_MAX_REAL = -1e-4

# Steps per rematerialised block of the "scan" mode.
_SCAN_BLOCK = 128


def auto_mode(L: int, layer: str = "s4d", backend: str | None = None) -> str:
    """The mode ``mode="auto"`` runs for length ``L``, ``layer`` (``"s4d"`` or ``"s4"``)
    and ``backend`` (``"cpu"``, ``"gpu"``, ``"tpu"``, or None for :func:`ssmix.auto_backend`).

    - ``"cpu"``: ``"fft"``. Measured with ``benchmarks/s4.py`` (forward + backward, B = 16,
      H = 128, N = 64): the FFT path is the fastest at every length measured (1k–16k) for
      both layers — in two runs, for S4D 1.3–1.6× the chunked one at 1k and 1.8–2.1× at 4k,
      for S4 (blocked-powers kernel) 2.5–3.0× at 1k, 2.3× at 4k and 2.1–2.5× at 16k.
    - ``"gpu"`` / ``"tpu"``: ``"fft"`` too (not measured on a device). It is the one mode
      without a loop over the sequence: the kernel (S4D's Vandermonde product; S4's powers
      with rows by doubling, :func:`auto_kernel`) and the FFT convolution are unrolled
      batched operations, 0 sequential loop steps forward + backward, whereas the chunked
      mode passes a state across ``L/chunk`` chunks and the scan mode steps through ``L``.

    ``layer`` is kept so that a backend with a different balance can get its own rule.
    """
    check_positive_int("L", L)
    check_choice("layer", layer, ("s4d", "s4"))
    resolve_backend(backend)  # checks the name: every backend has the same rule today
    return "fft"


def auto_kernel(L: int, backend: str | None = None) -> str:
    """The kernel ``S4(kernel="auto")`` forms for length ``L`` under ``backend``'s rules
    (``"cpu"``, ``"gpu"``, ``"tpu"``, or None for :func:`ssmix.auto_backend`).

    ``"powers"`` on every backend (:func:`~ssmix.kernels.cauchy.dplr_power_kernel`, whose
    own ``method="auto"`` follows the same backend). On CPU it is 3–7× faster than the Cauchy
    sums at L = 1k–16k (forward + backward, ``benchmarks/s4.py``) and as accurate in float32.
    On GPU / TPU (not measured on a device) its rows come by doubling, so it has no loop at
    all and ``O(H·N·√L)`` memory, while the Cauchy sums form complex ``(H, block, N)``
    matrices over ``L/2`` frequencies in a loop of 64 MiB blocks (10 steps forward +
    backward at H = N = 64, L = 16384).
    """
    check_positive_int("L", L)
    resolve_backend(backend)  # checks the name: every backend has the same rule today
    return "powers"


def _toeplitz(k, lag_offset: int):
    """``M[..., t, s] = k[..., t − s − lag_offset]`` where that index is in ``[0, L)``, else 0."""
    L = k.shape[-1]
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :] - lag_offset
    taps = jnp.take(k, jnp.clip(lag, 0, L - 1), axis=-1)
    return jnp.where((lag >= 0) & (lag < L), taps, 0)


def _to_complex(x):
    half = x.shape[-1] // 2
    return jax.lax.complex(x[..., :half], x[..., half:])


class Packing(NamedTuple):
    """Packed-sequence layout of a batch (from :func:`packing`).

    Attributes:
      starts: bool ``(B, L)``, True where the causal recurrence starts a segment (its state
        is reset there); with a mask only before each row's end (one past its last valid
        position), so the state after the end is the last segment's.
      labels: int ``(B, L)``, the segment of each position (``cumsum(starts)``: 0 for the
        first segment, which alone reads a state passed in).
      starts_bwd: bool ``(B, L)``, True where the backward (anti-causal) recurrence starts a
        segment: the last position of every segment but the row's last.
    """

    starts: jax.Array
    labels: jax.Array
    starts_bwd: jax.Array


def packing(segment_ids, mask, batch: int, length: int) -> Packing:
    """Validate ``segment_ids`` (integer ``(B, L)``: ``TypeError`` / ``ValueError``) and
    return its :class:`Packing`. A segment is a run of equal neighbouring ids (ids may repeat
    between segments)."""
    ids = check_segment_ids(segment_ids, batch, length)
    starts = segment_starts(ids)
    if mask is not None:
        starts = starts & (jnp.arange(length)[None, :] < mask_ends(mask)[:, None])
    labels = jnp.cumsum(starts, axis=1)
    return Packing(starts, labels, segment_starts(ids, reverse=True))


def last_segment(u, pack: Packing):
    """``u (B, L, ...)`` zeroed before each row's last segment (the one that leaves the
    final state), and ``keep (B,)``: whether that segment is the first (it then reads the
    incoming state)."""
    L = u.shape[1]
    first = jnp.max(jnp.where(pack.starts, jnp.arange(L)[None, :], 0), axis=1)
    inside = jnp.arange(L)[None, :] >= first[:, None]
    return jnp.where(inside.reshape(inside.shape + (1,) * (u.ndim - 2)), u, 0), first == 0


def _blocked_scan(block_fn: Callable, x0, u, mask, block: int, resets=None):
    """Run ``block_fn(x, u_blk, m_blk, r_blk) -> (x, y_blk)`` over blocks of the sequence.

    Each block is rematerialised in the backward pass (``jax.checkpoint``), so only the
    states between blocks are stored. Positions past the end (padding up to a whole block)
    carry ``m = False`` so that they leave the state unchanged. ``resets (B, L)`` bool (or
    None): the state is zeroed before the step at those positions (``r_blk``).

    Returns ``(y (B, L, ...), final state)``.
    """
    Bsz, L, H = u.shape
    block = min(block, L)
    nb = -(-L // block)
    pad = nb * block - L
    if pad and mask is None:
        mask = jnp.ones((Bsz, L), bool)
    u = jnp.pad(u, ((0, 0), (0, pad), (0, 0)))
    u_b = jnp.moveaxis(u.reshape(Bsz, nb, block, H), 1, 0)

    def blocks(a):
        if a is None:
            return None
        return jnp.moveaxis(jnp.pad(a, ((0, 0), (0, pad))).reshape(Bsz, nb, block), 1, 0)

    def body(x, blk):
        return block_fn(x, *blk)

    x_final, y = jax.lax.scan(jax.checkpoint(body), x0, (u_b, blocks(mask), blocks(resets)))
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(Bsz, nb * block, *y.shape[3:])[:, :L], x_final


class LTISSM(nnx.Module):
    """Shared module code of :class:`S4` and :class:`~ssmix.layers.s4d.S4D`.

    Subclasses create the SSM parameters and implement the hooks that form the discrete
    system (``_system``) and its kernel, chunk operators, state maps and step. This class
    owns the output matrix ``C``, the skip ``D``, the modes, masking, state carry,
    bidirectionality and the output layout.

    Output layout: ``(B, L, H)`` for ``channels = 1``, else ``(B, L, channels·H)`` with
    feature index ``c·H + h`` (``d_output`` says which). ``C`` has ``channels`` rows, or
    ``2·channels`` when bidirectional (forward rows first, as in the S4 code).
    """

    _AUTO_LAYER = "s4d"  # which rule of auto_mode applies

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        channels: int,
        bidirectional: bool,
        mode: str,
        chunk_size: int,
        param_dtype: Any,
        rngs: nnx.Rngs,
        drop_kernel: float = 0.0,
        n_ssm: int | None = None,
        dtype: Any = None,
    ):
        check_positive_int("d_model", d_model)
        param_dtype = check_param_dtype(param_dtype, type(self).__name__)
        dtype = check_dtype(dtype)
        if n_ssm is None:
            n_ssm = d_model
        check_positive_int("n_ssm", n_ssm)
        if d_model % n_ssm:
            raise ValueError(
                f"n_ssm must divide d_model (feature h uses SSM h mod n_ssm); got "
                f"n_ssm={n_ssm}, d_model={d_model}"
            )
        if not 0.0 <= drop_kernel < 1.0:
            raise ValueError(f"drop_kernel must be in [0, 1); got {drop_kernel!r}")
        check_even("d_state", d_state)
        check_positive_int("channels", channels)
        check_positive_int("chunk_size", chunk_size)
        check_choice("mode", mode, MODES)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool; got {bidirectional!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.n_ssm = n_ssm
        self.channels = channels
        self.bidirectional = bidirectional
        self.mode = mode
        self.chunk_size = chunk_size
        self.d_output = channels * d_model
        self.param_dtype = param_dtype
        self.dtype = dtype
        self.drop_kernel = float(drop_kernel)
        # Dropout on the kernel's taps (the S4 code's drop_kernel); active after .train().
        self.kernel_dropout = nnx.Dropout(self.drop_kernel)
        n_out = channels * (2 if bidirectional else 1)
        shape = (n_out, d_model, d_state // 2)
        kr, ki = jax.random.split(rngs.params())
        # Complex normal with variance ½ per part (the S4 / S4D default).
        C = (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)) * math.sqrt(0.5)
        self.C = complex_param(C.astype(self._complex_dtype), nnx.Param)
        self.D = nnx.Param(jax.random.normal(rngs.params(), (channels, d_model), self.param_dtype))

    @property
    def _complex_dtype(self):
        return jnp.promote_types(self.param_dtype, jnp.complex64)

    def _per_feature(self, a, axis: int = 0):
        """Tile a per-SSM array (``n_ssm`` along ``axis``) to one entry per feature (``H``):
        feature ``h`` takes SSM ``h mod n_ssm``. The identity when ``n_ssm = H``."""
        if self.n_ssm == self.d_model:
            return a
        reps = [1] * a.ndim
        reps[axis] = self.d_model // self.n_ssm
        return jnp.tile(a, reps)

    # ----------------------------------------------------------------------------------------
    # Hooks implemented by S4 and S4D. `sys` is whatever `_system` returns; `C` is
    # (channels, H, N/2) complex (one direction's rows); states are complex (B, H, N/2).
    # ----------------------------------------------------------------------------------------

    def _system(self, dtype) -> Any:
        raise NotImplementedError

    def _kernel(self, sys, C, L: int):
        raise NotImplementedError

    def _chunk_ops(self, sys, C, T: int, strict: bool) -> ChunkOps:
        raise NotImplementedError

    def _state_output(self, sys, C, state, L: int):
        raise NotImplementedError

    def _state_forward(self, sys, u, state):
        raise NotImplementedError

    def _advance(self, sys, state, steps, max_steps: int):
        raise NotImplementedError

    def _scan_block(self, sys, C, strict: bool) -> Callable:
        raise NotImplementedError

    def _step_state(self, sys, state, u_t):
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------

    def _dtype(self, x):
        """``(activation dtype, SSM core dtype)`` for input ``x`` (precision policy in
        :mod:`ssmix.layers.base`)."""
        act = activation_dtype(x.dtype, self.dtype)
        return act, ssm_dtype(act, self.param_dtype)

    def _output_rows(self, dtype):
        C = as_complex(self.C).astype(jnp.promote_types(dtype, jnp.complex64))
        ch = self.channels
        return C[:ch], (C[ch:] if self.bidirectional else None)

    def init_state(self, batch: int):
        """Zero state ``(batch, H, N/2)`` (complex) for :meth:`step` or ``__call__(state=)``."""
        check_positive_int("batch", batch)
        return jnp.zeros((batch, self.d_model, self.d_state // 2), self._complex_dtype)

    def _check_state(self, state, batch: int):
        expected = (batch, self.d_model, self.d_state // 2)
        if getattr(state, "shape", None) != expected:
            got = getattr(state, "shape", type(state).__name__)
            raise ValueError(f"state must have shape (B, H, N/2) = {expected}; got {got}")

    def _finish(self, y, x_dtype):
        """``(B, L, C, H)`` → the layer's output layout, in the input's dtype."""
        y = y[:, :, 0] if self.channels == 1 else y.reshape(*y.shape[:2], self.d_output)
        return y.astype(x_dtype)

    def materialize(self, L: int):
        """The mixing matrices ``M`` with ``y[b, t, c, h] = Σ_s M[c, h, t, s]·x[b, s, h]``.

        Includes ``D`` on the diagonal and, when bidirectional, the backward kernel above it.

        Args:
          L: sequence length.

        Returns:
          ``(H, L, L)`` for ``channels = 1``, else ``(channels, H, L, L)``.
        """
        check_positive_int("L", L)
        dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        M = self._matrices(self._system(dtype), L, dtype)
        M = M + self.D[...].astype(dtype)[..., None, None] * jnp.eye(L, dtype=dtype)
        return M[0] if self.channels == 1 else M

    def _matrices(self, sys, L: int, dtype):
        k_f, k_b = self._kernels(sys, *self._output_rows(dtype), L)
        M = _toeplitz(k_f, 0)
        if k_b is not None:
            M = M + jnp.swapaxes(_toeplitz(k_b, 1), -1, -2)
        return M

    def _kernels(self, sys, C_f, C_b, L: int):
        """Forward and (if bidirectional) backward kernels from one call on stacked rows."""
        if C_b is None:
            return self._kernel(sys, C_f, L), None
        k = self._kernel(sys, jnp.concatenate([C_f, C_b], axis=0), L)
        return k[: C_f.shape[0]], k[C_f.shape[0] :]

    def __call__(
        self, x, mask=None, state=None, return_state: bool = False, *, rngs=None, segment_ids=None
    ):
        """Apply the layer.

        Args:
          x: input ``(B, L, H)``.
          mask: optional bool ``(B, L)``, True at valid positions. Padded inputs count as
            zeros (whatever they hold, NaN included), padded outputs are zero, and the
            returned state is each sequence's state right after its last valid position
            (see the module docstring).
          state: optional complex ``(B, H, N/2)`` state before the sequence (causal only).
          return_state: also return the state after the sequence (causal only).
          rngs: ``nnx.Rngs`` with a ``dropout`` stream, needed only when ``drop_kernel > 0``
            and the layer is in training mode (``.train()``); kernel dropout zeroes taps of
            the ``"fft"`` mode's kernel (the other modes never form it and refuse it).
          segment_ids: packed sequences: an integer ``(B, L)`` array, equal neighbouring ids
            = same document (as :func:`~ssmix.kernels.scan.linear_scan`); the state is reset
            where the id changes, so each segment's outputs equal running it alone (both
            directions when bidirectional). ``state`` enters only the first segment and the
            returned state is the last segment's (with a mask: right after the last valid
            position). Exact in the ``"scan"``, ``"chunked"`` (Toeplitz blocks masked to
            same-segment pairs, the state passed between chunks reset) and
            ``"materialized"`` (the ``L × L`` matrices masked to same-segment pairs) modes.
            An FFT convolution cannot reset its state, so ``"fft"`` (and ``"auto"``, which
            resolves to it) runs the ``"chunked"`` mode when ``segment_ids`` is given
            (``drop_kernel`` in training is then refused). None: one sequence per row.

        Returns:
          ``y (B, L, d_output)``, or ``(y, state)`` with ``return_state``.
        """
        check_sequence_input(x, mask, self.d_model)
        # The mode may have been reassigned since construction.
        check_choice("mode", self.mode, MODES)
        Bsz, L, H = x.shape
        if self.bidirectional and (state is not None or return_state):
            raise ValueError(
                "a bidirectional layer reads the future, so it has no causal state: "
                "state= and return_state=True need bidirectional=False"
            )
        if state is not None:
            self._check_state(state, Bsz)
        act, dtype = self._dtype(x)
        u = x.astype(act).astype(dtype)
        if mask is not None:
            u = jnp.where(mask[..., None], u, 0)
        mode = auto_mode(L, self._AUTO_LAYER) if self.mode == "auto" else self.mode
        drop = self.drop_kernel > 0 and not self.kernel_dropout.deterministic
        pack = None
        if segment_ids is not None:
            pack = packing(segment_ids, mask, Bsz, L)
            if drop:
                raise ValueError(
                    "drop_kernel drops taps of the FFT kernel, but with segment_ids the layer "
                    "runs the 'chunked' mode (an FFT convolution cannot reset its state): "
                    "call .eval() or leave drop_kernel at 0 for packed sequences"
                )
            if mode == "fft":
                mode = "chunked"
        if drop and mode != "fft":
            raise ValueError(
                f"drop_kernel drops taps of the kernel that mode='fft' forms; mode={mode!r} "
                "never forms it (use mode='fft' for training, or .eval())"
            )
        sys = self._system(dtype)
        C_f, C_b = self._output_rows(dtype)
        cstate = None if state is None else state.astype(C_f.dtype)

        final = None
        if mode == "scan":
            # Padded inputs are zero and the state decays through them up to the last valid
            # position; after it the state is held, so the scan ends on the state there.
            live = None if mask is None else jnp.arange(L)[None, :] < mask_ends(mask)[:, None]
            y, final = _blocked_scan(
                self._scan_block(sys, C_f, False),
                self._zero_or(cstate, Bsz, C_f),
                u,
                live,
                _SCAN_BLOCK,
                None if pack is None else pack.starts,
            )
            if C_b is not None:
                # No state comes out of the backward direction: every position decays.
                y_b, _ = _blocked_scan(
                    self._scan_block(sys, C_b, True),
                    self._zero_or(None, Bsz, C_f),
                    u[:, ::-1],
                    None,
                    _SCAN_BLOCK,
                    None if pack is None else pack.starts_bwd[:, ::-1],
                )
                y = y + y_b[:, ::-1]
        elif mode == "chunked":
            T = min(self.chunk_size, L)
            ops = self._chunk_ops(sys, C_f, T, False)
            if pack is not None:
                y = chunked_ssm_conv_packed(
                    u,
                    ops,
                    pack.starts,
                    None if cstate is None else _to_real(cstate),
                    ops_bwd=None if C_b is None else self._chunk_ops(sys, C_b, T, True),
                    starts_bwd=pack.starts_bwd,
                )
            elif C_b is not None:
                y = chunked_ssm_conv_bidirectional(u, ops, self._chunk_ops(sys, C_b, T, True))
            elif return_state and mask is None:
                rstate = None if cstate is None else _to_real(cstate)
                y, final = chunked_ssm_conv(u, ops, rstate, return_state=True)
                final = _to_complex(final)
            else:
                y = chunked_ssm_conv(u, ops, None if cstate is None else _to_real(cstate))
        else:
            if mode == "fft":
                k_f, k_b = self._kernels(sys, C_f, C_b, L)
                if drop:
                    k_f = self.kernel_dropout(k_f, rngs=rngs)
                    k_b = None if k_b is None else self.kernel_dropout(k_b, rngs=rngs)
                if k_b is None:
                    y = fft_conv(u, k_f)
                else:
                    y = fft_conv_bidirectional(u, k_f, k_b)
            elif pack is None:  # materialized
                y = jnp.einsum("chts,bsh->btch", self._matrices(sys, L, dtype), u)
            else:  # materialized, entries between different segments zeroed
                same = pack.labels[:, :, None] == pack.labels[:, None, :]
                y = jnp.einsum("chts,bts,bsh->btch", self._matrices(sys, L, dtype), same, u)
            if cstate is not None:
                y_state = self._state_output(sys, C_f, cstate, L)
                if pack is not None:  # the incoming state reaches the first segment only
                    y_state = jnp.where((pack.labels == 0)[:, :, None, None], y_state, 0)
                y = y + y_state

        if return_state and final is None:
            if pack is None:
                final = self._final_state(sys, u, cstate, mask)
            else:
                u_last, keep = last_segment(u, pack)
                if cstate is not None:
                    cstate = jnp.where(keep[:, None, None], cstate, 0)
                final = self._final_state(sys, u_last, cstate, mask)
        y = y + self.D[...].astype(dtype)[None, None] * u[:, :, None, :]
        if mask is not None:
            y = jnp.where(mask[:, :, None, None], y, 0)
        y = self._finish(y, x.dtype)
        return (y, final) if return_state else y

    def _zero_or(self, state, batch, C):
        if state is not None:
            return state
        return jnp.zeros((batch, self.d_model, self.d_state // 2), C.dtype)

    def _final_state(self, sys, u, state, mask):
        """State after the sequence; with a mask, right after each sequence's last valid
        position ``e_b − 1`` (padded inputs are zero and the state decays through them).

        Rolling each sequence by ``e_b`` puts position ``e_b − 1`` at ``L − 1`` and the
        (zeroed) positions after it in front, where they contribute nothing; the state after
        the rolled sequence is the state at ``e_b − 1``, plus ``Ā^{e_b}`` times the incoming
        state. With right padding ``e_b`` is the length.
        """
        if mask is None:
            return self._state_forward(sys, u, state)
        L = u.shape[1]
        ends = mask_ends(mask)
        idx = (jnp.arange(L)[None, :] + ends[:, None]) % L
        rolled = jnp.take_along_axis(u, idx[..., None], axis=1)
        final = self._state_forward(sys, rolled, None)
        if state is not None:
            final = final + self._advance(sys, state, ends, L)
        return final

    def step(self, state, x_t):
        """One step of the recurrence for autoregressive decoding (a new packed segment starts
        from a fresh :meth:`init_state`).

        Args:
          state: complex ``(B, H, N/2)`` (from :meth:`init_state` or a previous call).
          x_t: input ``(B, H)`` at the next position.

        Returns:
          ``(state, y_t)`` with ``y_t (B, d_output)``.
        """
        if self.bidirectional:
            raise ValueError("a bidirectional layer cannot be stepped: it reads the future")
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        act, dtype = self._dtype(x_t)
        u = x_t.astype(act).astype(dtype)
        sys = self._system(dtype)
        C_f, _ = self._output_rows(dtype)
        state = self._step_state(sys, state.astype(C_f.dtype), u)
        y = 2 * jnp.real(jnp.einsum("chn,bhn->bch", C_f, state))
        y = y + self.D[...].astype(dtype) * u[:, None, :]
        return state, self._finish(y[:, None], x_t.dtype)[:, 0]


class S4(LTISSM):
    """S4: an SSM per feature with a DPLR state matrix ``A = diag(Λ) − P P*`` (HiPPO init).

    Parameters (``SSMParam`` unless noted): ``A_re_log`` and ``A_im`` ``(S, N/2)`` with
    ``Λ = −exp(A_re_log) + i·A_im`` (real part in log space keeps it negative, as the S4
    code's default); ``P`` ``(rank, S, N/2, 2)`` and ``B`` ``(S, N/2, 2)`` complex as real
    pairs, ``S = n_ssm`` (default ``H``); ``log_dt`` ``(H,)``; ``C``
    ``(channels[·2], H, N/2, 2)`` and ``D`` ``(channels, H)`` are plain ``nnx.Param``.
    Bilinear discretisation (the only one with a DPLR closed form).

    ``C`` is stored as the true output matrix, not the S4 code's ``C̃ = C(I − Ā^L)``: the
    kernel of any length ``L`` is exact, stepping and the chunked / scan modes need ``C``
    itself (no linear solve), and no ``l_max`` ties the parameters to one length.

    The kernel (``"fft"`` and ``"materialized"`` modes) is formed one of two ways, the same
    function to rounding (tests/test_s4.py): ``kernel="cauchy"``, S4's generating function at
    the roots of unity by Cauchy sums with the Woodbury correction
    (:func:`~ssmix.kernels.cauchy.dplr_ssm_kernel`, ``C̃`` formed per call from ``Ā^L`` by
    repeated squaring), or ``kernel="powers"``, the time-domain blocked powers of ``Ā`` kept
    in diagonal-plus-low-rank form (:func:`~ssmix.kernels.cauchy.dplr_power_kernel`).
    ``"auto"`` (default) picks by :func:`auto_kernel`: ``"powers"`` on every backend (on
    CPU 3–7× faster than the Cauchy sums at L = 1k–16k, forward + backward,
    ``benchmarks/s4.py``, and as accurate in float32; under the GPU / TPU rules its rows
    come by doubling, with no loop).

    Args:
      d_model: H, features.
      d_state: N, full state size (even; N/2 complex modes are stored).
      channels: output channels per feature (output ``channels·H`` features).
      init: HiPPO measure, one of :data:`S4_INITS`.
      rank: rank of ``P`` (default: the smallest the measure allows, 2 for LegT).
      disc: ``"bilinear"``.
      dt_min, dt_max: range of the log-uniform Δ initialisation.
      bidirectional: add a strictly anti-causal kernel with its own ``C`` rows.
      mode: one of :data:`MODES`.
      kernel: one of :data:`S4_KERNELS`, how the ``"fft"`` / ``"materialized"`` modes form
        the kernel.
      chunk_size: chunk length of the ``"chunked"`` mode (also used for state maps).
      drop_kernel: dropout rate on the kernel's taps in training (``"fft"`` mode; pass
        ``rngs`` to the call), 0 = off.
      n_ssm: number of SSMs (``Λ``, ``P``, ``B``) shared by the features, dividing ``H``;
        feature ``h`` uses SSM ``h mod n_ssm``. None (default): ``H``, one per feature.
      param_dtype: storage dtype of the parameters, float32 or float64 (they are complex:
        bfloat16 / float16 raise a ``ValueError``; use ``dtype`` for bfloat16 activations).
      dtype: dtype the input is read in (None: the input's own). The SSM itself (kernel,
        convolution, recurrence) runs in ``promote(dtype, param_dtype, float32)``: float32
        for bfloat16 inputs. The output has the input's dtype (see the precision policy of
        :mod:`ssmix.layers.base`).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    _AUTO_LAYER = "s4"

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        channels: int = 1,
        init: str = "legs",
        rank: int | None = None,
        disc: str = "bilinear",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        bidirectional: bool = False,
        mode: str = "auto",
        kernel: str = "auto",
        chunk_size: int = 64,
        drop_kernel: float = 0.0,
        n_ssm: int | None = None,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        check_choice("init", init, S4_INITS)
        check_choice("kernel", kernel, S4_KERNELS)
        check_choice("disc", disc, ("bilinear",))
        super().__init__(
            d_model,
            d_state,
            channels=channels,
            bidirectional=bidirectional,
            mode=mode,
            chunk_size=chunk_size,
            param_dtype=param_dtype,
            rngs=rngs,
            drop_kernel=drop_kernel,
            n_ssm=n_ssm,
            dtype=dtype,
        )
        if rank is None:
            rank = 2 if init == "legt" else 1
        check_positive_int("rank", rank)
        self.init = init
        self.kernel = kernel
        self.rank = rank
        self.disc = disc
        form = hippo.nplr(init, d_state, rank, b_clip=hippo.S4_B_CLIP)
        H, S = d_model, self.n_ssm
        lam = jnp.broadcast_to(jnp.asarray(form.Lambda), (S, d_state // 2))
        re = jnp.minimum(lam.real, _MAX_REAL)
        self.A_re_log = SSMParam(jnp.log(-re).astype(self.param_dtype))
        self.A_im = SSMParam(lam.imag.astype(self.param_dtype))
        P = jnp.broadcast_to(jnp.asarray(form.P)[:, None, :], (rank, S, d_state // 2))
        self.P = complex_param(P.astype(self._complex_dtype))
        B = jnp.broadcast_to(jnp.asarray(form.B), (S, d_state // 2))
        self.B = complex_param(B.astype(self._complex_dtype))
        dt = hippo.dt_init(rngs.params(), (H,), dt_min, dt_max, dtype=self.param_dtype)
        self.log_dt = SSMParam(jnp.log(dt))

    def _system(self, dtype):
        cdtype = jnp.promote_types(dtype, jnp.complex64)
        lam = jax.lax.complex(-jnp.exp(self.A_re_log[...]), self.A_im[...]).astype(cdtype)
        P = as_complex(self.P).astype(cdtype)
        B = as_complex(self.B).astype(cdtype)
        dt = jnp.exp(self.log_dt[...]).astype(dtype)
        return self._per_feature(lam), self._per_feature(P, 1), self._per_feature(B), dt

    def _kernel(self, sys, C, L):
        kernel = auto_kernel(L) if self.kernel == "auto" else self.kernel
        fn = dplr_ssm_kernel if kernel == "cauchy" else dplr_power_kernel
        return fn(*sys[:3], C, sys[3], L)

    def _chunk_ops(self, sys, C, T, strict):
        lam, P, B, dt = sys
        return dplr_chunk_operators(lam, P, B, C, dt, T, strict=strict)

    def _state_ops(self, sys, C, L):
        return self._chunk_ops(sys, C, min(self.chunk_size, L), False)

    def _state_output(self, sys, C, state, L):
        return chunked_state_output(self._state_ops(sys, C, L), _to_real(state), L)

    def _state_forward(self, sys, u, state):
        C = jnp.zeros((1, self.d_model, self.d_state // 2), sys[0].dtype)
        ops = self._state_ops(sys, C, u.shape[1])
        return _to_complex(
            chunked_state_forward(u, ops, None if state is None else _to_real(state))
        )

    def _advance(self, sys, state, steps, max_steps):
        lam, P, B, dt = sys
        dA, _, _ = dplr_dense(lam, P, B, jnp.zeros_like(B), dt)
        x = _to_real(state)
        # Ā^{n_b} x per sequence: binary powers of the dense transition.
        power = dA
        for bit in range(max_steps.bit_length()):
            take = ((steps >> bit) & 1).astype(bool)[:, None, None]
            x = jnp.where(take, jnp.einsum("hij,bhj->bhi", power, x), x)
            power = power @ power
        return _to_complex(x)

    def _scan_block(self, sys, C, strict):
        params = dplr_step_setup(*sys)

        def block(x, u_blk, m_blk, r_blk):
            def one(x, inp):
                u_t, m_t, r_t = inp
                if r_t is not None:  # a segment starts: the step reads a zero state
                    x = jnp.where(r_t[:, None, None], 0, x)
                x_new = dplr_step(params, x, u_t)
                if m_t is not None:
                    x_new = jnp.where(m_t[:, None, None], x_new, x)
                y = 2 * jnp.real(jnp.einsum("chn,bhn->bch", C, x if strict else x_new))
                return x_new, y

            m = None if m_blk is None else jnp.moveaxis(m_blk, 1, 0)
            r = None if r_blk is None else jnp.moveaxis(r_blk, 1, 0)
            x_new, ys = jax.lax.scan(one, x, (jnp.moveaxis(u_blk, 1, 0), m, r))
            return x_new, jnp.moveaxis(ys, 0, 1)

        return block

    def _step_state(self, sys, state, u_t):
        return dplr_step(dplr_step_setup(*sys), state, u_t)
