"""Residual blocks and model stacks around any ssmix sequence mixer.

A *mixer* is any module called as ``mixer(x (B, L, H), mask=None) -> (B, L, H)`` (every
layer in :mod:`ssmix.layers` follows this convention). A *mixer factory* is a callable
``factory(d_model, rngs=rngs) -> mixer``, e.g. ``functools.partial(S4D, d_state=64)``.

- :class:`ResidualBlock`: norm, mixer, activation, output projection or GLU, dropout tied
  across the length axis, residual connection (pre- or post-norm), optional MLP sub-block.
- :class:`SequenceModel`: token embedding or linear encoder, a stack of residual blocks,
  pooling over the sequence and a classification head (``head="pooled"``), or per-position
  logits for next-token prediction (``head="token"``).
- :class:`RetrievalModel`: a siamese :class:`SequenceModel` encoder whose two pooled
  features u, v are combined as ``[u, v, u - v, u * v]`` and classified by an MLP.

Training-mode switches follow Flax NNX: ``model.train()`` / ``model.eval()`` toggle dropout
and BatchNorm (running statistics). Dropout draws its keys from the ``rngs`` argument of the
call (an ``nnx.Rngs`` with a ``dropout`` stream), so a jitted train step can derive them from
a step-dependent key and stay a pure function.

BatchNorm and padding: with a ``mask``, batch statistics are computed over valid positions
only (padded positions never shift the mean or variance); running averages are updated from
those masked statistics.

Recurrent inference: for a stack of causal mixers that have ``init_state`` / ``step`` (S4,
S4D, S5 and their PTD variants without ``bidirectional``, Mamba2, causal
:class:`~ssmix.layers.Attention` with its KV cache), :meth:`ResidualBlock.step` and
:meth:`SequenceModel.step` advance the whole model by one position: ``state =
model.init_state(B)`` then ``state, out_t = model.step(state, x_t)`` for t = 0, 1, ...; the
outputs equal the full forward pass of the model in eval mode position by position. Stepping
is inference: dropout is off and BatchNorm normalises with its running statistics (as in
eval mode) without updating them, in either mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.scan._common import check_segment_ids, positions_in_segment
from ssmix.layers.base import check_step_input

NORMS = ("layer", "batch", "rms")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")
GLUS = ("none", "full", "half1", "half2")
POOLINGS = ("mean", "masked_mean", "last")
POSITIONALS = ("none", "sinusoidal")
HEADS = ("pooled", "token")

# Flax's default BatchNorm momentum (0.99) makes running statistics lag far behind the
# weights in short runs; 0.9 matches PyTorch's default (momentum 0.1) used by the S4 code.
BATCHNORM_MOMENTUM = 0.9

MixerFactory = Callable[..., nnx.Module]

_ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def check_momentum(momentum: float) -> float:
    """Return ``momentum`` if it is a number in ``[0, 1)``, else raise ``ValueError``."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"norm_momentum must be a number in [0, 1); got {momentum!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"norm_momentum must be in [0, 1); got {momentum!r}")
    return float(momentum)


