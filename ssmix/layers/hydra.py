"""Hydra: the bidirectional quasiseparable mixer (Hwang et al., 2024) as a Flax NNX layer.

``x (B, L, d_model) → in_proj → [z | x, B_fw, C_fw, B_bw, C_bw | dt_fw, dt_bw]``; the middle
block goes through the short depthwise convolution (:class:`~ssmix.layers.mixers.ShortConv`,
non-causal, "same" padding) and SiLU; ``dt = softplus(dt + dt_bias)`` per direction; the
quasiseparable mixer :func:`ssmix.kernels.ssd.quasiseparable` with ``A = −exp(A_log)`` shared
by both directions and diagonal ``δ = D + W_D x``; gated RMSNorm with ``z``; ``out_proj``.
The pieces and their order match goombalab/hydra, so parameters port one to one.

Padding (``mask (B, L)``, True = valid, right padding): padded inputs are replaced by zeros
before ``in_proj`` (``jnp.where``: a NaN or inf stored there reaches no valid output and no
parameter gradient), the convolution reads and writes zeros at padded positions (so ``x``,
``B`` and ``C`` vanish there) and ``dt`` is set to 0 there. A zero step neither decays the
state nor adds to it, so the backward scan starts, in effect, at the last valid position with
its initial state intact, and nothing from the padding reaches a valid output: valid outputs
equal those of each sequence run alone.

Packed sequences (``segment_ids (B, L)``, integer; a segment is a run of equal neighbouring
ids, as ``seq_idx`` in state-spaces/mamba): the short convolution reads no tap from another
segment (each segment sees the zeros a lone sequence is padded with) and both directions of
the quasiseparable mixer restart at every boundary (:func:`ssmix.kernels.ssd.quasiseparable`'s
``segment_ids``), so every segment of a packed row gets exactly its output run alone, in every
mode. With ``learnable_init_states`` the learned state is a parameter of every sequence, so it
enters *every* segment in both directions (the kernel's ``initial_states`` reach only the
first / last segment; the layer adds the other segments' terms,
:func:`~ssmix.kernels.ssd.naive.qs_segment_state_terms`). Padding (``mask``) and packing
combine: padded positions stay identity steps whatever their ids.

Modes are the methods of :func:`~ssmix.kernels.ssd.quasiseparable`; ``mode="auto"`` resolves
by :func:`auto_mode` when the layer is called (traced), from :func:`ssmix.auto_backend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_positive_int
from ssmix.kernels.ssd import METHODS, auto_method, quasiseparable, quasiseparable_matrix
from ssmix.kernels.ssd.common import segment_labels
from ssmix.kernels.ssd.naive import qs_segment_state_terms
from ssmix.layers.base import SSMParam
from ssmix.layers.mixers import GatedConvWrapper, _linear, dt_bias_init, zero_padding

__all__ = ["Hydra", "auto_mode"]


def auto_mode(L: int, backend: str | None = None) -> str:
    """The quasiseparable method ``mode="auto"`` picks for length ``L`` on ``backend``
    (``None``: :func:`ssmix.auto_backend`).

    - ``"cpu"``: ``"chunked"`` at every length (fastest measured on the 2-core CPU:
      ``benchmarks/hydra.py``, at least 3× the sequential scan at L = 4096).
    - ``"gpu"``, ``"tpu"``: ``"parallel"`` at every length: no loop forward or backward (the
      chunked form's loop over chunks is a round of kernel launches per chunk there); not yet
      timed on a device.
    """
    check_positive_int("L", L)
    return auto_method(resolve_backend(backend))


class Hydra(GatedConvWrapper):
    """Hydra's quasiseparable sequence mixer: ``(B, L, d_model) -> (B, L, d_model)``.

    Args:
      d_model: model width.
      d_state: state size ``N`` per group.
      d_conv: taps of the short convolution (odd for a centred window; default 7).
      expand: ``d_inner = expand·d_model``.
      headdim: channels per head ``P``; ``Hh = d_inner / headdim`` heads.
      ngroups: groups ``G`` sharing ``B, C`` (must divide ``Hh``).
      chunk_size: chunk length of the chunked and parallel SSD kernels; None (default):
        the backend's default (:func:`~ssmix.kernels.ssd.default_chunk_size`: 64 on CPU,
        128 on GPU / TPU).
      mode: ``"auto"`` (default, :func:`auto_mode`), ``"chunked"``, ``"parallel"``,
        ``"sequential"``, ``"materialized"`` or ``"pallas"``: the method of
        :func:`~ssmix.kernels.ssd.quasiseparable` (all give the same result).
      learnable_init_states: learn one ``(Hh, P, N)`` state used as the initial state of both
        directions (as in the reference implementation); with ``segment_ids``, of every
        segment.
      dt_min, dt_max, dt_init_floor: ``softplus(dt_bias)`` starts log-uniform in
        ``[dt_min, dt_max]``, at least ``dt_init_floor``.
      use_bias: biases in ``in_proj`` and ``out_proj``.
      conv_bias: bias in the convolution.
      dtype: dtype of the projections (``in_proj``, ``fc_D``, ``out_proj``), the
        convolution, the activations and the gate (None: the input's). The quasiseparable
        mixer runs in ``promote(dtype, float32)``; the output has the input's dtype
        (precision policy of :mod:`ssmix.layers.base`).
      rngs: ``nnx.Rngs``.

    Parameters of note: ``A_log`` and ``dt_bias`` are :class:`~ssmix.layers.base.SSMParam`
    (``A`` starts at −1 in every head, as in Hydra); ``D (Hh,)`` starts at one and
    ``fc_D: d_inner → Hh`` gives the data-dependent part of the diagonal.
    """

    MODES = METHODS

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        d_conv: int = 7,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int | None = None,
        mode: str = "auto",
        learnable_init_states: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        use_bias: bool = False,
        conv_bias: bool = True,
        dtype=None,
        rngs,
    ):
        check_positive_int("d_model", d_model)
        self.d_state = N = check_positive_int("d_state", d_state)
        check_positive_int("expand", expand)
        self.headdim = check_positive_int("headdim", headdim)
        self.ngroups = G = check_positive_int("ngroups", ngroups)
        self.chunk_size = chunk_size
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.mode = check_choice("mode", mode, METHODS)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand·d_model = {d_inner} must be divisible by headdim = {headdim}")
        self.nheads = H = d_inner // headdim
        if H % G:
            raise ValueError(f"ngroups = {G} must divide the number of heads {H}")
        super().__init__(
            d_model,
            d_inner,
            d_inner + 4 * G * N,
            2 * H,
            d_conv=d_conv,
            use_bias=use_bias,
            conv_bias=conv_bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.dt_bias = SSMParam(dt_bias_init(rngs.params(), H, dt_min, dt_max, dt_init_floor))
        self.A_log = SSMParam(jnp.zeros((H,)))
        self.D = nnx.Param(jnp.ones((H,)))
        self.fc_D = nnx.Linear(d_inner, H, use_bias=False, rngs=rngs)
        self.init_states = nnx.Param(jnp.zeros((H, headdim, N))) if learnable_init_states else None

    def _mixer_inputs(self, x, mask, segment_ids=None):
        """Gate ``z`` (activation dtype) and the arguments of :func:`quasiseparable`
        (without keywords, in :meth:`core_dtype`)."""
        b, L = x.shape[:2]
        H, P, G, N, di = self.nheads, self.headdim, self.ngroups, self.d_state, self.d_inner
        core = self.core_dtype(x)
        z, c, dt = self.project(x, mask, segment_ids)
        c = jax.nn.silu(c)
        diag = (self.D[...] + _linear(self.fc_D, c[..., :di])).astype(core)
        c = c.astype(core)
        xs = c[..., :di]
        B_fw, C_fw, B_bw, C_bw = (
            c[..., di + i * G * N : di + (i + 1) * G * N].reshape(b, L, G, N) for i in range(4)
        )
        dt = dt.astype(core) + jnp.tile(self.dt_bias[...], 2).astype(core)
        dt = zero_padding(jax.nn.softplus(dt), mask)
        A = -jnp.exp(self.A_log[...]).astype(core)
        args = (xs.reshape(b, L, H, P), dt[..., :H], dt[..., H:], A, B_fw, C_fw, B_bw, C_bw, diag)
        return z, args

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """``x (B, L, d_model)``, ``mask (B, L)`` bool or None (right padding),
        ``segment_ids (B, L)`` integer or None (packed sequences, module docstring) ->
        ``(B, L, d_model)``.

        Raises ``TypeError`` / ``ValueError`` for ``segment_ids`` that is not an integer
        ``(B, L)`` array."""
        # Checked at call time too: a mode assigned after construction must fail clearly.
        check_choice("mode", self.mode, METHODS)
        z, args = self._mixer_inputs(x, mask, segment_ids)
        h = None
        if self.init_states is not None:
            h0 = self.init_states[...].astype(self.core_dtype(x))
            h = jnp.broadcast_to(h0, (x.shape[0], *self.init_states.shape))
        mode = auto_mode(x.shape[1]) if self.mode == "auto" else self.mode
        kw = dict(chunk_size=self.chunk_size, method=mode)
        if segment_ids is None:
            y = quasiseparable(*args, initial_states=None if h is None else (h, h), **kw)
        else:
            y = quasiseparable(*args, segment_ids=segment_ids, **kw)
            if h is not None:
                # The learned state enters every segment, in both directions.
                labels = segment_labels(segment_ids)
                dt_fw, dt_bw, A, _, C_fw, _, C_bw = args[1:8]
                y = y + qs_segment_state_terms(h, h, dt_fw, dt_bw, A, C_fw, C_bw, labels)
        return self.output(y.reshape(*x.shape[:2], self.d_inner), z, x.dtype)

    def materialize(
        self, x: jax.Array, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """The data-dependent quasiseparable matrices ``M (B, Hh, L, L)``.

        Head ``h`` of the mixer outputs ``y[:, t, h] = Σ_s M[:, h, t, s]·v[:, s, h]`` where
        ``v (B, L, Hh, P)`` are the convolved, activated values (before the gated norm and
        ``out_proj``). With learnable initial states the mixer adds a term from them that is
        not part of ``M``. With ``segment_ids (B, L)`` (packed sequences) entries between
        different segments are zero: ``M`` is block diagonal, each block the matrix of that
        segment run alone.
        """
        _, args = self._mixer_inputs(x, mask, segment_ids)
        return quasiseparable_matrix(*args[1:], segment_ids=segment_ids)
