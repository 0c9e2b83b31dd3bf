"""The matrix-mixer family (Hydra paper) and the wrapper it shares with :class:`Hydra`.

Every layer here is ``in_proj → short depthwise convolution → mixer → gated RMSNorm →
out_proj`` on ``x (B, L, d_model)``. The input projection yields the gate ``z``, the values
``v`` (``Hh`` heads of ``headdim`` channels) and, for data-dependent mixers, the features the
mixing matrix is built from. The mixer is a linear map along the sequence, per head:
``y[:, :, h] = M_h · v[:, :, h]`` with ``M_h`` an ``L × L`` matrix, plus a learned per-head skip
``D_h`` on the diagonal. The pieces are reusable: :class:`ShortConv` (non-causal depthwise
convolution, "same" padding), :class:`GatedRMSNorm` (``rmsnorm(y)·w·silu(z)``).

Kinds (``MatrixMixer(kind=...)``) and how their matrix is formed:

=================  ========================================================  ==========  =====
kind               M[t, s] (per head)                                        fast form   DD/DI
=================  ========================================================  ==========  =====
dense              a learned ``max_len × max_len`` matrix                    O(L²)       DI
toeplitz           ``k[t − s]`` (truly Toeplitz: depends on ``t − s`` only)  FFT         both
vandermonde        ``Σ_d cos(2π q_td s / max_len) − cos(2π k_sd t / max_len)``  O(L²d)   both
cauchy             ``Σ_d 1 / (q_td + k_sd)`` with ``q, k > 0``               O(L²d)      both
low_rank           ``q_t · k_s`` (no softmax)                                Q(KᵀV)      both
attention          ``softmax_s(q_t · k_s / √d)`` over valid keys              O(L²d)      both
semiseparable      SSD (causal): ``C_t·B_s·exp(A·Σ_{s<r≤t} dt_r)·dt_s``       SSD         both
quasiseparable     Hydra's QS with ``B, C`` shared by both directions         SSD         both
=================  ========================================================  ==========  =====

(scale factors omitted). Vandermonde, cauchy and attention build and apply ``M`` a tile of
query rows (key blocks) at a time, so their memory stays bounded (:func:`auto_block_size`);
the SSD kinds run the SSD kernels' ``method="auto"``; :class:`MatrixMixer` lists the rules
per backend.

**Data-dependent** (DD) kinds build ``q, k`` (or ``B, C, dt``, or the Toeplitz taps) from the
projected and convolved input, so ``M`` changes with ``x``.
**Data-independent** (DI) kinds learn those quantities directly as parameters indexed by
position, for positions ``0 … max_len − 1``; a sequence of length ``L ≤ max_len`` uses the
leading ``L × L`` block of the ``max_len × max_len`` matrix (so a right-padded sequence of
length ``n`` sees exactly the matrix it would see alone). ``max_len`` is required for every
kind: it sizes the DI parameters and fixes the normalisation constants, which must not depend
on the (padded) length; inputs longer than ``max_len`` are rejected.

Padding (``mask (B, L)``, True = valid, right padding): padded inputs are replaced by zeros
before ``in_proj`` (``jnp.where``, so a NaN or inf stored there reaches no valid output and no
parameter gradient); the convolution reads zeros at padded positions and writes zeros there, so
``v`` and the features vanish on padding; attention masks padded keys; the SSD kinds get ``dt =
0`` on padding. Valid outputs therefore equal those of each sequence run alone.

Packed rows (``segment_ids (B, L)``, integer; a segment is a contiguous run of equal ids, so
an id repeated after a different one starts a new segment; :data:`SEGMENT_KINDS`: attention,
semiseparable, quasiseparable): several documents share a row and each gets exactly the
outputs it would get alone. The convolution reads no tap from another segment (zeros beyond a
segment's ends, :class:`ShortConv`); the SSD kinds reset their state at every boundary in
both directions (the SSD kernels' ``segment_ids``); attention lets a query see the keys of
its own segment only; data-independent parameters are indexed by the position within the
segment (each document sees the leading block of the ``max_len × max_len`` matrix; the row
length ``L`` must still be at most ``max_len``). ``materialize`` is then block diagonal: zero
between segments. It combines with ``mask`` (right padding). The other kinds do not
implement packed rows and raise a ``ValueError`` naming the kinds that do.

Precision (the policy of :mod:`ssmix.layers.base`): ``dtype`` (None = the input's) is the
dtype of ``in_proj``, the convolution, the activations, the gate and ``out_proj``; the
mixing matrix and its product (and the SSD kernels) run in ``promote(dtype, float32)``, the
norm's statistics in at least float32; the output has the input's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ssmix._backend import resolve_backend
from ssmix._checks import (
    check_choice,
    check_floating,
    check_ndim,
    check_positive_int,
    check_sequence_input,
)
from ssmix.kernels.attention import softmax_attention
from ssmix.kernels.fftconv import fft_conv_bidirectional
from ssmix.kernels.scan._common import check_segment_ids, positions_in_segment
from ssmix.kernels.ssd import METHODS as SSD_METHODS
from ssmix.kernels.ssd import quasiseparable, quasiseparable_matrix, ssd, ssd_matrix
from ssmix.kernels.ssd.common import segment_labels
from ssmix.layers.base import SSMParam, activation_dtype, check_dtype, ssm_dtype

__all__ = [
    "ShortConv",
    "GatedRMSNorm",
    "MatrixMixer",
    "KINDS",
    "DATA_INDEPENDENT_ONLY",
    "SEGMENT_KINDS",
]

KINDS = (
    "dense",
    "toeplitz",
    "vandermonde",
    "cauchy",
    "low_rank",
    "attention",
    "semiseparable",
    "quasiseparable",
)
DATA_INDEPENDENT_ONLY = ("dense",)
#: Kinds that take ``segment_ids`` (packed sequences).
SEGMENT_KINDS = ("attention", "semiseparable", "quasiseparable")
MIXER_MODES = ("fast", "materialized")
#: Kinds whose fast form builds and applies the ``L × L`` matrix a tile of rows (keys) at a
#: time (:func:`auto_block_size`).
TILED_KINDS = ("vandermonde", "cauchy", "attention")


def check_input(x: jax.Array, d_model: int, mask: jax.Array | None) -> None:
    """Validate a layer input ``x (B, L, d_model)`` (floating, ``L ≥ 1``) and its optional
    ``mask (B, L)`` bool: :func:`ssmix._checks.check_sequence_input`, the rule of every layer."""
    check_sequence_input(x, mask, d_model, features_name="d_model")


def zero_padding(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Zero ``v (B, L, ...)`` at padded positions."""
    if mask is None:
        return v
    return jnp.where(mask.reshape(mask.shape + (1,) * (v.ndim - 2)), v, 0)