def dense(linear: nnx.Linear, x: jax.Array) -> jax.Array:
    """Apply ``linear`` to ``x (..., in)`` as one 2-D matmul: ``(..., out)``.

    XLA on CPU lowers the weight gradient of an N-D ``dot_general`` (contracting batch and
    length together) about 3× slower than the same product on the flattened ``(B·L, in)``
    matrix (measured at B = 32, L = 1024, H = 64).
    """
    return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Norm(nnx.Module):
    """Normalisation over the feature axis of ``x (B, L, H)``: ``layer``, ``batch`` or ``rms``.

    ``batch`` normalises with statistics over batch and length; with ``mask (B, L)`` only valid
    positions enter the statistics. Its running averages follow
    ``r ← momentum·r + (1 − momentum)·batch_stat`` (Flax's convention; PyTorch's
    ``momentum=0.1`` is ``momentum=0.9`` here). ``momentum`` is unused by the other kinds.
    """

    def __init__(
        self,
        d_model: int,
        kind: str = "layer",
        *,
        momentum: float = BATCHNORM_MOMENTUM,
        rngs: nnx.Rngs,
    ):
        self.kind = check_choice("norm", kind, NORMS)
        check_momentum(momentum)
        if kind == "layer":
            self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        elif kind == "rms":
            self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        else:
            self.norm = nnx.BatchNorm(d_model, momentum=float(momentum), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Normalise ``x (B, L, H)``; ``mask (B, L)`` restricts BatchNorm statistics."""
        if self.kind == "batch" and mask is not None:
            return self.norm(x, mask=mask[..., None])
        return self.norm(x)

    def step(self, x_t: jax.Array) -> jax.Array:
        """Normalise one position ``x_t (B, H) -> (B, H)``, as the eval-mode call does at each
        position: layer / RMS norm per position; BatchNorm with its running statistics
        (whatever the training mode, and without updating them)."""
        if self.kind == "batch":
            return self.norm(x_t, use_running_average=True)
        return self.norm(x_t)


def check_steppable(mixer: nnx.Module, what: str) -> None:
    """Raise ``ValueError`` unless ``mixer`` can be decoded recurrently: it has ``init_state``
    and ``step`` and is causal (not ``bidirectional=True``, not ``causal=False``)."""
    name = type(mixer).__name__
    steppable = callable(getattr(mixer, "step", None)) and callable(
        getattr(mixer, "init_state", None)
    )
    if not steppable:
        raise ValueError(
            f"{what} needs causal mixers with init_state/step; {name} has no step, so it "
            "cannot be decoded recurrently (use S4, S4D, S5, S4PTD, S5PTD, Mamba2 or causal "
            "Attention)"
        )
    if getattr(mixer, "bidirectional", False) is True:
        raise ValueError(
            f"{what} needs causal mixers; this {name} is bidirectional (it reads the future): "
            "construct it with bidirectional=False"
        )
    if getattr(mixer, "causal", True) is False:
        raise ValueError(
            f"{what} needs causal mixers; this {name} has causal=False (it attends to the "
            "future): construct it with causal=True"
        )


class ResidualBlock(nnx.Module):
    """One residual block around a sequence mixer: ``x (B, L, H) -> (B, L, H)``.

    Sub-layer ``f``: mixer → activation → output map → dropout, where the output map is
    (``glu``): ``"none"`` a linear H→H; ``"full"`` ``W₁a ⊙ σ(W₂a)`` (the S4 ``glu`` and S5
    ``full_glu``); ``"half1"`` ``a ⊙ σ(Wa)``; ``"half2"`` ``z ⊙ σ(Wa)`` with ``z`` the mixer
    output and ``a = activation(z)`` (S5's ``half_glu1`` / ``half_glu2``). Dropout (after the
    activation and after the output map) draws one mask per (example, feature), shared along
    the length, as in the S4 code. Pre-norm: ``x + f(norm(x))``; post-norm:
    ``norm(x + f(x))``. With ``mlp_ratio > 0`` a second residual sub-block (norm, linear
    H→rH, activation, linear rH→H, dropout) follows: the Transformer layout.

    Args:
      mixer: a constructed sequence mixer ``mixer(x (B, L, H), mask=None) -> (B, L, H)``.
      d_model: H, the feature size of the residual stream.
      norm: ``"layer"``, ``"batch"`` or ``"rms"``.
      prenorm: normalise before the mixer (True) or after the residual sum (False).
      activation: ``"gelu"``, ``"relu"``, ``"silu"``, ``"tanh"`` or ``"identity"``.
      glu: ``"none"``, ``"full"``, ``"half1"`` or ``"half2"`` (see above).
      dropout: dropout rate in [0, 1).
      mlp_ratio: hidden size of the optional MLP sub-block as a multiple of H (0: none).
      norm_momentum: running-average momentum of ``norm="batch"`` (see :class:`Norm`).
      rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        mixer: nnx.Module,
        d_model: int,
        *,
        norm: str = "layer",
        prenorm: bool = True,
        activation: str = "gelu",
        glu: str = "full",
        dropout: float = 0.0,
        mlp_ratio: float = 0.0,
        norm_momentum: float = BATCHNORM_MOMENTUM,
        rngs: nnx.Rngs,
    ):
        check_positive_int("d_model", d_model)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("glu", glu, GLUS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0; got {mlp_ratio!r}")
        self.d_model = d_model
        self.mixer = mixer
        # Mixers with dropout inside (S4 / S4D drop_kernel) take the call's rngs too.
        self.mixer_takes_rngs = "rngs" in inspect.signature(mixer.__call__).parameters
        self.mixer_takes_segments = "segment_ids" in inspect.signature(mixer.__call__).parameters
        self.prenorm = prenorm
        self.activation = activation
        self.glu = glu
        self.norm = Norm(d_model, norm, momentum=norm_momentum, rngs=rngs)
        out_features = 2 * d_model if glu == "full" else d_model
        self.out = nnx.Linear(d_model, out_features, rngs=rngs)
        # broadcast_dims=(1,): one mask per (example, feature), tied along the length.
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1,))
        if mlp_ratio > 0:
            hidden = max(1, int(round(mlp_ratio * d_model)))
            self.mlp_norm = Norm(d_model, norm, momentum=norm_momentum, rngs=rngs)
            self.mlp_in = nnx.Linear(d_model, hidden, rngs=rngs)
            self.mlp_out = nnx.Linear(hidden, d_model, rngs=rngs)
        else:
            self.mlp_norm = None
            self.mlp_in = None
            self.mlp_out = None

    def _output_map(self, z, drop):
        """Activation, dropout ``drop``, output map / GLU of the mixer output ``z (..., H)``."""
        a = drop(_ACTIVATION_FNS[self.activation](z))
        if self.glu == "none":
            y = dense(self.out, a)
        elif self.glu == "full":
            value, gate = jnp.split(dense(self.out, a), 2, axis=-1)
            y = value * jax.nn.sigmoid(gate)
        elif self.glu == "half1":
            y = a * jax.nn.sigmoid(dense(self.out, a))
        else:
            y = z * jax.nn.sigmoid(dense(self.out, a))
        return drop(y)

    def _mix(self, x, mask, rngs, segment_ids=None):
        extra = {"rngs": rngs} if self.mixer_takes_rngs else {}
        if segment_ids is not None:
            extra["segment_ids"] = segment_ids
        z = self.mixer(x, mask=mask, **extra)
        return self._output_map(z, lambda t: self.dropout(t, rngs=rngs))

    def _mlp(self, x, drop):
        h = drop(_ACTIVATION_FNS[self.activation](dense(self.mlp_in, x)))
        return drop(dense(self.mlp_out, h))

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Apply the block to ``x (B, L, H)`` with optional ``mask (B, L)`` (True = valid).

        ``segment_ids (B, L)`` (packed sequences: equal ids = one document) goes to the
        mixer, which resets its state where the id changes; the rest of the block works per
        position (BatchNorm in training mode pools its statistics over the batch, as without
        packing). ``rngs`` supplies dropout keys in training mode (needed only when
        dropout > 0).
        """
        check_ndim("x", x, 3, "(batch, length, d_model)")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have {self.d_model} features; got shape {x.shape}")
        if segment_ids is not None and not self.mixer_takes_segments:
            raise ValueError(
                f"segment_ids (packed sequences) is not supported by the mixer "
                f"{type(self.mixer).__name__}; mixers that take it: S4, S4D, S4PTD, S5, "
                "S5PTD, Mamba2, Hydra, Attention, MatrixMixer (kinds 'attention', "
                "'semiseparable', 'quasiseparable')"
            )
        if self.prenorm:
            x = x + self._mix(self.norm(x, mask), mask, rngs, segment_ids)
        else:
            x = self.norm(x + self._mix(x, mask, rngs, segment_ids), mask)
        if self.mlp_in is not None:
            drop = lambda t: self.dropout(t, rngs=rngs)  # noqa: E731
            if self.prenorm:
                x = x + self._mlp(self.mlp_norm(x, mask), drop)
            else:
                x = self.mlp_norm(x + self._mlp(x, drop), mask)
        return x

    def init_state(self, batch: int, max_len: int | None = None, dtype=None):
        """The block's recurrent state for :meth:`step`: its mixer's ``init_state(batch)``
        (a pytree of arrays), with ``max_len=`` for a mixer whose state is a cache of
        ``max_len`` positions (causal :class:`~ssmix.layers.Attention`) and ``dtype=`` for a
        mixer whose ``init_state`` takes one (Attention's cache, Mamba2), when given; other
        mixers' states keep their own dtype (the S4 family's follows its ``param_dtype``).

        Raises ``ValueError`` for a mixer that cannot be stepped (no ``step``, bidirectional,
        non-causal attention) and when such a cache needs ``max_len`` and none is given.
        """
        check_steppable(self.mixer, "ResidualBlock.step")
        params = inspect.signature(self.mixer.init_state).parameters
        kwargs = {}
        if dtype is not None and "dtype" in params:
            kwargs["dtype"] = dtype
        if "max_len" in params:
            if max_len is not None:
                kwargs["max_len"] = max_len
            elif params["max_len"].default is inspect.Parameter.empty:
                raise ValueError(
                    f"the state of {type(self.mixer).__name__} is a cache of max_len "
                    "positions: pass init_state(batch, max_len=...), the most positions "
                    "step will be called for"
                )
        return self.mixer.init_state(batch, **kwargs)

    def step(self, state, x_t: jax.Array):
        """Advance the block by one position: ``x_t (B, H) -> (state, y_t (B, H))``.

        ``state`` comes from :meth:`init_state` or the previous call; ``y_t`` equals the
        eval-mode ``__call__`` output at this position (dropout off, BatchNorm with its running
        statistics; see :meth:`Norm.step`).
        """
        check_steppable(self.mixer, "ResidualBlock.step")
        check_step_input(x_t, self.d_model)
        keep = lambda t: t  # noqa: E731  (no dropout when stepping)
        if self.prenorm:
            state, z = self.mixer.step(state, self.norm.step(x_t))
            x_t = x_t + self._output_map(z, keep)
        else:
            state, z = self.mixer.step(state, x_t)
            x_t = self.norm.step(x_t + self._output_map(z, keep))
        if self.mlp_in is not None:
            if self.prenorm:
                x_t = x_t + self._mlp(self.mlp_norm.step(x_t), keep)
            else:
                x_t = self.mlp_norm.step(x_t + self._mlp(x_t, keep))
        return state, x_t


def sinusoids(t: jax.Array, d_model: int) -> jax.Array:
    """Sinusoidal encodings of positions ``t (...)`` (any integer or float array, traced
    included): ``(..., d_model)`` in float32, as :func:`sinusoidal_positions`."""
    t = jnp.asarray(t).astype(jnp.float32)[..., None]
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = t * freqs
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*angles.shape[:-1], -1)[..., :d_model]


def sinusoidal_positions(length: int, d_model: int) -> jax.Array:
    """Fixed sinusoidal position encodings ``(length, d_model)`` (Transformer): features
    ``2i`` and ``2i + 1`` are ``sin`` and ``cos`` of ``t / 10000^(2i / d_model)``."""
    return sinusoids(jnp.arange(length), d_model)


def pool(x: jax.Array, mask: jax.Array | None, kind: str) -> jax.Array:
    """Pool ``x (B, L, H)`` over the length axis to ``(B, H)``.

    ``"mean"`` averages every position (padding included; for fixed-length inputs);
    ``"masked_mean"`` averages the valid positions of ``mask (B, L)``; ``"last"`` takes the
    last valid position (right padding). Without a mask the latter two are the plain mean and
    position ``L - 1``.
    """
    check_choice("pooling", kind, POOLINGS)
    if kind == "mean" or (kind == "masked_mean" and mask is None):
        return jnp.mean(x, axis=1)
    if kind == "masked_mean":
        weights = mask.astype(x.dtype)[..., None]
        count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return jnp.sum(x * weights, axis=1) / count
    if mask is None:
        return x[:, -1]
    last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class SequenceModel(nnx.Module):
    """Encoder, a stack of residual blocks, pooling and a classification head.

    Input ``x`` is either integer tokens ``(B, L)`` (when ``vocab_size`` is given: a learned
    embedding) or features ``(B, L, d_input)`` (a linear encoder). With ``head="pooled"``
    (default) the output is logits ``(B, n_classes)``, or the pooled features
    ``(B, d_model)`` when ``n_classes`` is None. With ``head="token"`` nothing is pooled: the
    head maps every position, logits ``(B, L, n_classes)`` (next-token prediction with
    causal mixers), or the features ``(B, L, d_model)`` when ``n_classes`` is None.
    Every block uses a fresh mixer ``mixer_factory(d_model, rngs=rngs)``. With pre-norm and
    ``final_norm`` a final norm is applied before pooling (the S4 code's stack); S5's model
    has none (``final_norm=False``). Post-norm stacks never add one.

    Recurrent decoding (causal mixers with ``step``; ``head="token"`` or ``n_classes=None``):
    ``state = model.init_state(B)``, then ``state, out_t = model.step(state, x_t)`` per
    position gives ``out_t``, the eval-mode ``__call__`` output at that position (see the
    module docstring).

    Args:
      mixer_factory: ``factory(d_model, rngs=rngs) -> mixer`` (see module docstring).
      n_layers: number of residual blocks.
      d_model: H, the width of the residual stream.
      n_classes: number of output classes (``head="token"``: the vocabulary of the
        next-token logits), or None for features.
      vocab_size: number of token ids (token input); exactly one of this and ``d_input``.
      d_input: number of input features per position (continuous input).
      pooling: ``"mean"``, ``"masked_mean"`` or ``"last"`` (see :func:`pool`); unused by
        ``head="token"``.
      head: ``"pooled"`` (pool, then classify: ``(B, n_classes)``) or ``"token"``
        (per-position logits ``(B, L, n_classes)``).
      positional: ``"none"`` or ``"sinusoidal"`` (added after the encoder; attention needs
        it, SSMs do not).
      norm, prenorm, activation, glu, dropout, mlp_ratio, norm_momentum: as in
        :class:`ResidualBlock` (``norm_momentum`` also sets the final norm's).
      final_norm: with ``prenorm``, normalise the last block's output before pooling.
      rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        mixer_factory: MixerFactory,
        *,
        n_layers: int,
        d_model: int,
        n_classes: int | None,
        vocab_size: int | None = None,
        d_input: int | None = None,
        pooling: str = "masked_mean",
        positional: str = "none",
        norm: str = "layer",
        prenorm: bool = True,
        activation: str = "gelu",
        glu: str = "full",
        dropout: float = 0.0,
        mlp_ratio: float = 0.0,
        final_norm: bool = True,
        norm_momentum: float = BATCHNORM_MOMENTUM,
        head: str = "pooled",
        rngs: nnx.Rngs,
    ):
        check_positive_int("n_layers", n_layers)
        self.head_kind = check_choice("head", head, HEADS)
        if not isinstance(final_norm, bool):
            raise TypeError(f"final_norm must be a bool; got {final_norm!r}")
        check_momentum(norm_momentum)
        check_positive_int("d_model", d_model)
        check_choice("pooling", pooling, POOLINGS)
        self.positional = check_choice("positional", positional, POSITIONALS)
        if (vocab_size is None) == (d_input is None):
            raise ValueError(
                "give exactly one of vocab_size (token input (B, L)) and d_input "
                f"(feature input (B, L, d_input)); got vocab_size={vocab_size!r}, "
                f"d_input={d_input!r}"
            )
        if n_classes is not None:
            check_positive_int("n_classes", n_classes)
        self.vocab_size = vocab_size
        self.d_input = d_input
        self.pooling = pooling
        self.prenorm = prenorm
        if vocab_size is not None:
            check_positive_int("vocab_size", vocab_size)
            self.encoder = nnx.Embed(vocab_size, d_model, rngs=rngs)
        else:
            check_positive_int("d_input", d_input)
            self.encoder = nnx.Linear(d_input, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [
                ResidualBlock(
                    mixer_factory(d_model, rngs=rngs),
                    d_model,
                    norm=norm,
                    prenorm=prenorm,
                    activation=activation,
                    glu=glu,
                    dropout=dropout,
                    mlp_ratio=mlp_ratio,
                    norm_momentum=norm_momentum,
                    rngs=rngs,
                )
                for _ in range(n_layers)
            ]
        )
        self.final_norm = (
            Norm(d_model, norm, momentum=norm_momentum, rngs=rngs)
            if prenorm and final_norm
            else None
        )
        self.head = nnx.Linear(d_model, n_classes, rngs=rngs) if n_classes is not None else None

    def encode(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Run encoder and blocks: ``x (B, L)`` or ``(B, L, d_input)`` -> ``(B, L, d_model)``.

        ``segment_ids (B, L)``: packed sequences (see :meth:`__call__`)."""
        if self.vocab_size is not None:
            check_ndim("x", x, 2, "(batch, length) integer tokens")
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"token input x must be an integer array; got {x.dtype}")
        else:
            check_ndim("x", x, 3, f"(batch, length, {self.d_input})")
            if x.shape[-1] != self.d_input:
                raise ValueError(f"x must have {self.d_input} input features; got {x.shape}")
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask must have shape {x.shape[:2]} (batch, length); got {mask.shape}"
            )
        if segment_ids is not None:
            segment_ids = check_segment_ids(segment_ids, *x.shape[:2])
        h = self.encoder(x) if self.vocab_size is not None else dense(self.encoder, x)
        if self.positional == "sinusoidal":
            if segment_ids is None:
                h = h + sinusoidal_positions(h.shape[1], h.shape[2]).astype(h.dtype)
            else:  # positions count from 0 in every document
                h = h + sinusoids(positions_in_segment(segment_ids), h.shape[2]).astype(h.dtype)
        for block in self.blocks:
            h = block(h, mask, segment_ids=segment_ids, rngs=rngs)
        if self.final_norm is not None:
            h = self.final_norm(h, mask)
        return h

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Classify ``x``: logits ``(B, n_classes)`` (or pooled features ``(B, d_model)``);
        with ``head="token"``, per-position logits ``(B, L, n_classes)`` (or ``(B, L,
        d_model)`` features).

        ``mask (B, L)`` marks valid positions (right padding); ``rngs`` gives dropout keys.
        ``segment_ids (B, L)`` (integers, equal ids = one document) packs several documents
        in a row: every mixer resets its state where the id changes and sinusoidal positions
        restart, so each document's outputs equal running it alone (eval mode); it needs
        ``head="token"`` (a pooled head would mix the documents) and mixers that take it.
        """
        if segment_ids is not None and self.head_kind != "token":
            raise ValueError(
                "segment_ids (packed sequences) needs head='token': a pooled head would mix "
                "the documents of a row"
            )
        h = self.encode(x, mask, segment_ids=segment_ids, rngs=rngs)
        if self.head_kind == "token":
            return dense(self.head, h) if self.head is not None else h
        h = pool(h, mask, self.pooling)
        return self.head(h) if self.head is not None else h

    def _check_steppable(self):
        if self.head_kind == "pooled" and self.head is not None:
            raise ValueError(
                "SequenceModel.step gives per-position outputs, but this model pools the "
                "sequence before its classification head: use head='token' (per-position "
                "logits) or n_classes=None (per-position features)"
            )
        for block in self.blocks:
            check_steppable(block.mixer, "SequenceModel.step")

    def init_state(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
        """The recurrent state for :meth:`step`: ``{"position": int32 (), "blocks": [state
        of each block]}`` (see :meth:`ResidualBlock.init_state`; ``max_len``, the most
        positions to decode, is needed by attention mixers' KV caches only; ``dtype`` sets
        the state dtype of mixers whose ``init_state`` takes one).

        Raises ``ValueError`` for a model that cannot be stepped: a mixer without ``step``,
        a bidirectional or non-causal mixer, or a pooled classification head.
        """
        check_positive_int("batch", batch)
        self._check_steppable()
        return {
            "position": jnp.zeros((), jnp.int32),
            "blocks": [block.init_state(batch, max_len, dtype) for block in self.blocks],
        }

    def step(self, state: dict, x_t: jax.Array) -> tuple[dict, jax.Array]:
        """Decode one position: ``x_t`` integer tokens ``(B,)`` (``vocab_size``) or features
        ``(B, d_input)`` -> ``(state, out_t)``.

        ``out_t`` is ``(B, n_classes)`` logits (``head="token"``) or ``(B, d_model)``
        features (``n_classes=None``): the eval-mode ``__call__`` output at this position.
        ``state`` (from :meth:`init_state` or the previous call) carries every block's state
        and the position index (for ``positional="sinusoidal"``); it is a pytree of arrays of
        fixed shapes and dtypes, so a ``jax.lax.scan`` over positions can carry it.
        """
        self._check_steppable()
        if not (isinstance(state, dict) and set(state) == {"position", "blocks"}):
            raise ValueError(
                "state must be the dict {'position', 'blocks'} from SequenceModel.init_state; "
                f"got {type(state).__name__}"
            )
        if len(state["blocks"]) != len(self.blocks):
            raise ValueError(
                f"state holds {len(state['blocks'])} block states; the model has "
                f"{len(self.blocks)} blocks"
            )
        if self.vocab_size is not None:
            check_ndim("x_t", x_t, 1, "(batch,) integer tokens")
            if not jnp.issubdtype(x_t.dtype, jnp.integer):
                raise TypeError(f"token input x_t must be an integer array; got {x_t.dtype}")
            h = self.encoder(x_t)
        else:
            check_step_input(x_t, self.d_input)
            h = dense(self.encoder, x_t)
        position = state["position"]
        if self.positional == "sinusoidal":
            h = h + sinusoids(position, h.shape[-1]).astype(h.dtype)
        block_states = []
        for block, block_state in zip(self.blocks, state["blocks"], strict=True):
            block_state, h = block.step(block_state, h)
            block_states.append(block_state)
        if self.final_norm is not None:
            h = self.final_norm.step(h)
        out = self.head(h) if self.head is not None else h
        return {"position": position + 1, "blocks": block_states}, out


class RetrievalModel(nnx.Module):
    """Siamese document matching: ``(x1, x2) -> logits (B, n_classes)``.

    One shared :class:`SequenceModel` encoder (no head) maps each input to pooled features
    u, v ``(B, d_model)``; both inputs run as one batch of 2B (BatchNorm statistics cover
    both). ``[u, v, u - v, u * v]`` ``(B, 4·d_model)`` goes through an MLP: linear to
    ``mlp_dim``, activation, linear to ``n_classes``. Remaining keyword arguments (n_layers,
    d_model, vocab_size or d_input, pooling, norm, final_norm, norm_momentum, ...) configure
    the encoder as in :class:`SequenceModel`.
    """

    def __init__(
        self,
        mixer_factory: MixerFactory,
        *,
        n_classes: int,
        d_model: int,
        mlp_dim: int | None = None,
        rngs: nnx.Rngs,
        **encoder_kwargs,
    ):
        check_positive_int("n_classes", n_classes)
        if encoder_kwargs.get("head", "pooled") != "pooled":
            raise ValueError(
                "RetrievalModel pools each input: its encoder needs head='pooled'; got "
                f"head={encoder_kwargs['head']!r}"
            )
        mlp_dim = d_model if mlp_dim is None else check_positive_int("mlp_dim", mlp_dim)
        self.activation = check_choice(
            "activation", encoder_kwargs.get("activation", "gelu"), ACTIVATIONS
        )
        self.encoder = SequenceModel(
            mixer_factory, d_model=d_model, n_classes=None, rngs=rngs, **encoder_kwargs
        )
        self.mlp_in = nnx.Linear(4 * d_model, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, n_classes, rngs=rngs)

    def __call__(
        self,
        x1: jax.Array,
        x2: jax.Array,
        mask1: jax.Array | None = None,
        mask2: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Classify the pair ``x1, x2`` (each ``(B, L)`` tokens or ``(B, L, d_input)``).

        The two inputs must share their shape (pad the shorter); ``mask1``, ``mask2`` are
        ``(B, L)`` (both or neither). Returns logits ``(B, n_classes)``.
        """
        if x1.shape != x2.shape:
            raise ValueError(
                f"x1 and x2 must have the same shape (pad the shorter); got {x1.shape}, {x2.shape}"
            )
        if (mask1 is None) != (mask2 is None):
            raise ValueError("give both mask1 and mask2 or neither")
        mask = None if mask1 is None else jnp.concatenate([mask1, mask2], axis=0)
        feats = self.encoder(jnp.concatenate([x1, x2], axis=0), mask, rngs=rngs)
        u, v = jnp.split(feats, 2, axis=0)
        h = jnp.concatenate([u, v, u - v, u * v], axis=-1)
        return self.mlp_out(_ACTIVATION_FNS[self.activation](self.mlp_in(h)))
