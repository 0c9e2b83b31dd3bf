"""Mamba-2 (Dao & Gu, 2024) as a Flax NNX layer on :func:`ssmix.kernels.ssd.ssd`.

``x (B, L, d_model) → in_proj → [z | x, B, C | dt]``; the middle block goes through a causal
depthwise convolution (``d_conv`` taps, left padding ``d_conv − 1``: PyTorch's
``Conv1d(C, C, K, groups=C, padding=K − 1)`` truncated to the first ``L`` outputs) and SiLU;
``dt = softplus(dt + dt_bias)``; the causal SSD with ``A = −exp(A_log)`` per head and the skip
``D_h·x``; the gated RMSNorm ``rmsnorm(y·silu(z))·w`` (Mamba-2 normalises *after* the gate,
``norm_before_gate=False`` in state-spaces/mamba ``mamba_ssm/modules/mamba2_simple.py``;
Hydra's :class:`~ssmix.layers.mixers.GatedRMSNorm` gates after normalising); ``out_proj``.
The pieces, their order and the initialisation (``A`` uniform in ``A_init_range``, ``D = 1``,
``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``, convolution taps and bias uniform in
``±1/√d_conv``) follow ``mamba2_simple.py``.

Padding (``mask (B, L)``, True = valid, right padding): padded inputs are replaced by zeros
before ``in_proj`` (``jnp.where``: a NaN or inf stored there reaches no valid output and no
parameter gradient), the convolution reads zeros there and writes zeros there, and ``dt = 0``
there (an identity step). The convolution and the scan are causal, so valid outputs equal
those of each sequence run alone.

Packed sequences (``segment_ids (B, L)``, integer, equal ids = same document, as ``seq_idx``
in state-spaces/mamba): the convolution reads no tap from another segment (each segment sees
the zeros a lone sequence is padded with) and the SSD state is reset at every boundary
(:mod:`ssmix.kernels.ssd`), so a packed row equals every segment run alone.

Recurrent inference: :meth:`Mamba2.init_state` gives ``(conv_state (B, d_conv − 1,
conv_dim), ssm_state (B, Hh, P, N))`` and :meth:`Mamba2.step` advances one position, equal to
the full forward pass position by position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssmix._checks import check_choice, check_positive_int, check_sequence_input
from ssmix.kernels.scan._common import check_segment_ids
from ssmix.kernels.ssd import METHODS, auto_method, ssd, ssd_matrix
from ssmix.kernels.ssd.common import segment_labels
from ssmix.layers.base import (
    SSMParam,
    activation_dtype,
    check_dtype,
    check_step_input,
    ssm_dtype,
)
from ssmix.layers.mixers import _linear, dt_bias_init, zero_padding

__all__ = ["Mamba2", "causal_depthwise_conv"]


def causal_depthwise_conv(x: jax.Array, w: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """``y[:, t, c] = Σ_i w[i, c]·x[:, t − (K − 1) + i, c]``, zeros before the sequence.

    ``x (B, L, C)``, ``w (K, C)`` -> ``(B, L, C)``: a sum of ``K`` shifted, scaled slices. With
    segment ``labels (B, L)`` (:func:`~ssmix.kernels.ssd.common.segment_labels`) a tap that
    reaches back into another segment reads zero.
    """
    K, L = w.shape[0], x.shape[1]
    y = x * w[K - 1]
    for lag in range(1, min(K, L)):
        past = jnp.pad(x[:, : L - lag], ((0, 0), (lag, 0), (0, 0)))
        if labels is not None:
            same = jnp.pad(labels[:, : L - lag], ((0, 0), (lag, 0)), constant_values=-1)
            past = jnp.where((same == labels)[..., None], past, 0)
        y = y + past * w[K - 1 - lag]
    return y


class _GateThenRMSNorm(nnx.Module):
    """``rmsnorm(y·silu(z))·weight`` over the last axis in at least float32 (Mamba-2's
    ``RMSNormGated(norm_before_gate=False)``); ``weight`` starts at one."""

    def __init__(self, features: int, *, eps: float = 1e-5):
        self.features = features
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((features,)))

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(y.dtype, jnp.float32)
        g = y.astype(dtype) * jax.nn.silu(z.astype(dtype))
        rms = jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
        return (g * rms * self.weight[...].astype(dtype)).astype(y.dtype)


class Mamba2(nnx.Module):
    """Mamba-2's causal SSD mixer: ``(B, L, d_model) -> (B, L, d_model)``.

    Args:
      d_model: model width.
      d_state: state size ``N`` per group (default 64).
      d_conv: taps of the causal depthwise convolution (default 4).
      expand: ``d_inner = expand·d_model`` (default 2).
      headdim: channels per head ``P``; ``Hh = d_inner / headdim`` heads (default 64).
      ngroups: groups ``G`` sharing ``B, C`` (must divide ``Hh``).
      chunk_size: chunk length of the chunked, parallel and Pallas SSD forms; None: the
        backend's default (:func:`~ssmix.kernels.ssd.default_chunk_size`).
      A_init_range: ``A = −a`` with ``a`` uniform in this range at init (default (1, 16)).
      dt_min, dt_max, dt_init_floor: ``softplus(dt_bias)`` starts log-uniform in
        ``[dt_min, dt_max]``, at least ``dt_init_floor``.
      d_skip: keep the per-head skip ``D_h·x`` (``D`` starts at one).
      use_bias: biases in ``in_proj`` and ``out_proj`` (default False, as Mamba-2).
      conv_bias: bias in the convolution (default True).
      mode: ``"auto"`` (:func:`~ssmix.kernels.ssd.auto_method`), ``"chunked"``,
        ``"parallel"``, ``"sequential"``, ``"materialized"`` or ``"pallas"``: the method of
        :func:`~ssmix.kernels.ssd.ssd` (all give the same result).
      dtype: computation dtype of the activations (``in_proj``, the convolution, the gate,
        ``out_proj``); None: the input's. ``dt``, ``A``, the SSD and the norm's statistics
        run in ``promote(dtype, float32)``; the output has the input's dtype.
      rngs: ``nnx.Rngs``.

    Parameters: ``in_proj`` ``d_model → 2·d_inner + 2·G·N + Hh`` (order ``[z, x, B, C, dt]``),
    ``conv_weight (d_conv, conv_dim)`` and ``conv_bias (conv_dim,)`` with ``conv_dim =
    d_inner + 2·G·N`` (``weight = torch_weight[:, 0, :].T``), ``A_log`` and ``dt_bias``
    (:class:`~ssmix.layers.base.SSMParam`), ``D (Hh,)``, ``norm.weight (d_inner,)``,
    ``out_proj``.
    """

    MODES = METHODS

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int | None = None,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        d_skip: bool = True,
        use_bias: bool = False,
        conv_bias: bool = True,
        mode: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = N = check_positive_int("d_state", d_state)
        self.d_conv = K = check_positive_int("d_conv", d_conv)
        check_positive_int("expand", expand)
        self.headdim = P = check_positive_int("headdim", headdim)
        self.ngroups = G = check_positive_int("ngroups", ngroups)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.mode = check_choice("mode", mode, METHODS)
        self.dtype = check_dtype(dtype)
        self.d_inner = d_inner = expand * d_model
        if d_inner % P:
            raise ValueError(f"expand·d_model = {d_inner} must be divisible by headdim = {P}")
        self.nheads = H = d_inner // P
        if H % G:
            raise ValueError(f"ngroups = {G} must divide the number of heads {H}")
        lo, hi = (float(v) for v in A_init_range)
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high; got {A_init_range}")
        self.conv_dim = C = d_inner + 2 * G * N
        self.in_proj = nnx.Linear(d_model, d_inner + C + H, use_bias=use_bias, rngs=rngs)
        bound = 1.0 / math.sqrt(K)
        uniform = lambda shape: jax.random.uniform(  # noqa: E731
            rngs.params(), shape, minval=-bound, maxval=bound
        )
        self.conv_weight = nnx.Param(uniform((K, C)))
        self.conv_bias = nnx.Param(uniform((C,))) if conv_bias else None
        self.dt_bias = SSMParam(dt_bias_init(rngs.params(), H, dt_min, dt_max, dt_init_floor))
        a = jax.random.uniform(rngs.params(), (H,), minval=lo, maxval=hi)
        self.A_log = SSMParam(jnp.log(a))
        self.D = nnx.Param(jnp.ones((H,))) if d_skip else None
        self.norm = _GateThenRMSNorm(d_inner)
        self.out_proj = nnx.Linear(d_inner, d_model, use_bias=use_bias, rngs=rngs)

    # ----------------------------------------------------------------------------------
    # Shared pieces

    def _split_proj(self, x):
        """``in_proj`` as three column blocks: ``z (…, d_inner)``, ``xBC (…, conv_dim)``,
        ``dt (…, Hh)`` (one matmul each, as the Hydra wrapper does)."""
        edges = np.cumsum([0, self.d_inner, self.conv_dim, self.nheads])
        return [_linear(self.in_proj, x, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def _heads(self, xbc):
        """Activated ``xBC (…, conv_dim)`` -> ``x (…, Hh, P)``, ``B, C (…, G, N)``."""
        di, G, N = self.d_inner, self.ngroups, self.d_state
        lead = xbc.shape[:-1]
        xs = xbc[..., :di].reshape(*lead, self.nheads, self.headdim)
        B = xbc[..., di : di + G * N].reshape(*lead, G, N)
        C = xbc[..., di + G * N :].reshape(*lead, G, N)
        return xs, B, C

    def _check_mode(self):
        # Checked at call time too: a mode assigned after construction must fail clearly.
        check_choice("mode", self.mode, METHODS)
        return auto_method() if self.mode == "auto" else self.mode

    def _dtypes(self, x_dtype):
        """``(activation dtype, core dtype)`` for an input of ``x_dtype``."""
        act = activation_dtype(x_dtype, self.dtype)
        return act, ssm_dtype(act)

    def _mixer_inputs(self, x, mask, segment_ids):
        """Input checks, then ``z`` and the SSD arguments ``(x, dt, A, B, C)``."""
        check_sequence_input(x, mask, self.d_model, features_name="d_model")
        b, L = x.shape[:2]
        labels = None
        if segment_ids is not None:
            labels = segment_labels(check_segment_ids(segment_ids, b, L))
        act, core = self._dtypes(x.dtype)
        x = zero_padding(x, mask).astype(act)
        z, xbc, dt = self._split_proj(x)
        xbc = zero_padding(xbc, mask)
        xbc = causal_depthwise_conv(xbc, self.conv_weight[...].astype(xbc.dtype), labels)
        if self.conv_bias is not None:
            xbc = xbc + self.conv_bias[...].astype(xbc.dtype)
        xbc = zero_padding(jax.nn.silu(xbc), mask)
        xs, B, C = self._heads(xbc)
        dt = jax.nn.softplus(dt.astype(core) + self.dt_bias[...].astype(core))
        dt = zero_padding(dt, mask)
        A = -jnp.exp(self.A_log[...].astype(core))
        return z, (xs, dt, A, B, C)

    def _finish(self, y, xs, z):
        """SSD output ``y (…, Hh, P)``, values ``xs`` and gate ``z`` -> ``(…, d_model)``."""
        if self.D is not None:
            y = y + self.D[...].astype(y.dtype)[:, None] * xs
        y = y.reshape(*y.shape[:-2], self.d_inner)
        return _linear(self.out_proj, self.norm(y, z))

    # ----------------------------------------------------------------------------------
    # Public API

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``x (B, L, d_model)`` floating, ``mask (B, L)`` bool or None (right padding),
        ``segment_ids (B, L)`` integer or None (packed sequences) -> ``(B, L, d_model)``."""
        mode = self._check_mode()
        z, (xs, dt, A, B, C) = self._mixer_inputs(x, mask, segment_ids)
        y, _ = ssd(
            xs, dt, A, B, C, chunk_size=self.chunk_size, method=mode, segment_ids=segment_ids
        )
        return self._finish(y, xs, z).astype(x.dtype)

    def materialize(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The data-dependent mixing matrices ``M (B, Hh, L, L)``, lower triangular.

        Head ``h`` of the mixer outputs ``y[:, t, h] = Σ_s M[:, h, t, s]·v[:, s, h]``, where
        ``v (B, L, Hh, P)`` are the convolved, activated values (before the gated norm and
        ``out_proj``); the skip ``D_h`` is on the diagonal. With ``segment_ids`` entries
        between different segments are zero.
        """
        _, (xs, dt, A, B, C) = self._mixer_inputs(x, mask, segment_ids)
        M = ssd_matrix(dt, A, B, C, segment_ids=segment_ids)
        if self.D is not None:
            L = x.shape[1]
            M = M + self.D[...].astype(M.dtype)[:, None, None] * jnp.eye(L, dtype=M.dtype)
        return M

    def init_state(self, batch: int, dtype=None):
        """Zero recurrent state for :meth:`step`: ``(conv_state (batch, d_conv − 1, conv_dim),
        ssm_state (batch, Hh, P, N))``.

        ``dtype`` None (default) follows the layer: the convolution window in the activation
        dtype (the layer's ``dtype``, else its parameters' dtype: float32, or float64 for a
        model cast to float64) and the SSM state in ``promote(that, float32)``, where
        :meth:`step` computes it. A given ``dtype`` is used for both."""
        check_positive_int("batch", batch)
        if dtype is None:
            conv_dtype = self.dtype if self.dtype is not None else self.in_proj.kernel.dtype
            ssm_state_dtype = ssm_dtype(conv_dtype)
        else:
            conv_dtype = ssm_state_dtype = check_dtype(dtype)
        conv = jnp.zeros((batch, self.d_conv - 1, self.conv_dim), conv_dtype)
        ssm = jnp.zeros((batch, self.nheads, self.headdim, self.d_state), ssm_state_dtype)
        return conv, ssm

    def _check_state(self, state, batch: int):
        expected = (
            (batch, self.d_conv - 1, self.conv_dim),
            (batch, self.nheads, self.headdim, self.d_state),
        )
        ok = isinstance(state, (tuple, list)) and len(state) == 2
        got = tuple(getattr(s, "shape", type(s).__name__) for s in state) if ok else state
        if not ok or tuple(tuple(getattr(s, "shape", ())) for s in state) != expected:
            raise ValueError(
                "state must be the pair (conv_state (B, d_conv - 1, conv_dim), ssm_state "
                f"(B, Hh, P, N)) = {expected} of init_state; got {got}"
            )

    def step(self, state, x_t: jax.Array):
        """One position of recurrent (autoregressive) inference.

        Args:
          state: ``(conv_state, ssm_state)`` from :meth:`init_state` or a previous call.
          x_t: input ``(B, d_model)`` at the next position.

        Returns:
          ``(state, y_t)``: the new state in the dtypes of ``state`` and ``y_t (B, d_model)``
          in the dtype of ``x_t``. Position by position it equals :meth:`__call__`.
        """
        check_step_input(x_t, self.d_model)
        self._check_state(state, x_t.shape[0])
        conv_state, ssm_state = state
        act, core = self._dtypes(x_t.dtype)
        z, xbc, dt = self._split_proj(x_t.astype(act))
        window = jnp.concatenate([conv_state.astype(act), xbc[:, None]], axis=1)  # (B, K, C)
        xbc = jnp.einsum("bkc,kc->bc", window, self.conv_weight[...].astype(act))
        if self.conv_bias is not None:
            xbc = xbc + self.conv_bias[...].astype(act)
        xs, B, C = self._heads(jax.nn.silu(xbc))  # (B, Hh, P), (B, G, N)
        rep = self.nheads // self.ngroups
        B, C = jnp.repeat(B, rep, axis=1), jnp.repeat(C, rep, axis=1)  # (B, Hh, N)
        dt = jax.nn.softplus(dt.astype(core) + self.dt_bias[...].astype(core))  # (B, Hh)
        decay = jnp.exp(dt * -jnp.exp(self.A_log[...].astype(core)))
        h = decay[..., None, None] * ssm_state.astype(core)
        h = h + (dt[..., None] * xs.astype(core))[..., None] * B.astype(core)[:, :, None, :]
        y = jnp.einsum("bhpn,bhn->bhp", h, C.astype(core)).astype(act)
        out = self._finish(y, xs, z)
        new_state = (window[:, 1:].astype(conv_state.dtype), h.astype(ssm_state.dtype))
        return new_state, out.astype(x_t.dtype)
