"""Attention mixers (Flax NNX): softmax, Kronecker (KAO) and tensor / 2-simplicial attention.

All three take ``x (B, L, features)`` and an optional boolean ``mask (B, L)`` (True = valid,
right padding) and return ``(B, L, features)``: linear projections to heads, the mixing kernel
from :mod:`ssmix.kernels.attention`, a linear output projection. Padded positions never
influence valid outputs: their inputs are replaced by zeros on entry (``jnp.where``, so even a
NaN or inf stored there reaches no valid output and no parameter gradient), and the kernels
give masked keys zero weight. Input rule: :func:`ssmix._checks.check_sequence_input` (floating
``x``, boolean mask, ``L ≥ 1``); the choices (``method``, ``variant``) are checked again at
call time, so a bad value assigned after construction fails clearly. ``materialize(x,
mask=None)`` returns the per-head mixing weights (the matrix M of ``y = M v`` before the output
projection) for inspection and testing.

Precision: every layer returns its input's dtype. The projections promote a low-precision
input (bfloat16, float16) to the float32 parameters, the kernels compute in float32 or wider,
and the output is cast back; a float64 input computes (and returns) float64.

Recurrent decoding: causal :class:`Attention` keeps a KV cache,
``state = layer.init_state(B, max_len)`` then ``state, y_t = layer.step(state, x_t)``, equal
to the causal forward pass position by position.

Packed sequences: :class:`Attention` (causal or not) also takes ``segment_ids (B, L)``
(integers; a contiguous run of equal ids is one document): a position attends only to
positions of its own document, so each document's outputs equal running it alone.
:class:`KroneckerAttention` and :class:`TensorAttention` do not take it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix._checks import check_choice, check_positive_int, check_sequence_input
from ssmix.kernels.attention import (
    KAO_VARIANTS,
    TENSOR_METHODS,
    kao,
    kao_mixing_matrix,
    softmax_attention,
    softmax_attention_weights,
    softmax_block_size,
    tensor_attention,
    tensor_attention_weights,
)
from ssmix.layers.base import check_step_input

__all__ = ["Attention", "KroneckerAttention", "TensorAttention"]


def _head_dim(features: int, num_heads: int, head_dim: int | None) -> int:
    check_positive_int("features", features)
    check_positive_int("num_heads", num_heads)
    if head_dim is None:
        if features % num_heads:
            raise ValueError(
                f"features ({features}) must be divisible by num_heads ({num_heads}) when "
                "head_dim is not given"
            )
        return features // num_heads
    return check_positive_int("head_dim", head_dim)


def _checked_input(x: jax.Array, features: int, mask: jax.Array | None) -> jax.Array:
    """Validate ``x (B, L, features)`` and ``mask`` (:func:`ssmix._checks.check_sequence_input`)
    and return ``x`` with padded positions replaced by zeros.

    ``jnp.where``, not a product with the mask: a NaN or inf at a padded position must not
    reach a valid output (``0 · NaN`` is NaN) nor a parameter gradient (the input projection's
    weight gradient sums ``x_t ⊗ cotangent_t`` over every position, padded ones included).
    """
    check_sequence_input(x, mask, features, features_name="features")
    if mask is None:
        return x
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


class _Projected(nnx.Module):
    """Shared plumbing: one input projection to ``parts`` per-head tensors, one output."""

    def __init__(self, features, num_heads, head_dim, parts, use_bias, rngs):
        self.features = features
        self.num_heads = num_heads
        self.head_dim = _head_dim(features, num_heads, head_dim)
        self.parts = parts
        width = num_heads * self.head_dim
        self.in_proj = nnx.Linear(features, parts * width, use_bias=use_bias, rngs=rngs)
        self.out_proj = nnx.Linear(width, features, use_bias=use_bias, rngs=rngs)

    def _project(self, x: jax.Array) -> list[jax.Array]:
        """``(B, L, features) -> parts × (B, L, heads, head_dim)``."""
        y = self.in_proj(x)
        y = y.reshape(x.shape[:2] + (self.parts, self.num_heads, self.head_dim))
        return [y[:, :, i] for i in range(self.parts)]

    def _output(self, y: jax.Array, dtype) -> jax.Array:
        """``(B, L, heads, head_dim) -> (B, L, features)`` in ``dtype`` (the input's)."""
        return self.out_proj(y.reshape(y.shape[:2] + (-1,))).astype(dtype)


class Attention(_Projected):
    """Multi-head softmax attention, the baseline mixer: ``(B, L, features) -> (B, L, features)``.

    Args:
      features: model width.
      num_heads: number of heads; ``head_dim`` defaults to ``features // num_heads``.
      causal: position t attends to positions s ≤ t.
      block_size: an integer uses the blocked online-softmax kernel over key blocks of that
        size (O(L·(head_dim + block_size)) memory, same result). None (default) follows the
        backend's rule, :func:`~ssmix.kernels.attention.softmax_block_size`, decided when the
        call is traced: on CPU the L × L weights per head are materialized (the CPU default,
        as before); on GPU/TPU they are too while the ``(B, heads, L, L)`` scores fit in
        256 MiB, and beyond that the blocked kernel runs with the largest block whose
        ``(B, heads, L, block)`` tile fits (B = 2, L = 16384: block 2048, 16 loop steps
        forward + backward, instead of 2 GiB of scores).
      use_bias: biases in the projections.
      rngs: ``nnx.Rngs`` for the initialisation.

    ``mask (B, L)`` bool marks valid keys; padded keys get zero weight. ``segment_ids
    (B, L)`` integers pack several documents in one row (see :meth:`__call__`).
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int = 1,
        head_dim: int | None = None,
        causal: bool = False,
        block_size: int | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        super().__init__(features, num_heads, head_dim, 3, use_bias, rngs)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        self.causal = bool(causal)
        self.block_size = block_size

    def _qkv(self, x):
        return [jnp.swapaxes(t, 1, 2) for t in self._project(x)]  # (B, H, L, dh)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``x (B, L, features)``, ``mask (B, L)`` bool or None -> ``(B, L, features)``.

        ``segment_ids (B, L)`` integer or None: packed sequences. A segment is a contiguous
        run of equal ids (an id repeated after a different one starts a new segment);
        position t attends to position s only when both lie in the same segment (and, when
        causal, s ≤ t; and s is valid under ``mask``). Each segment's outputs then equal those
        of the segment run alone, in every form (materialized or blocked). ``TypeError`` for
        non-integer ids, ``ValueError`` for another shape.
        """
        q, k, v = self._qkv(_checked_input(x, self.features, mask))
        block_size = self.block_size
        if block_size is None:
            b, h, n, _ = q.shape
            block_size = softmax_block_size(b, h, n, n, dtype=jnp.result_type(q, jnp.float32))
        y = softmax_attention(
            q,
            k,
            v,
            causal=self.causal,
            mask=mask,
            block_size=block_size,
            segment_ids=segment_ids,
        )
        return self._output(jnp.swapaxes(y, 1, 2), x.dtype)

    def materialize(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The attention weights per head, ``(B, heads, L, L)``: head h mixes ``v_h`` by them.

        ``x (B, L, features)``, ``mask (B, L)`` bool, ``segment_ids (B, L)`` integer (as in
        :meth:`__call__`: weights between different segments are exactly 0).
        """
        q, k, _ = self._qkv(_checked_input(x, self.features, mask))
        return softmax_attention_weights(
            q, k, causal=self.causal, mask=mask, segment_ids=segment_ids
        )

    def _check_causal(self):
        if not self.causal:
            raise ValueError(
                "Attention(causal=False) attends to future positions, so it has no recurrent "
                "form: construct it with causal=True to use init_state/step"
            )

    def init_state(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache for :meth:`step`: ``{"k", "v": (batch, heads, max_len,
        head_dim), "position": int32 ()}``.

        ``max_len`` is the most positions :meth:`step` will be called for; ``dtype`` of the
        cache defaults to the projections' parameter dtype (float32, or float64 for a model
        cast to float64). Raises ``ValueError`` for a non-causal layer.

        The cache holds one document per row (no ``segment_ids``): to decode a new document,
        start again from a fresh ``init_state``.
        """
        self._check_causal()
        check_positive_int("batch", batch)
        check_positive_int("max_len", max_len)
        dtype = self.in_proj.kernel.dtype if dtype is None else jnp.dtype(dtype)
        shape = (batch, self.num_heads, max_len, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "position": jnp.zeros((), jnp.int32),
        }

    def _check_state(self, state, batch: int):
        if not (isinstance(state, dict) and set(state) == {"k", "v", "position"}):
            raise ValueError(
                "state must be the KV cache dict {'k', 'v', 'position'} from "
                f"Attention.init_state; got {type(state).__name__}"
            )
        k_shape = tuple(getattr(state["k"], "shape", ()))
        max_len = k_shape[2] if len(k_shape) == 4 else "max_len"
        expected = (batch, self.num_heads, max_len, self.head_dim)
        for name in ("k", "v"):
            got = tuple(getattr(state[name], "shape", ()))
            if got != expected:
                raise ValueError(
                    f"state[{name!r}] must have shape (B, heads, max_len, head_dim) = "
                    f"{expected}; got {got}"
                )

    def step(self, state: dict, x_t: jax.Array) -> tuple[dict, jax.Array]:
        """One position of causal attention: ``x_t (B, features) -> (state, y_t (B,
        features))``.

        The new key and value are written into the cache at ``state["position"]`` and the
        query attends to cache positions ``0 … position``: ``y_t`` equals the causal
        ``__call__`` output at that position. A full cache (``position == max_len``) raises
        ``ValueError`` when the position is concrete; under ``jit`` (traced position) the
        output is NaN instead, so an overflow never passes silently.

        Decoding takes no ``segment_ids``: every cached position belongs to the current
        document; a new document starts from a fresh :meth:`init_state`.
        """
        self._check_causal()
        check_step_input(x_t, self.features)
        self._check_state(state, x_t.shape[0])
        k_cache, v_cache, pos = state["k"], state["v"], state["position"]
        max_len = k_cache.shape[2]
        if not isinstance(pos, jax.core.Tracer) and int(pos) >= max_len:
            raise ValueError(
                f"the KV cache is full: it holds max_len={max_len} positions and "
                f"{int(pos)} were stepped; start from init_state(batch, max_len) with a "
                "larger max_len"
            )
        q, k, v = (t[:, 0] for t in self._project(x_t[:, None]))  # (B, heads, dh) each
        k_cache = jax.lax.dynamic_update_slice_in_dim(
            k_cache, k[:, :, None].astype(k_cache.dtype), pos, axis=2
        )
        v_cache = jax.lax.dynamic_update_slice_in_dim(
            v_cache, v[:, :, None].astype(v_cache.dtype), pos, axis=2
        )
        dtype = jnp.result_type(q, k_cache, jnp.float32)
        scale = 1.0 / math.sqrt(self.head_dim)
        s = jnp.einsum("bhd,bhkd->bhk", q.astype(dtype) * scale, k_cache.astype(dtype))
        valid = jnp.arange(max_len) <= pos
        s = jnp.where(valid, s, -jnp.inf)
        w = jax.nn.softmax(s, axis=-1)
        y = jnp.einsum("bhk,bhkd->bhd", w, v_cache.astype(dtype))
        y = jnp.where(pos < max_len, y, jnp.nan)
        y = self._output(y[:, None], x_t.dtype)[:, 0]
        return {"k": k_cache, "v": v_cache, "position": pos + 1}, y


class KroneckerAttention(_Projected):
    """Kronecker attention (KAO) over a flattened image or video grid.

    Takes ``x (B, L, features)`` with ``L = prod(grid)`` positions in row-major order of
    ``grid = (h, w)`` or ``(t, h, w)`` (fixed at construction) and returns
    ``(B, L, features)``. Queries, keys and values are per-position projections; keys and
    values are then reduced to their per-mode means (h + w, or t + h + w summary vectors), see
    :func:`ssmix.kernels.attention.kao`.

    Args:
      features: model width.
      grid: the spatial shape, ``(h, w)`` or ``(t, h, w)``.
      variant: ``"kv"`` (every position queries the summaries, O(L·(h + w)·features)) or
        ``"qkv"`` (summaries query summaries, outputs are spread back along rows and columns,
        O((h + w)²·features)).
      num_heads, head_dim, use_bias, rngs: as in :class:`Attention`.

    ``mask (B, L)`` bool: the means run over valid positions only and masked positions output
    the output projection's bias, so padding never influences valid outputs. On a full image
    grid a mask is rarely meaningful; it is supported for right-padded batches of flattened
    images.
    """

    def __init__(
        self,
        features: int,
        grid: tuple[int, ...],
        *,
        variant: str = "kv",
        num_heads: int = 1,
        head_dim: int | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        check_choice("variant", variant, KAO_VARIANTS)
        if not (isinstance(grid, (tuple, list)) and len(grid) in (2, 3)):
            raise ValueError(f"grid must be (h, w) or (t, h, w); got {grid!r}")
        self.grid = tuple(check_positive_int("grid entry", g) for g in grid)
        self.variant = variant
        super().__init__(features, num_heads, head_dim, 3, use_bias, rngs)

    def _grid_qkv(self, x, mask):
        check_choice("variant", self.variant, KAO_VARIANTS)
        x = _checked_input(x, self.features, mask)
        if x.shape[1] != math.prod(self.grid):
            raise ValueError(
                f"x has length {x.shape[1]} but the grid {self.grid} has "
                f"{math.prod(self.grid)} positions"
            )
        shape = (x.shape[0],) + self.grid + (self.num_heads * self.head_dim,)
        q, k, v = (t.reshape(shape) for t in self._project(x))
        gmask = None if mask is None else mask.reshape((x.shape[0],) + self.grid)
        return q, k, v, gmask

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x (B, L, features)``, ``mask (B, L)`` bool or None -> ``(B, L, features)``."""
        q, k, v, gmask = self._grid_qkv(x, mask)
        y = kao(q, variant=self.variant, num_heads=self.num_heads, keys=k, values=v, mask=gmask)
        return self._output(y.reshape(x.shape[:2] + (self.num_heads, self.head_dim)), x.dtype)

    def materialize(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The KAO mixing matrix per head, ``(B, heads, L, L)``: head h outputs ``M_h v_h``."""
        q, k, _, gmask = self._grid_qkv(x, mask)
        return kao_mixing_matrix(
            q, variant=self.variant, num_heads=self.num_heads, keys=k, mask=gmask
        )


class TensorAttention(_Projected):
    """Tensor (triple-wise) or 2-simplicial attention: ``(B, L, features) -> (B, L, features)``.

    Five per-head projections give q, k1, k2, v1, v2; every query attends to all key pairs
    (i, j) with one softmax over pairs (:func:`ssmix.kernels.attention.tensor_attention`).

    Args:
      features: model width.
      num_heads, head_dim, use_bias, rngs: as in :class:`Attention`.
      method: ``"naive"`` (O(L³) memory, reference), ``"blocked"`` (exact, low memory),
        ``"simplicial"`` (causal windows ``w1``, ``w2``, O(L·w1·w2)) or ``"approx"`` (Taylor
        features of even ``degree``, accurate for bounded scores only, hence bounded scores
        by default, see below; cost grows as C(head_dim + degree, degree)).
      causal: pairs with i, j ≤ t only. None means the method's natural choice: True for
        ``"simplicial"`` (which is always causal), False otherwise.
      w1, w2: causal windows (``t − w1 < i``, ``t − w2 < j``); None is unbounded.
      degree: Taylor degree of ``"approx"``.
      block_size: kernel block size (``"blocked"``: int or (bi, bj); ``"simplicial"``: int,
        window offsets per step; ``"approx"``: int, positions per chunk). None: the backend's
        default (:func:`ssmix.kernels.attention.tensor_attention`): on CPU the measured
        blocks; on GPU/TPU blocks sized so that no per-step array exceeds 256 MiB.
      bounded_scores: keep every score within ``[−score_bound, score_bound]`` by construction
        (below). None (default): True for ``"approx"``, False for the exact methods. With
        False, ``"approx"`` is accurate only while the raw scores stay small (e.g. head
        dimension 8 and entries of q, k1, k2 within [−½, ½]) and nothing keeps them there.
      score_bound: ``ρ > 0``, the largest score magnitude when ``bounded_scores``.

    Bounded scores: q, k1 and k2 are L2-normalised per position and head
    (``q̂ = q / √(‖q‖² + 1e-12)``, so ``‖q̂‖ < 1``) and scaled by ``ρ`` instead of 1/√d, so
    every score ``x = ρ·Σ_k q̂_k k̂1_k k̂2_k`` satisfies
    ``|x| ≤ ρ·‖q̂‖₂·‖k̂1‖₂·‖k̂2‖_∞ ≤ ρ`` for any input, however large. The approximation
    theory of this method assumes bounded entries (Alman & Song 2023: o(∛log n)); here the
    bound
    holds by construction, and the error bound of
    :func:`ssmix.kernels.attention.tensor_attention_error_bound` becomes, with
    ``ε = ρ^(p+1)·e^ρ/(p+1)!``: every mixer output of channel c (before the output projection)
    is within ``2ε/(1 − ε)·max_i|v1_ic|·max_j|v2_jc|`` of exact tensor attention on the same
    normalised q, k1, k2 (:meth:`approx_error_factor` returns ``2ε/(1 − ε)``: 0.046 at ρ = 1,
    p = 4; 1.1e-3 at ρ = 1, p = 6; 8.6e-4 at ρ = ½, p = 4; the error measured at ρ = 1,
    p = 4 is 3e-4 of the largest output, at every input scale). The price: the softmax over pairs
    can favour one pair over another by at most ``e^(2ρ)``; raise ``score_bound`` together
    with ``degree`` to sharpen it. ``method="naive"`` with ``bounded_scores=True`` is the
    exact counterpart of the default ``"approx"`` layer (the same function without the
    Taylor error).

    ``mask (B, L)`` bool: a pair is valid when both keys are valid; queries without a valid
    pair output the output projection's bias. Padded positions are replaced by zeros before
    the projections (``jnp.where``), so no value there, NaN or inf included, reaches a valid
    output or a parameter gradient.
    """

    METHODS = TENSOR_METHODS

    def __init__(
        self,
        features: int,
        *,
        num_heads: int = 1,
        head_dim: int | None = None,
        method: str = "blocked",
        causal: bool | None = None,
        w1: int | None = None,
        w2: int | None = None,
        degree: int = 4,
        block_size: int | tuple[int, int] | None = None,
        bounded_scores: bool | None = None,
        score_bound: float = 1.0,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        check_choice("method", method, TENSOR_METHODS)
        if causal is None:
            causal = method == "simplicial"
        if method == "simplicial" and not causal:
            raise ValueError("method='simplicial' is causal by definition; use causal=True")
        for name, w in (("w1", w1), ("w2", w2)):
            if w is not None:
                check_positive_int(name, w)
                if not causal:
                    raise ValueError(f"{name} (a causal window) needs causal=True")
        if method == "approx" and (w1 is not None or w2 is not None):
            raise ValueError("method='approx' does not support windows w1, w2")
        check_positive_int("degree", degree)
        if method == "approx" and degree % 2:
            raise ValueError(
                f"degree must be even (keeps the approximate softmax normaliser positive); "
                f"got {degree}"
            )
        if (
            isinstance(score_bound, bool)
            or not isinstance(score_bound, (int, float))
            or not 0 < score_bound < math.inf
        ):
            raise ValueError(f"score_bound must be a positive finite number; got {score_bound!r}")
        super().__init__(features, num_heads, head_dim, 5, use_bias, rngs)
        self.method = method
        self.causal = bool(causal)
        self.w1, self.w2 = w1, w2
        self.degree = degree
        self.block_size = block_size
        self.bounded_scores = method == "approx" if bounded_scores is None else bool(bounded_scores)
        self.score_bound = float(score_bound)

    def approx_error_factor(self) -> float:
        """``2ε/(1 − ε)`` with ``ε = ρ^(p+1)·e^ρ/(p+1)!`` (``ρ = score_bound``, ``p = degree``):
        with ``bounded_scores``, every mixer output of channel c of ``method="approx"`` is
        within this factor times ``max_i|v1_ic|·max_j|v2_jc|`` of the exact one; ``inf`` when
        ``ε ≥ 1`` or without ``bounded_scores`` (no bound holds for arbitrary inputs)."""
        if not self.bounded_scores:
            return math.inf
        r, p = self.score_bound, self.degree
        eps = r ** (p + 1) * math.exp(r) / math.factorial(p + 1)
        return 2 * eps / (1 - eps) if eps < 1 else math.inf

    def _fold(self, x, mask):
        """Project and fold heads into the batch: five ``(B·H, L, dh)``, the mask and the
        score scale (None: the kernel's 1/√dh)."""
        check_choice("method", self.method, TENSOR_METHODS)
        b, n = x.shape[:2]
        parts = [
            jnp.swapaxes(t, 1, 2).reshape(b * self.num_heads, n, self.head_dim)
            for t in self._project(_checked_input(x, self.features, mask))
        ]
        scale = None
        if self.bounded_scores:
            unit = lambda t: t * jax.lax.rsqrt(jnp.sum(t * t, -1, keepdims=True) + 1e-12)  # noqa: E731
            parts[:3] = [unit(t) for t in parts[:3]]
            scale = self.score_bound
        fmask = None if mask is None else jnp.repeat(mask, self.num_heads, axis=0)
        return parts, fmask, scale

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x (B, L, features)``, ``mask (B, L)`` bool or None -> ``(B, L, features)``."""
        (q, k1, k2, v1, v2), fmask, scale = self._fold(x, mask)
        y = tensor_attention(
            q,
            k1,
            k2,
            v1,
            v2,
            method=self.method,
            scale=scale,
            causal=self.causal,
            mask=fmask,
            w1=self.w1,
            w2=self.w2,
            degree=self.degree,
            block_size=self.block_size,
        )
        b, n = x.shape[:2]
        y = jnp.swapaxes(y.reshape(b, self.num_heads, n, self.head_dim), 1, 2)
        return self._output(y, x.dtype)

    def materialize(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The exact n × n² weights per head, ``(B, heads, L, L, L)`` (small L only).

        Head h outputs ``Σ_{i,j} W[:, h, t, i, j] · v1_h[i] ∘ v2_h[j]``; with ``"approx"`` this
        is the exact tensor the method approximates (bounded scores included).
        """
        (q, k1, k2, _, _), fmask, scale = self._fold(x, mask)
        w = tensor_attention_weights(
            q, k1, k2, scale=scale, causal=self.causal, mask=fmask, w1=self.w1, w2=self.w2
        )
        b, n = x.shape[:2]
        return w.reshape((b, self.num_heads) + w.shape[1:])
