"""The S5 layer: one multi-input multi-output diagonal SSM over all features (Smith et al. 2023).

Parameters follow lindermanlab/S5 (names, layouts and the stored-mode convention), so they
move between the two projects unchanged:

- ``Lambda_re``, ``Lambda_im`` ``(P_s,)`` (``SSMParam``): the modes ``Λ = Lambda_re + i·Lambda_im``.
- ``B`` ``(P_s, H, 2)`` (``SSMParam``, complex as real pairs): ``B̃ = V⁻¹ B``.
- ``C`` ``(H, P_s, 2)``, or ``(H, 2·P_s, 2)`` when bidirectional (``nnx.Param``): ``C̃ = C V``.
- ``D`` ``(H,)`` (``nnx.Param``) and ``log_step`` ``(P_s,)`` (``SSMParam``): ``Δ = exp(log_step)``.

``P = d_state`` is the full state size; with ``conj_sym`` only one mode of each conjugate pair
is stored (``P_s = P/2``) and the output is ``2·Re(C̃ x)``, otherwise ``P_s = P`` and the output
is ``Re(C̃ x)``. The state is complex ``(B, P_s)``.

Initialisation (``init``):

- ``"legs"`` (S5's HiPPO-N): ``Λ`` and the unitary ``V`` of the normal part of HiPPO-LegS of
  size ``P/J`` (:func:`ssmix.hippo.nplr`), repeated on the diagonal of ``J = blocks`` blocks
  (``Λ`` tiled ``J`` times, ``V`` block-diagonal, ``V⁻¹ = V*``).
- ``"ptd"`` (S5-PTD): ``(Λ̃, Ṽ, Ṽ⁻¹)`` of the perturbed-then-diagonalised HiPPO-LegS of size
  ``P/J`` (:func:`ssmix.hippo.ptd`, which applies the sign fix ``Re Λ ← −|Re Λ|`` of
  PTD, Yu et al. 2024), blocks as above. The perturbed spectrum is not conjugate-paired, so
  ``conj_sym`` must be False.

``B ~ lecun_normal`` ``(P, H)`` (fan-in ``H``); ``C`` by ``C_init``: ``"trunc_standard_normal"``
(complex ``(H, P)``, real and imaginary parts truncated normal with variance ``1/P``, then
``C̃ = C V``), ``"lecun_normal"`` (real ``(H, P)``, fan-in ``P``, then ``C̃ = C V``) or
``"complex_normal"`` (``C̃`` directly, variance ½ per part); ``D ~ N(0, 1)``; ``Δ`` log-uniform
on ``[dt_min, dt_max]`` per stored mode. The discretisation uses ``step_rescale·Δ``; with
``clip_eigs`` the real parts are clipped to ``≤ −1e-4`` before discretising (as S5 does).

Modes (``mode``): ``"sequential"``, ``"associative"``, ``"chunked"`` and ``"parallel"`` pick
the scan of :func:`ssmix.kernels.scan.linear_scan`; ``"materialized"`` multiplies by the
``(H, H, L, L)`` matrices of :meth:`S5.materialize` (O(L²H²), the oracle); ``"auto"`` runs
:func:`auto_mode` for the backend of :func:`ssmix.auto_backend`.

``dt_global`` is lindermanlab/S5's ``--dt_global`` (``s5/train_helpers.py``): it changes no
computation, only how ``log_step`` trains. S5 then labels it a regular parameter (the global
learning rate, with weight decay) instead of an SSM one; here ``log_step`` is stored as a plain
``nnx.Param`` instead of an ``SSMParam``, so :mod:`ssmix.optim` groups it the same way.

Masks: padded positions (``mask`` False) are zero inputs (replaced, not multiplied, so a NaN
there reaches no output); the state decays through them, and the returned state is the state
right after each sequence's last valid position (right or left padding, or holes; computed
inside the graph, so also under ``jit``). Without a
mask, the ``"sequential"`` and ``"associative"`` scans keep a non-finite input away from
earlier outputs; the ``"chunked"`` / ``"parallel"`` closed-form chunks and ``"materialized"``
multiply it by zero weights (``0·NaN``) into the earlier outputs of its chunk (or sequence).

Packed sequences (``segment_ids (B, L)``, integer; a segment is a run of equal neighbouring
ids): every segment's outputs equal running it alone, in every mode and both directions. The
scans reset their state where a segment starts (``linear_scan(segment_ids=)``, the backward
scan where the id changes seen from the right); ``"materialized"`` zeroes the
``(H, H, L, L)`` entries between different segments. A state passed in enters only the first
segment; the state returned is the last segment's. :meth:`S5.step` is unchanged: a new segment
starts from a fresh :meth:`S5.init_state`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssmix import hippo
from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_positive_int, check_sequence_input
from ssmix.kernels.s5 import DISCS, discretize, s5_matrix, s5_output, s5_states, s5_step
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
from ssmix.layers.s4 import last_segment, packing

__all__ = ["S5", "S5_INITS", "C_INITS", "MODES", "auto_mode"]

#: Execution modes of the S5 layer.
MODES = ("auto", "sequential", "associative", "chunked", "parallel", "materialized")

#: Initialisations of the S5 state matrix.
S5_INITS = ("legs", "ptd")

#: Initialisations of the output matrix.
C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")

# Largest real part allowed with clip_eigs (lindermanlab/S5 clips at the same value).
_CLIP_RE = -1e-4


def auto_mode(L: int, backend: str | None = None) -> str:
    """The mode ``mode="auto"`` runs for length ``L`` on ``backend`` (default:
    :func:`ssmix.auto_backend`).

    - ``"cpu"``: ``"sequential"`` at every length. Measured (``benchmarks/s5.py``, forward +
      backward, B = 16, H = 128, P = 64): the sequential and chunked scans are within 5 % of
      each other at L = 1k and 4k (1.2× and 2× the associative scan) and the sequential one is
      1.4× faster than the chunked one at 16k (2.9× the associative scan), so the sequential
      scan is the one rule that is never far from the best.
    - ``"gpu"``, ``"tpu"``: ``"parallel"`` at every length: closed-form chunks and an
      associative scan across them, no loop in the forward or backward pass (every loop step
      is a round of kernel launches there). Not yet timed on a device.
    """
    check_positive_int("L", L)
    return "sequential" if resolve_backend(backend) == "cpu" else "parallel"


def _host(a, xp, dtype=None):
    """``a`` as a NumPy array (``xp = np``, of ``dtype``) or as a JAX array (``xp = jnp``, in
    JAX's default precision, for values traced during construction)."""
    return np.asarray(a, dtype) if xp is np else jnp.asarray(a)


def _block_diag(block: np.ndarray, J: int) -> np.ndarray:
    """``J`` copies of ``block`` on the diagonal."""
    return np.kron(np.eye(J), block)


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Read-only copies (the cached results below are shared)."""
    out = tuple(np.array(a, dtype=np.complex128) for a in arrays)
    for a in out:
        a.setflags(write=False)
    return out


@functools.lru_cache(maxsize=32)
def _modes(init: str, block: int, conj_sym: bool):
    """``(Λ (m,), V (block, m), V⁻¹ (m, block))`` of one block, complex128.

    Cached: every layer of a model shares them, and a PTD block outside the packaged table
    costs an optimisation (seconds).
    """
    if init == "ptd":
        res = hippo.ptd("legs", block)
        return _frozen(res.Lambda, res.V, res.Vinv)
    Lambda, _, _, V = hippo.nplr("legs", block)  # half modes, Im ≤ 0, ascending
    if not conj_sym:
        # Full spectrum, ascending imaginary part as an eigensolver returns it.
        Lambda = np.concatenate([Lambda, Lambda.conj()[::-1]])
        V = np.concatenate([V, V.conj()[:, ::-1]], axis=1)
    return _frozen(Lambda, V, V.conj().T)


class S5(nnx.Module):
    """S5: ``x_t = Λ̄ ⊙ x_{t−1} + B̄ u_t``, ``y_t = f·Re(C̃ x_t) + D ⊙ u_t`` over ``P`` modes.

    See the module docstring for the parameters and initialisation.

    Args:
      d_model: H, features in and out.
      d_state: P, full state size (divisible by ``blocks``; each block ``P/J`` even).
      blocks: J, blocks of the block-diagonal HiPPO initialisation.
      init: ``"legs"`` (HiPPO-N) or ``"ptd"`` (S5-PTD, needs ``conj_sym=False``).
      conj_sym: store one mode per conjugate pair and output ``2·Re(·)``.
      C_init: ``"trunc_standard_normal"``, ``"lecun_normal"`` or ``"complex_normal"``.
      disc: ``"zoh"`` or ``"bilinear"``.
      dt_min, dt_max: range of the log-uniform step initialisation.
      step_rescale: positive factor on every step (e.g. for inputs at another resolution).
      clip_eigs: clip ``Re Λ`` to ``≤ −1e-4`` so the system stays stable while training.
      force_neg: use ``Re Λ ← −|Re Λ|`` in every call (S5-PTD's ``--force_neg``, after
        ``clip_eigs`` when both are set), so training cannot make a mode unstable.
      dt_global: store ``log_step`` as a plain ``nnx.Param`` (S5's ``--dt_global``: the step
        trains with the global learning rate and weight decay; see the module docstring).
      bidirectional: add a backward scan with its own ``C̃`` columns (non-causal).
      mode: ``"auto"``, ``"sequential"``, ``"associative"``, ``"chunked"``, ``"parallel"`` or
        ``"materialized"``.
      chunk_size: chunk length of the ``"chunked"`` and ``"parallel"`` modes.
      param_dtype: storage dtype of the parameters, float32 or float64 (they are complex:
        bfloat16 / float16 raise a ``ValueError``; use ``dtype`` for bfloat16 activations).
      dtype: dtype the input is read in (None: the input's own). The scans run in
        ``promote(dtype, param_dtype, float32)``: float32 (complex64) for bfloat16 inputs.
        The output has the input's dtype (see the precision policy of
        :mod:`ssmix.layers.base`).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        blocks: int = 1,
        init: str = "legs",
        conj_sym: bool = True,
        C_init: str = "trunc_standard_normal",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        step_rescale: float = 1.0,
        clip_eigs: bool = False,
        force_neg: bool = False,
        dt_global: bool = False,
        bidirectional: bool = False,
        mode: str = "auto",
        chunk_size: int = 64,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("d_model", d_model)
        param_dtype = check_param_dtype(param_dtype, "S5")
        dtype = check_dtype(dtype)
        check_positive_int("d_state", d_state)
        check_positive_int("blocks", blocks)
        check_positive_int("chunk_size", chunk_size)
        check_choice("init", init, S5_INITS)
        check_choice("C_init", C_init, C_INITS)
        check_choice("disc", disc, DISCS)
        check_choice("mode", mode, MODES)
        for name, flag in (
            ("conj_sym", conj_sym),
            ("clip_eigs", clip_eigs),
            ("force_neg", force_neg),
            ("dt_global", dt_global),
            ("bidirectional", bidirectional),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {flag!r}")
        if d_state % blocks or (d_state // blocks) % 2:
            raise ValueError(
                f"d_state must split into blocks of even size: d_state / blocks = "
                f"{d_state} / {blocks} is not an even integer"
            )
        if init == "ptd" and conj_sym:
            raise ValueError(
                "init='ptd' needs conj_sym=False: the perturbed spectrum is not conjugate-paired"
            )
        if not (isinstance(step_rescale, (int, float)) and step_rescale > 0):
            raise ValueError(f"step_rescale must be a positive number; got {step_rescale!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_output = d_model
        self.blocks = blocks
        self.init = init
        self.conj_sym = conj_sym
        self.C_init = C_init
        self.disc = disc
        self.step_rescale = float(step_rescale)
        self.clip_eigs = clip_eigs
        self.force_neg = force_neg
        self.dt_global = dt_global
        self.bidirectional = bidirectional
        self.mode = mode
        self.chunk_size = chunk_size
        self.param_dtype = param_dtype
        self.dtype = dtype

        Lambda, V, Vinv = _modes(init, d_state // blocks, conj_sym)
        Lambda = np.tile(Lambda, blocks)
        V, Vinv = _block_diag(V, blocks), _block_diag(Vinv, blocks)
        if not (
            np.all(np.isfinite(Lambda)) and np.all(np.isfinite(V)) and np.all(np.isfinite(Vinv))
        ):
            raise ValueError(f"init {init!r} produced non-finite modes or eigenvectors")
        self.d_stored = P_s = Lambda.shape[0]
        H, P = d_model, d_state
        cdtype = self._complex_dtype

        self.Lambda_re = SSMParam(jnp.asarray(Lambda.real, self.param_dtype))
        self.Lambda_im = SSMParam(jnp.asarray(Lambda.imag, self.param_dtype))
        key = rngs.params()
        # Built eagerly, B̃ = V⁻¹B and C̃ = CV are formed in NumPy float64. Built inside a
        # trace (jit, eval_shape, nnx.bridge.to_linen's apply) the random draws are tracers:
        # then the same products in JAX, in the parameters' precision.
        xp = jnp if isinstance(key, jax.core.Tracer) else np
        B = jax.nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)(key, (P, H))
        self.B = complex_param(jnp.asarray(_host(Vinv, xp) @ _host(B, xp, np.float64), cdtype))
        n_dir = 2 if bidirectional else 1
        C = xp.concatenate([self._init_C(rngs.params(), V, xp) for _ in range(n_dir)], axis=1)
        self.C = complex_param(jnp.asarray(C, cdtype), nnx.Param)
        self.D = nnx.Param(jax.random.normal(rngs.params(), (H,), self.param_dtype))
        step = hippo.dt_init(rngs.params(), (P_s,), dt_min, dt_max, dtype=self.param_dtype)
        self.log_step = (nnx.Param if dt_global else SSMParam)(jnp.log(step))

    def _init_C(self, key, V, xp=np):
        """One direction's ``C̃ (H, P_s)``: complex128 NumPy (``xp = np``) or a JAX array
        (``xp = jnp``, construction inside a trace)."""
        H, P = self.d_model, self.d_state
        if self.C_init == "complex_normal":
            kr, ki = jax.random.split(key)
            shape = (H, V.shape[1])
            C = jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)
            return _host(C, xp, np.complex128) * math.sqrt(0.5)
        lecun = jax.nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        if self.C_init == "lecun_normal":
            C = _host(lecun(key, (H, P)), xp, np.float64)
        else:
            kr, ki = jax.random.split(key)
            C = _host(lecun(kr, (H, P)), xp, np.float64) + 1j * _host(lecun(ki, (H, P)), xp)
        return C @ _host(V, xp)

    @property
    def _complex_dtype(self):
        return jnp.promote_types(self.param_dtype, jnp.complex64)

    def _dtype(self, x):
        """``(activation dtype, scan dtype)`` for input ``x`` (precision policy in
        :mod:`ssmix.layers.base`)."""
        act = activation_dtype(x.dtype, self.dtype)
        return act, ssm_dtype(act, self.param_dtype)

    def _system(self, dtype):
        """``(Λ̄ (P_s,), B̄ (P_s, H), C̃ (H, n·P_s), D (H,))`` in the compute dtype."""
        cdtype = jnp.promote_types(dtype, jnp.complex64)
        re = self.Lambda_re[...]
        if self.clip_eigs:
            re = jnp.minimum(re, _CLIP_RE)
        if self.force_neg:
            re = -jnp.abs(re)
        Lambda = jax.lax.complex(re, self.Lambda_im[...]).astype(cdtype)
        step = (self.step_rescale * jnp.exp(self.log_step[...])).astype(dtype)
        Lambda_bar, B_bar = discretize(Lambda, as_complex(self.B).astype(cdtype), step, self.disc)
        return Lambda_bar, B_bar, as_complex(self.C).astype(cdtype), self.D[...].astype(dtype)

    def init_state(self, batch: int):
        """Zero state ``(batch, P_s)`` (complex) for :meth:`step` or ``__call__(state=)``."""
        check_positive_int("batch", batch)
        return jnp.zeros((batch, self.d_stored), self._complex_dtype)

    def _check_state(self, state, batch: int):
        expected = (batch, self.d_stored)
        if getattr(state, "shape", None) != expected:
            got = getattr(state, "shape", type(state).__name__)
            raise ValueError(f"state must have shape (B, P_s) = {expected}; got {got}")

    def materialize(self, L: int):
        """Mixing matrices ``M (H, H, L, L)``: ``y[b, t, i] = Σ_{s,j} M[i, j, t, s]·x[b, s, j]``.

        Includes ``D`` on the diagonal and, when bidirectional, the backward part (``s ≥ t``).
        """
        check_positive_int("L", L)
        dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        Lambda_bar, B_bar, C, D = self._system(dtype)
        return s5_matrix(
            Lambda_bar, B_bar, C, D, L, bidirectional=self.bidirectional, conj_sym=self.conj_sym
        )

    def __call__(self, x, mask=None, state=None, return_state: bool = False, *, segment_ids=None):
        """Apply the layer.

        Args:
          x: input ``(B, L, H)``.
          mask: optional bool ``(B, L)``, True at valid positions. Padded inputs are
            replaced by zeros before the scans (whatever they hold, NaN included); padded
            outputs are zero, and the returned state is each sequence's state right after
            its last valid position.
          state: optional complex ``(B, P_s)`` state before the sequence (causal only).
          return_state: also return the state after the sequence (causal only).
          segment_ids: packed sequences: an integer ``(B, L)`` array, equal neighbouring ids
            = same document (as :func:`~ssmix.kernels.scan.linear_scan`); the state is reset
            where the id changes, so each segment's outputs equal running it alone (both
            directions when bidirectional), in every mode: the scans take ``segment_ids``,
            ``"materialized"`` zeroes the ``(H, H, L, L)`` entries between different
            segments. ``state`` enters only the first segment and the returned state is the
            last segment's (with a mask: right after the last valid position). None: one
            sequence per row.

        Returns:
          ``y (B, L, H)``, or ``(y, state)`` with ``return_state``.
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
        Lambda_bar, B_bar, C, D = self._system(dtype)
        x0 = None if state is None else state.astype(C.dtype)
        mode = auto_mode(L) if self.mode == "auto" else self.mode
        pack = None if segment_ids is None else packing(segment_ids, mask, Bsz, L)

        final = None
        if mode == "materialized":
            M = s5_matrix(
                Lambda_bar, B_bar, C, D, L, bidirectional=self.bidirectional, conj_sym=self.conj_sym
            )
            if pack is None:
                y = jnp.einsum("ijts,bsj->bti", M, u)
            else:  # entries between different segments zeroed
                same = pack.labels[:, :, None] == pack.labels[:, None, :]
                y = jnp.einsum("ijts,bts,bsj->bti", M, same, u)
            if x0 is not None:
                y_state = self._state_output(Lambda_bar, C, x0, L)
                if pack is not None:  # the incoming state reaches the first segment only
                    y_state = jnp.where((pack.labels == 0)[..., None], y_state, 0)
                y = y + y_state
            if return_state:
                if pack is None:
                    final = self._final_state_closed_form(Lambda_bar, B_bar, u, x0, mask)
                else:
                    u_last, keep = last_segment(u, pack)
                    x0_last = None if x0 is None else jnp.where(keep[:, None], x0, 0)
                    final = self._final_state_closed_form(Lambda_bar, B_bar, u_last, x0_last, mask)
        else:
            kw = dict(method=mode, chunk_size=self.chunk_size)
            # The causal scan resets where pack.starts says (only before each row's end with
            # a mask): its labels are ids with exactly those changes.
            ids_f = None if pack is None else pack.labels
            ids_b = None if pack is None else segment_ids
            states, last = s5_states(
                Lambda_bar, B_bar, u, initial_state=x0, segment_ids=ids_f, **kw
            )
            states_bwd = None
            if self.bidirectional:
                states_bwd = s5_states(Lambda_bar, B_bar, u, reverse=True, segment_ids=ids_b, **kw)[
                    0
                ]
            y = s5_output(C, states, states_bwd, D, u, conj_sym=self.conj_sym)
            if return_state:
                final = last if mask is None else self._state_at_length(states, x0, mask)
        if mask is not None:
            y = jnp.where(mask[..., None], y, 0)
        y = y.astype(x.dtype)
        return (y, final) if return_state else y

    def _state_output(self, Lambda_bar, C, x0, L):
        """Contribution ``f·Re(C̃ Λ̄^{t+1} x₀)`` of a state before the sequence: ``(B, L, H)``."""
        rdtype = jnp.finfo(Lambda_bar.dtype).dtype
        powers = jnp.exp(jnp.log(Lambda_bar) * jnp.arange(1, L + 1, dtype=rdtype)[:, None])
        y = jnp.real(jnp.einsum("hp,lp,bp->blh", C[:, : self.d_stored], powers, x0))
        return 2 * y if self.conj_sym else y

    def _final_state_closed_form(self, Lambda_bar, B_bar, u, x0, mask):
        """``x_n = Λ̄^n x₀ + Σ_{s<n} Λ̄^{n−1−s} B̄ u_s`` with ``n`` one past each sequence's
        last valid position (its length for right padding)."""
        Bsz, L, _ = u.shape
        n = jnp.full((Bsz,), L) if mask is None else mask_ends(mask)
        rdtype = jnp.finfo(Lambda_bar.dtype).dtype
        lag = (n[:, None] - 1 - jnp.arange(L)[None, :]).astype(rdtype)  # (B, L)
        w = jnp.exp(jnp.log(Lambda_bar) * jnp.maximum(lag, 0)[..., None])
        w = jnp.where((lag >= 0)[..., None], w, 0)  # (B, L, P_s)
        x = jnp.einsum("blp,ph,blh->bp", w, B_bar, u.astype(B_bar.dtype))
        if x0 is not None:
            x = x + jnp.exp(jnp.log(Lambda_bar) * n[:, None].astype(rdtype)) * x0
        return x

    def _state_at_length(self, states, x0, mask):
        """Each sequence's state after its last valid position (``x₀`` for empty ones)."""
        n = mask_ends(mask)
        idx = jnp.maximum(n - 1, 0)
        picked = jnp.take_along_axis(states, idx[:, None, None], axis=1)[:, 0]
        start = jnp.zeros_like(picked) if x0 is None else x0
        return jnp.where((n > 0)[:, None], picked, start)

    def step(self, state, x_t):
        """One step of the recurrence for autoregressive decoding.

        Args:
          state: complex ``(B, P_s)`` (from :meth:`init_state` or a previous call).
          x_t: input ``(B, H)`` at the next position.

        Returns:
          ``(state, y_t)`` with ``y_t (B, H)``.
        """
        if self.bidirectional:
            raise ValueError("a bidirectional layer cannot be stepped: it reads the future")
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        act, dtype = self._dtype(x_t)
        Lambda_bar, B_bar, C, D = self._system(dtype)
        state, y = s5_step(
            Lambda_bar,
            B_bar,
            C,
            D,
            state.astype(C.dtype),
            x_t.astype(act).astype(dtype),
            conj_sym=self.conj_sym,
        )
        return state, y.astype(x_t.dtype)