def inverse_softplus(y: jax.Array) -> jax.Array:
    """``x`` with ``softplus(x) = y`` for ``y > 0``."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(
    key: jax.Array, n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4
) -> jax.Array:
    """Biases ``(n,)`` whose softplus is log-uniform in ``[dt_min, dt_max]``, at least ``floor``."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
    u = jax.random.uniform(key, (n,))
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(jnp.maximum(dt, floor))


def depthwise_conv_same(x: jax.Array, w: jax.Array, *, backend: str | None = None) -> jax.Array:
    """``y[:, t] = Σ_i w[i]·x[:, t + i − left]`` with ``left = (K − 1) // 2``, zero padding.

    ``x (B, L, C)``, ``w (K, C)`` -> ``(B, L, C)``. Both passes are sums of ``K`` shifted
    slices (the gradient with respect to ``x`` is the same sum with the taps reversed, the
    gradient with respect to ``w`` one reduction per tap); differentiating the slices
    automatically would add one padded copy of the cotangent per tap.

    ``backend`` (default :func:`ssmix.auto_backend`) picks how the batch is walked. ``"cpu"``:
    one batch element at a time in a ``fori_loop``, because XLA:CPU would otherwise recompute
    the sum inside every consumer and materialise the ``K`` shifted inputs they share (``K``
    copies of ``x``); measured there an order of magnitude faster than the depthwise
    convolution primitive. ``"gpu"`` / ``"tpu"``: the whole batch at once, no loop (on an
    accelerator every loop step is a round of kernel launches, and the fused shifted sum
    reads ``x`` once).
    """
    return _depthwise_conv(x, w, resolve_backend(backend) == "cpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_conv(x, w, per_batch):
    return _over_batch(lambda xb: _shifted_sum(xb, w, (w.shape[0] - 1) // 2), x, per_batch)


def _over_batch(f, x, per_batch):
    """``f(x)`` for a batch-wise ``f``: one ``x[b:b+1]`` at a time if ``per_batch``."""
    if not per_batch:
        return f(x)

    def body(b, out):
        return lax.dynamic_update_index_in_dim(out, f(x[b][None])[0], b, axis=0)

    return lax.fori_loop(0, x.shape[0], body, jnp.zeros_like(x))


def _shift(x, d):
    """``x[:, t + d]`` at position ``t``, zero outside the sequence."""
    if abs(d) >= x.shape[1]:
        return jnp.zeros_like(x)
    if d > 0:
        return jnp.pad(x[:, d:], ((0, 0), (0, d), (0, 0)))
    if d < 0:
        return jnp.pad(x[:, :d], ((0, 0), (-d, 0), (0, 0)))
    return x


def _shifted_sum(x, w, left):
    return sum(_shift(x, i - left) * w[i] for i in range(w.shape[0]))


def depthwise_conv_same_segments(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    """:func:`depthwise_conv_same` on packed rows: a tap that reaches into another segment
    reads zero, so each segment sees zeros beyond its ends, as if run alone.

    ``x (B, L, C)``, ``w (K, C)``, segment ``labels (B, L)``
    (:func:`~ssmix.kernels.ssd.common.segment_labels`) -> ``(B, L, C)``. The same sum of ``K``
    shifted slices, each masked where the shifted position's label differs (automatic
    differentiation: this path is only taken with ``segment_ids``)."""
    left = (w.shape[0] - 1) // 2
    y = 0
    for i in range(w.shape[0]):
        d = i - left
        if abs(d) >= x.shape[1]:
            continue
        tap = _shift(x, d)
        if d:
            # The label at t + d (−1, no label, outside the row): labels count from 0.
            other = _shift(labels[..., None] + 1, d)[..., 0] - 1
            tap = jnp.where((other == labels)[..., None], tap, 0)
        y = y + tap * w[i]
    return y


def _depthwise_conv_fwd(x, w, per_batch):
    return _depthwise_conv(x, w, per_batch), (x, w)


def _depthwise_conv_bwd(per_batch, residuals, g):
    x, w = residuals
    K = w.shape[0]
    left = (K - 1) // 2
    # dx[s] = Σ_i w[i]·g[s − i + left]: the forward sum with reversed taps.
    gx = _over_batch(lambda gb: _shifted_sum(gb, jnp.flip(w, 0), K - 1 - left), g, per_batch)

    # Tap gradients are sums over B·L products: accumulated in at least float32.
    acc = jnp.promote_types(w.dtype, jnp.float32)

    def tap_grads(gb, xb):
        return jnp.stack(
            [jnp.sum(gb * _shift(xb, i - left), axis=(0, 1), dtype=acc) for i in range(K)]
        )

    if per_batch:
        body = lambda b, total: total + tap_grads(g[b][None], x[b][None])  # noqa: E731
        gw = lax.fori_loop(0, x.shape[0], body, jnp.zeros(w.shape, acc))
    else:
        gw = tap_grads(g, x)
    return gx, gw.astype(w.dtype)


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


class ShortConv(nnx.Module):
    """Depthwise, non-causal 1-D convolution with "same" padding: ``(B, L, C) -> (B, L, C)``.

    ``y[t, c] = bias[c] + Σ_i weight[i, c]·x[t + i − left, c]`` with ``left = (K − 1) // 2``
    zeros before the sequence and ``K − 1 − left`` after it (PyTorch's ``Conv1d(C, C, K,
    groups=C, padding=K // 2)`` for odd ``K``: ``weight = torch_weight[:, 0, :].T``). It is
    computed by :func:`depthwise_conv_same` as a sum of ``K`` shifted, scaled slices (on
    XLA:CPU an order of magnitude faster than the depthwise convolution primitive), one batch
    element at a time under the CPU rule and over the whole batch, loop-free, under the
    GPU / TPU rules (:func:`ssmix.auto_backend`).

    With ``mask (B, L)`` the padded inputs are read as zeros and the padded outputs are set to
    zero, so a right-padded sequence gets exactly its unpadded result at valid positions.
    With ``segment_ids (B, L)`` (integers; a segment is a contiguous run of equal ids) a tap
    that reaches into another segment reads zero, so each segment of a packed row gets
    exactly its result run alone (:func:`depthwise_conv_same_segments`).

    Args:
      channels: ``C``.
      kernel_size: ``K`` taps (default 7).
      use_bias: add a per-channel bias.
      dtype: computation dtype (None: the input's); the weights are cast to it and the
        output has the input's dtype.
      rngs: initialisation (uniform in ``±1/√K``, PyTorch's default for this layer).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        use_bias: bool = True,
        dtype=None,
        rngs,
    ):
        self.channels = check_positive_int("channels", channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.dtype = check_dtype(dtype)
        bound = 1.0 / math.sqrt(kernel_size)
        init = lambda shape: jax.random.uniform(rngs.params(), shape, minval=-bound, maxval=bound)  # noqa: E731
        self.weight = nnx.Param(init((kernel_size, channels)))
        self.bias = nnx.Param(init((channels,))) if use_bias else None

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """``x (B, L, C)``, ``mask (B, L)`` bool or None, ``segment_ids (B, L)`` integer or
        None (packed sequences) -> ``(B, L, C)``."""
        check_ndim("x", x, 3, f"(B, L, C={self.channels})")
        check_floating("x", x)
        if x.shape[-1] != self.channels:
            raise ValueError(f"x must have {self.channels} channels; got {x.shape}")
        if segment_ids is not None:
            segment_ids = check_segment_ids(segment_ids, *x.shape[:2])
        cd = activation_dtype(x.dtype, self.dtype)
        u, w = zero_padding(x, mask).astype(cd), self.weight[...].astype(cd)
        if segment_ids is None:
            y = depthwise_conv_same(u, w)
        else:
            y = depthwise_conv_same_segments(u, w, segment_labels(segment_ids))
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        return zero_padding(y, mask).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """``rmsnorm(y)·weight·silu(z)`` over the last axis (normalise, then gate).

    The statistics and ``rmsnorm(y)·weight`` are computed in ``promote(dtype, float32)``
    (a mean square in bfloat16 would lose the small channels), the gate ``·silu(z)`` in
    ``dtype``.

    Args:
      features: size of the last axis of ``y`` and ``z``.
      eps: added to the mean square.
      dtype: computation dtype of the gate (None: the dtype of ``y``); the output has the
        dtype of ``y``.
      rngs: unused (the weight starts at one); accepted for a uniform constructor.
    """

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=None, rngs=None):
        self.features = check_positive_int("features", features)
        self.eps = float(eps)
        self.dtype = check_dtype(dtype)
        self.weight = nnx.Param(jnp.ones((features,)))

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """``y, z (..., features)`` -> ``(..., features)`` in the dtype of ``y``."""
        if y.shape != z.shape or y.shape[-1] != self.features:
            raise ValueError(
                f"y and z must have the same shape ending in {self.features}; "
                f"got {y.shape} and {z.shape}"
            )
        check_floating("y", y)
        check_floating("z", z)
        cd = activation_dtype(y.dtype, self.dtype)
        y32 = y.astype(ssm_dtype(cd))
        rms = jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + self.eps)
        normed = (y32 * rms * self.weight[...].astype(y32.dtype)).astype(cd)
        return (normed * jax.nn.silu(z.astype(cd))).astype(y.dtype)


def _linear(layer: nnx.Linear, x: jax.Array, start: int = 0, stop: int | None = None):
    """``layer(x)`` restricted to output columns ``start:stop``, as one 2-D matmul."""
    w = layer.kernel[..., start:stop]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))
    if layer.bias is not None:
        y = y + layer.bias[start:stop].astype(y.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class GatedConvWrapper(nnx.Module):
    """The shared skeleton ``in_proj → ShortConv → (mixer) → GatedRMSNorm → out_proj``.

    ``in_proj`` maps ``d_model`` to ``[z (d_inner) | conv part (conv_dim) | extra (extra_dim)]``;
    only the conv part goes through the convolution. Subclasses implement the mixer between
    :meth:`project` and :meth:`output`, in :meth:`core_dtype` (precision policy of
    :mod:`ssmix.layers.base`: ``dtype`` for the projections, convolution and gate, float32
    or wider for the mixer).
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        conv_dim: int,
        extra_dim: int,
        *,
        d_conv: int,
        use_bias: bool,
        conv_bias: bool,
        dtype=None,
        rngs,
    ):
        self.d_model = check_positive_int("d_model", d_model)
        self.dtype = check_dtype(dtype)
        self.d_inner = d_inner
        self.conv_dim = conv_dim
        self.extra_dim = extra_dim
        total = d_inner + conv_dim + extra_dim
        self.in_proj = nnx.Linear(d_model, total, use_bias=use_bias, rngs=rngs)
        self.conv = ShortConv(conv_dim, d_conv, use_bias=conv_bias, dtype=dtype, rngs=rngs)
        self.norm = GatedRMSNorm(d_inner, dtype=dtype)
        self.out_proj = nnx.Linear(d_inner, d_model, use_bias=use_bias, rngs=rngs)

    def project(
        self, x: jax.Array, mask: jax.Array | None, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x (B, L, d_model)`` -> ``z (B, L, d_inner)``, the convolved part ``(B, L,
        conv_dim)`` (before any activation; zero at padded positions) and the extra part
        ``(B, L, extra_dim)``, all in the activation dtype (``dtype``, or the input's).

        Padded positions of ``x`` are replaced by zeros first (``jnp.where``): a NaN or inf
        stored there must reach neither a valid output nor a parameter gradient (``in_proj``'s
        weight gradient sums ``x_t ⊗ cotangent_t`` over every position, and ``0 · NaN`` is
        NaN). With ``segment_ids (B, L)`` (integer; packed sequences) the convolution reads no
        tap from another segment (:class:`ShortConv`)."""
        check_input(x, self.d_model, mask)  # segment_ids: checked by the convolution
        x = zero_padding(x, mask).astype(activation_dtype(x.dtype, self.dtype))
        # One matmul per part with a column block of in_proj's weight, over flattened leading
        # axes: slicing one (B, L, total) product would make every part's gradient a padded
        # full-width copy, and its weight gradient a transpose of that copy.
        edges = np.cumsum([0, self.d_inner, self.conv_dim, self.extra_dim])
        parts = [_linear(self.in_proj, x, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        z, c, e = parts
        return z, self.conv(c, mask, segment_ids), e

    def core_dtype(self, x: jax.Array) -> jnp.dtype:
        """The dtype the mixer runs in for input ``x``: ``promote(dtype, float32)``."""
        return ssm_dtype(activation_dtype(x.dtype, self.dtype))

    def output(self, y: jax.Array, z: jax.Array, out_dtype) -> jax.Array:
        """Mixer output ``y (B, L, d_inner)`` (any float dtype) and gate ``z`` (activation
        dtype) -> ``(B, L, d_model)`` in ``out_dtype`` (the layer's input dtype)."""
        y = self.norm(y.astype(z.dtype), z)
        return _linear(self.out_proj, y).astype(out_dtype)


# --------------------------------------------------------------------------------------
# Matrices and fast products of the individual kinds. Heads are axis 2 of (B, L, Hh, ·)
# features; matrices are (B or 1, Hh, L, L).


def _toeplitz_taps_matrix(k_fwd, k_bwd):
    """``M[t, s] = k_fwd[t − s]`` (s ≤ t), ``k_bwd[s − t − 1]`` (s > t); taps ``(…, Hh, L)``."""
    L = k_fwd.shape[-1]
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
    fwd = jnp.take(k_fwd, jnp.clip(lag, 0, L - 1), axis=-1)
    bwd = jnp.take(k_bwd, jnp.clip(-lag - 1, 0, L - 1), axis=-1)
    return jnp.where(lag >= 0, fwd, bwd)


def _vandermonde_matrix(q, k, max_len, scale):
    """``scale·Σ_d [cos(2π q[t,d]·s/max_len) − cos(2π k[s,d]·t/max_len)]``.

    ``q, k (B|1, L, Hh, d)``."""
    L = q.shape[1]
    pos = jnp.arange(L, dtype=q.dtype)
    w = 2 * jnp.pi / max_len
    qt = jnp.moveaxis(q, 1, 2)[..., :, None, :]  # (B, Hh, t, 1, d)
    ks = jnp.moveaxis(k, 1, 2)[..., None, :, :]  # (B, Hh, 1, s, d)
    rows = jnp.cos(w * qt * pos[None, :, None])  # q_t at position s
    cols = jnp.cos(w * ks * pos[:, None, None])  # k_s at position t
    return scale * jnp.sum(rows - cols, axis=-1)


def _cauchy_matrix(q, k, scale):
    """``scale·Σ_d 1/(q[t,d] + k[s,d])`` for positive ``q, k (B|1, L, Hh, d)``."""
    qt = jnp.moveaxis(q, 1, 2)[..., :, None, :]
    ks = jnp.moveaxis(k, 1, 2)[..., None, :, :]
    return scale * jnp.sum(1.0 / (qt + ks), axis=-1)


def _same_segment(segment_ids):
    """``(B, 1, L, L)`` bool: positions ``t, s`` lie in the same segment."""
    labels = segment_labels(segment_ids)
    return labels[:, None, :, None] == labels[:, None, None, :]


def _attention_matrix(q, k, mask, same=None):
    """Row-wise softmax of ``q·k/√d`` over the valid keys; ``q, k (B|1, L, Hh, d)``; with
    ``same (B, 1, L, L)`` (:func:`_same_segment`) over the valid keys of the query's segment."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    valid = None if mask is None else mask[:, None, None, :]
    if same is not None:
        valid = same if valid is None else valid & same
    if valid is not None:
        # A finite floor keeps a fully padded row finite (uniform weights over zero values).
        scores = jnp.where(valid, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)


#: Bytes of one ``(B, Hh, block, L)`` tile of the accelerator forms when ``block_size=None``.
TILE_BYTES = 256 * 2**20
#: Rows (keys) per tile on CPU, and the longest sequence for which the CPU keeps the full
#: vandermonde product (see :func:`auto_block_size`).
CPU_BLOCK_SIZE = 256
CPU_FULL_VANDERMONDE_MAX_LEN = 256


def auto_block_size(
    kind: str, batch: int, heads: int, L: int, itemsize: int, backend: str | None = None
) -> int | None:
    """Rows (keys for attention) per tile of the tiled fast form of ``kind`` (one of
    :data:`TILED_KINDS`), or None for the full ``(B, Hh, L, L)`` product, on ``backend``
    (``None``: :func:`ssmix.auto_backend`); ``batch`` is that of the tiles (1 for
    data-independent vandermonde / cauchy), ``itemsize`` the bytes of their entries.

    - ``"cpu"``: :data:`CPU_BLOCK_SIZE` = 256, except the full product for vandermonde up to
      L = 256. Measured on the 2-core CPU (fwd + bwd, B = 2, d_model = 64, two heads, qk_dim
      16; interleaved medians on a loaded machine), full product / tiles of 256 (of 128 where
      marked): vandermonde L = 64: 7 / 11 ms (128), L = 256: 122 / 127 ms (128), 169 ms (256),
      L = 1024: 20 / 3.3 s; cauchy L = 256: 36 / 11 ms, L = 1024: 877 / 331 ms; attention
      L = 1024: 161 / 83 ms, L = 4096: 1.7 / 0.84 s. Tiles of 128 and 256 were within noise
      of each other at L = 1024 and 4096.
    - ``"gpu"``, ``"tpu"``: the largest block for which one ``(batch, heads, block, L)`` array
      stays within :data:`TILE_BYTES` (bounded memory, few loop steps: 1024 rows at
      B = 2, two heads, L = 16384, float32: 16 tiles forward and 16 backward).
    """
    check_choice("kind", kind, TILED_KINDS)
    if resolve_backend(backend) == "cpu":
        if kind == "vandermonde" and L <= CPU_FULL_VANDERMONDE_MAX_LEN:
            return None
        return min(L, CPU_BLOCK_SIZE)
    return max(1, min(L, TILE_BYTES // (batch * heads * L * itemsize)))


def _vandermonde_rows(q, k, t, max_len, scale):
    """Rows ``t (T,)`` of :func:`_vandermonde_matrix`: ``(B|1, Hh, T, L)`` from the rows'
    ``q (B|1, T, Hh, d)`` and all of ``k (B|1, L, Hh, d)``.

    The sum over ``d`` is written out term by term, so no ``(…, T, L, d)`` array is formed."""
    w = 2 * jnp.pi / max_len
    s = jnp.arange(k.shape[1], dtype=k.dtype)
    qt, ks = jnp.moveaxis(q, 1, 2), jnp.moveaxis(k, 1, 2)  # (B, Hh, T, d), (B, Hh, L, d)
    total = 0.0
    for i in range(q.shape[-1]):
        rows = jnp.cos(w * qt[..., :, i, None] * s)  # q_t at position s
        cols = jnp.cos(w * ks[..., None, :, i] * t[:, None])  # k_s at position t
        total = total + (rows - cols)
    return scale * total


def _cauchy_rows(q, k, scale):
    """Rows of :func:`_cauchy_matrix`: ``(B|1, Hh, T, L)`` from the rows' ``q (B|1, T, Hh,
    d)`` and all of ``k (B|1, L, Hh, d)``, the sum over ``d`` written out term by term."""
    qt, ks = jnp.moveaxis(q, 1, 2), jnp.moveaxis(k, 1, 2)
    total = 0.0
    for i in range(q.shape[-1]):
        total = total + 1.0 / (qt[..., :, i, None] + ks[..., None, :, i])
    return scale * total


def _apply_matrix(M, v):
    """``y[:, t, h] = Σ_s M[:, h, t, s]·v[:, s, h]``: ``M (B|1, Hh, T, L)``, ``v (B, L, Hh, P)``."""
    if M.shape[0] == 1 and v.shape[0] > 1:
        # A shared (data-independent) matrix is not copied per batch element.
        return jnp.einsum("hts,bshp->bthp", M[0], v)
    return jnp.einsum("bhts,bshp->bthp", M, v)


def _row_tiled_product(rows, q, v, block):
    """``M·v`` built ``block`` rows at a time: never more than one ``(B|1, Hh, T, L)`` tile.

    ``rows(q_tile, t_tile) -> (B|1, Hh, T, L)`` builds the rows at positions ``t_tile (T,)``
    from their ``q_tile (B|1, T, Hh, d)``; ``q (B|1, L, Hh, d)``, ``v (B, L, Hh, P)`` ->
    ``(B, L, Hh, P)``. The ``n = ⌈L / block⌉`` tiles are made equal (``T = ⌈L / n⌉`` rows, the
    last padded with zero rows, dropped at the end) and walked by ``lax.map``; each tile is
    checkpointed, so the backward pass recomputes it instead of storing ``n`` of them.
    """
    L = v.shape[1]
    n = -(-L // block)
    T = -(-L // n)
    qp = jnp.pad(q, ((0, 0), (0, n * T - L), (0, 0), (0, 0)))
    q_tiles = jnp.moveaxis(qp.reshape(q.shape[0], n, T, *q.shape[2:]), 1, 0)
    t_tiles = jnp.arange(n * T, dtype=q.dtype).reshape(n, T)

    @jax.checkpoint
    def tile(args):
        return _apply_matrix(rows(*args), v)

    y = lax.map(tile, (q_tiles, t_tiles))  # (n, B, T, Hh, P)
    return jnp.moveaxis(y, 0, 1).reshape(v.shape[0], n * T, *v.shape[2:])[:, :L]


class MatrixMixer(GatedConvWrapper):
    """A sequence mixer ``y = M·v`` of a chosen structure, inside the shared gated wrapper.

    ``(B, L, d_model) -> (B, L, d_model)``; see the module docstring for the kinds, what
    data-dependent means, and padding.

    The fast form follows the backend rules of :func:`ssmix.auto_backend`, decided when the
    layer is traced:

    - every backend: vandermonde and cauchy are built and applied ``T`` query rows at a time
      (the backward recomputes each tile), attention runs the blocked softmax kernel over
      blocks of ``T`` keys, with ``T`` from :func:`auto_block_size`, which also says when the
      full ``(B, Hh, L, L)`` product is used instead. Toeplitz (FFT), low-rank and dense are
      the same on every backend.
    - ``"cpu"``: tiles of 256 (the full product for vandermonde up to L = 256), measured
      fastest; the short convolution loops over the batch (:func:`depthwise_conv_same`); the
      SSD kinds run the ``"chunked"`` kernel with chunks of 64.
    - ``"gpu"``, ``"tpu"``: tiles as large as fit 256 MiB (``T = 1024`` at B = 2, two heads,
      L = 16384, float32: 16 tiles forward and 16 backward); the short convolution runs over
      the whole batch without a loop; the SSD kinds run the loop-free ``"parallel"`` kernel
      with chunks of 128.

    Args:
      d_model: model width.
      kind: one of :data:`KINDS`.
      max_len: the longest sequence; sizes the data-independent parameters and fixes the
        normalisation constants (required for every kind).
      data_dependent: build ``M`` from the input (True) or learn it per position (False);
        ``"dense"`` is data-independent only.
      qk_dim: per-head size ``d`` of ``q, k`` (or of ``B, C`` for the SSD kinds).
      expand: ``d_inner = expand·d_model``.
      headdim: channels per head (``Hh = d_inner / headdim``).
      d_conv: taps of the short convolution.
      chunk_size: chunk length of the SSD kinds' chunked and parallel kernels; None (default):
        the backend's (:func:`~ssmix.kernels.ssd.default_chunk_size`: 64 on CPU, 128 on GPU
        and TPU).
      mode: ``"fast"`` (the structured product of the table) or ``"materialized"`` (build
        ``M`` and multiply; the oracle the fast form is tested against).
      ssd_method: the SSD kernel method of the semi- and quasiseparable kinds' fast form, one
        of :data:`ssmix.kernels.ssd.METHODS`: ``"auto"`` (default: ``"chunked"`` on CPU,
        ``"parallel"`` on GPU / TPU, :func:`~ssmix.kernels.ssd.auto_method`) or a fixed one.
        Other kinds accept only ``"auto"``.
      block_size: rows per tile (vandermonde, cauchy) or keys per block (attention) of the
        tiled fast form, on every backend; None (default): :func:`auto_block_size`, the
        backend rule above. Other kinds accept only None.
      use_bias, conv_bias: biases of the projections and of the convolution.
      dtype: dtype of the projections, convolution, activations and gate (None: the
        input's); the mixing matrix and its product run in ``promote(dtype, float32)`` and
        the output has the input's dtype (precision policy of :mod:`ssmix.layers.base`).
      rngs: ``nnx.Rngs``.
    """

    MODES = MIXER_MODES

    def __init__(
        self,
        d_model: int,
        kind: str,
        *,
        max_len: int,
        data_dependent: bool = True,
        qk_dim: int = 16,
        expand: int = 2,
        headdim: int = 64,
        d_conv: int = 7,
        chunk_size: int | None = None,
        mode: str = "fast",
        ssd_method: str = "auto",
        block_size: int | None = None,
        use_bias: bool = False,
        conv_bias: bool = True,
        dtype=None,
        rngs,
    ):
        check_choice("kind", kind, KINDS)
        check_choice("mode", mode, MIXER_MODES)
        check_positive_int("d_model", d_model)
        self.max_len = check_positive_int("max_len", max_len)
        self.qk_dim = check_positive_int("qk_dim", qk_dim)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        check_choice("ssd_method", ssd_method, SSD_METHODS)
        if ssd_method != "auto" and kind not in ("semiseparable", "quasiseparable"):
            raise ValueError(
                f"ssd_method applies to the kinds 'semiseparable', 'quasiseparable' only; "
                f"got ssd_method={ssd_method!r} for kind {kind!r}"
            )
        self.ssd_method = ssd_method
        if block_size is not None:
            check_positive_int("block_size", block_size)
            if kind not in TILED_KINDS:
                raise ValueError(
                    f"block_size applies to the kinds {TILED_KINDS} only; got kind {kind!r}"
                )
        self.block_size = block_size
        check_positive_int("expand", expand)
        check_positive_int("headdim", headdim)
        if data_dependent and kind in DATA_INDEPENDENT_ONLY:
            raise ValueError(
                f"kind {kind!r} has only a data-independent form; pass data_dependent=False"
            )
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand·d_model = {d_inner} must be divisible by headdim = {headdim}")
        self.kind = kind
        self.data_dependent = bool(data_dependent)
        self.mode = mode
        self.headdim = headdim
        self.nheads = H = d_inner // headdim
        d = qk_dim
        feat_conv, feat_extra = 0, 0
        if data_dependent:
            feat_conv = {"toeplitz": 2 * H}.get(kind, 2 * H * d)
            feat_extra = {"semiseparable": H, "quasiseparable": 2 * H}.get(kind, 0)
        super().__init__(
            d_model,
            d_inner,
            d_inner + feat_conv,
            feat_extra,
            d_conv=d_conv,
            use_bias=use_bias,
            conv_bias=conv_bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.D = nnx.Param(jnp.ones((H,)))
        Lm = max_len
        normal = lambda shape, std: std * jax.random.normal(rngs.params(), shape)  # noqa: E731
        if kind in ("semiseparable", "quasiseparable"):
            self.A_log = SSMParam(jnp.zeros((H,)))  # A = −1, as Hydra initialises it
            self.dt_bias = SSMParam(dt_bias_init(rngs.params(), H))
        if kind == "cauchy":
            self.cauchy_bias = nnx.Param(inverse_softplus(jnp.asarray(0.5)))
        if data_dependent:
            return
        if kind == "dense":
            self.matrix = nnx.Param(normal((H, Lm, Lm), 1.0 / math.sqrt(Lm)))
        elif kind == "toeplitz":
            self.taps = nnx.Param(normal((H, 2 * Lm - 1), 1.0 / math.sqrt(Lm)))
        elif kind in ("semiseparable", "quasiseparable"):
            self.B = SSMParam(normal((Lm, H, d), 1.0 / math.sqrt(d)))
            self.C = nnx.Param(normal((Lm, H, d), 1.0 / math.sqrt(d)))
        else:
            self.q = nnx.Param(normal((Lm, H, d), 1.0))
            self.k = nnx.Param(normal((Lm, H, d), 1.0))

    # ----------------------------------------------------------------------------------
    def _check_config(self):
        """Re-check the choices at call time: an attribute assigned after construction
        (``layer.mode = "chunked"``) must fail clearly, not silently run another path."""
        check_choice("kind", self.kind, KINDS)
        check_choice("mode", self.mode, MIXER_MODES)
        check_choice("ssd_method", self.ssd_method, SSD_METHODS)

    def _check_segments(self, x, mask, segment_ids):
        """Validated ``segment_ids`` (None stays None): only :data:`SEGMENT_KINDS` take them."""
        if segment_ids is None:
            return None
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(
                f"segment_ids (packed sequences) is supported by the kinds {SEGMENT_KINDS} "
                f"only; got kind {self.kind!r}"
            )
        check_input(x, self.d_model, mask)
        return check_segment_ids(segment_ids, *x.shape[:2])

    def _features(self, x, mask, segment_ids=None):
        """Gate ``z`` (activation dtype), values ``v (B, L, Hh, P)`` and the kind's matrix
        inputs (in :meth:`core_dtype`). With ``segment_ids`` (validated) the data-independent
        parameters are indexed by the position within each segment."""
        self._check_config()
        b, L = x.shape[:2]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len = {self.max_len}")
        z, c, e = self.project(x, mask, segment_ids)
        core = self.core_dtype(x)
        H, d, di = self.nheads, self.qk_dim, self.d_inner
        v = jax.nn.silu(c[..., :di]).astype(core).reshape(b, L, H, self.headdim)
        f, e = c[..., di:].astype(core), e.astype(core)
        kind = self.kind
        feats = {}
        if kind in ("low_rank", "toeplitz", "semiseparable", "quasiseparable"):
            f = jax.nn.silu(f)  # these read activated features; the others read raw ones
        if self.data_dependent:
            if kind == "toeplitz":
                feats["k_fwd"] = jnp.moveaxis(f[..., :H], 1, 2) / math.sqrt(self.max_len)
                rev = jnp.moveaxis(f[..., H:], 1, 2)[..., 1:] / math.sqrt(self.max_len)
                feats["k_bwd"] = jnp.pad(rev, ((0, 0), (0, 0), (0, 1)))
            else:
                feats["q"] = f[..., : H * d].reshape(b, L, H, d)
                feats["k"] = f[..., H * d :].reshape(b, L, H, d)
        else:
            Lm = self.max_len
            if kind == "dense":
                feats["matrix"] = self.matrix[...][None, :, :L, :L]
            elif kind == "toeplitz":
                taps = self.taps[...]
                feats["k_fwd"] = taps[None, :, Lm - 1 : Lm - 1 + L]
                # Backward tap m is the lag −(m + 1); lag −L never reaches an output.
                bwd = jnp.flip(taps[None, :, Lm - L : Lm - 1], axis=-1)
                feats["k_bwd"] = jnp.pad(bwd, ((0, 0), (0, 0), (0, 1)))
            elif segment_ids is not None:
                # Each document sees the parameters of positions 0, 1, … as if run alone.
                pos = positions_in_segment(segment_ids)
                ssd_kind = kind in ("semiseparable", "quasiseparable")
                feats["q"] = (self.C if ssd_kind else self.q)[...][pos]
                feats["k"] = (self.B if ssd_kind else self.k)[...][pos]
            elif kind in ("semiseparable", "quasiseparable"):
                feats["q"] = jnp.broadcast_to(self.C[...][:L], (b, L, H, d))
                feats["k"] = jnp.broadcast_to(self.B[...][:L], (b, L, H, d))
            else:
                feats["q"] = self.q[...][None, :L]
                feats["k"] = self.k[...][None, :L]
        if kind == "cauchy":
            bias = jax.nn.softplus(self.cauchy_bias[...])
            feats["q"] = jnp.exp(feats["q"]) + bias
            feats["k"] = jnp.exp(feats["k"]) + bias
        if kind in ("semiseparable", "quasiseparable"):
            n_dt = 1 if kind == "semiseparable" else 2
            raw = e if self.data_dependent else jnp.zeros((b, L, n_dt * H), core)
            dt = jax.nn.softplus(raw + jnp.tile(self.dt_bias[...], n_dt))
            feats["dt"] = zero_padding(dt, mask)
            feats["A"] = -jnp.exp(self.A_log[...])
        return z, v, {key: a.astype(core) for key, a in feats.items()}

    def _matrix(self, feats, mask, b, L, segment_ids=None):
        """The kind's matrix ``(B or 1, Hh, L, L)``, without the skip ``D``; with
        ``segment_ids`` (:data:`SEGMENT_KINDS` only) zero between segments."""
        kind, H = self.kind, self.nheads
        if kind == "dense":
            return feats["matrix"]
        if kind == "toeplitz":
            return _toeplitz_taps_matrix(feats["k_fwd"], feats["k_bwd"])
        q, k = feats["q"], feats["k"]
        scale = self._scale()
        if kind == "vandermonde":
            return _vandermonde_matrix(q, k, self.max_len, scale)
        if kind == "cauchy":
            return _cauchy_matrix(q, k, scale)
        if kind == "low_rank":
            return scale * jnp.einsum("bthd,bshd->bhts", q, k)
        if kind == "attention":
            same = None if segment_ids is None else _same_segment(segment_ids)
            return _attention_matrix(q, k, mask, same)
        dt, A = feats["dt"], feats["A"]
        if kind == "semiseparable":
            return ssd_matrix(dt, A, k, q, segment_ids=segment_ids)
        zero = jnp.zeros((b, L, H), dt.dtype)
        return quasiseparable_matrix(
            dt[..., :H], dt[..., H:], A, k, q, k, q, zero, segment_ids=segment_ids
        )

    def _scale(self):
        """The normalisation of the vandermonde, cauchy and low-rank matrices."""
        scale = 1.0 / math.sqrt(self.max_len * self.qk_dim)
        return scale / math.sqrt(2.0) if self.kind == "vandermonde" else scale

    def _tile_size(self, q, v):
        """Rows (keys for attention) per tile of the tiled form, or None for the full product:
        ``block_size`` if given, else :func:`auto_block_size`."""
        if self.block_size is not None:
            return self.block_size
        batch = v.shape[0] if self.kind == "attention" else q.shape[0]
        itemsize = jnp.promote_types(jnp.result_type(q, v), jnp.float32).itemsize
        return auto_block_size(self.kind, batch, self.nheads, v.shape[1], itemsize)

    def _mix_tiled(self, v, feats, mask, block, segment_ids=None):
        """The tiled products of :data:`TILED_KINDS`: ``v (B, L, Hh, P)`` -> ``(B, L, Hh, P)``."""
        q, k = feats["q"], feats["k"]
        if self.kind == "attention":
            # The kernel's layout is (B, Hh, L, ·); data-independent q, k are shared by the batch.
            q, k, vh = (
                jnp.moveaxis(jnp.broadcast_to(a, (v.shape[0], *a.shape[1:])), 1, 2)
                for a in (q, k, v)
            )
            y = softmax_attention(q, k, vh, mask=mask, block_size=block, segment_ids=segment_ids)
            return jnp.moveaxis(y, 2, 1)
        scale = self._scale()
        if self.kind == "vandermonde":
            rows = lambda qt, t: _vandermonde_rows(qt, k, t, self.max_len, scale)  # noqa: E731
        else:
            rows = lambda qt, t: _cauchy_rows(qt, k, scale)  # noqa: E731
        return _row_tiled_product(rows, q, v, block)

    def _mix_fast(self, v, feats, mask, segment_ids=None):
        kind, H = self.kind, self.nheads
        b, L = v.shape[:2]
        if kind == "toeplitz":
            u = v.reshape(b, L, H * self.headdim)
            per_channel = lambda t: jnp.repeat(t, self.headdim, axis=-2)  # noqa: E731
            k_fwd, k_bwd = per_channel(feats["k_fwd"]), per_channel(feats["k_bwd"])
            if self.data_dependent:
                conv = lambda u1, kf, kb: fft_conv_bidirectional(u1[None], kf, kb)[0]  # noqa: E731
                y = jax.vmap(conv)(u, k_fwd, k_bwd)
            else:
                y = fft_conv_bidirectional(u, k_fwd[0], k_bwd[0])
            return y.reshape(v.shape)
        if kind == "low_rank":
            q, k = feats["q"], feats["k"]
            kv = jnp.einsum("bshd,bshp->bhdp", jnp.broadcast_to(k, (b, *k.shape[1:])), v)
            scale = 1.0 / math.sqrt(self.max_len * self.qk_dim)
            return scale * jnp.einsum("bthd,bhdp->bthp", jnp.broadcast_to(q, (b, *q.shape[1:])), kv)
        if kind == "semiseparable":
            y, _ = ssd(
                v,
                feats["dt"],
                feats["A"],
                feats["k"],
                feats["q"],
                chunk_size=self.chunk_size,
                method=self.ssd_method,
                segment_ids=segment_ids,
            )
            return y
        if kind == "quasiseparable":
            dt, q, k = feats["dt"], feats["q"], feats["k"]
            zero = jnp.zeros((b, L, H), dt.dtype)
            args = (v, dt[..., :H], dt[..., H:], feats["A"], k, q, k, q, zero)
            return quasiseparable(
                *args, chunk_size=self.chunk_size, method=self.ssd_method, segment_ids=segment_ids
            )
        if kind in TILED_KINDS:
            block = self._tile_size(feats["q"], v)
            if block is not None:
                return self._mix_tiled(v, feats, mask, block, segment_ids)
        # dense, and short vandermonde on the CPU rule: the full product.
        M = self._matrix(feats, mask, b, L, segment_ids)
        return jnp.einsum("bhts,bshp->bthp", jnp.broadcast_to(M, (b, *M.shape[1:])), v)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """``x (B, L, d_model)``, ``mask (B, L)`` bool or None -> ``(B, L, d_model)``.

        ``segment_ids (B, L)`` integer or None: packed sequences (kinds in
        :data:`SEGMENT_KINDS` only; module docstring, *Packed rows*)."""
        segment_ids = self._check_segments(x, mask, segment_ids)
        z, v, feats = self._features(x, mask, segment_ids)
        b, L = x.shape[:2]
        if self.mode == "materialized":
            M = self._full_matrix(feats, mask, b, L, segment_ids)
            y = jnp.einsum("bhts,bshp->bthp", M, v)
        else:
            y = self._mix_fast(v, feats, mask, segment_ids)
            y = y + self.D[...].astype(v.dtype)[:, None] * v
        return self.output(y.reshape(b, L, self.d_inner), z, x.dtype)

    def _full_matrix(self, feats, mask, b, L, segment_ids=None):
        M = self._matrix(feats, mask, b, L, segment_ids)
        skip = jnp.eye(L, dtype=M.dtype) * self.D[...].astype(M.dtype)[:, None, None]
        M = M + skip
        if segment_ids is not None:
            # Exactly zero between segments, padded query rows included.
            M = jnp.where(_same_segment(segment_ids), M, 0)
        return jnp.broadcast_to(M, (b, self.nheads, L, L))

    def materialize(
        self, x: jax.Array, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """The mixing matrix per head ``(B, Hh, L, L)``, skip ``D`` on its diagonal included:
        the mixer outputs ``y[:, t, h] = Σ_s M[:, h, t, s]·v[:, s, h]`` where ``v`` are the
        convolved, activated values. For data-independent kinds it is the same for every
        batch element, except with ``segment_ids (B, L)`` (packed sequences,
        :data:`SEGMENT_KINDS` only): then it is block diagonal, zero between segments, each
        diagonal block the matrix of its segment run alone."""
        segment_ids = self._check_segments(x, mask, segment_ids)
        z, v, feats = self._features(x, mask, segment_ids)
        return self._full_matrix(feats, mask, *x.shape[:2], segment_ids)
