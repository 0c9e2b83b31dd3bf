"""The ``"pallas"`` form of :func:`ssmix.kernels.scan.linear_scan`: the whole recurrence in one
fused kernel, the state kept on chip (the shape of recurrentgemma's Pallas linear scan).

The state axes ``S`` are flattened to ``N`` features and laid out as ``(G, W)`` lanes: every
kernel instance owns one batch row and one tile of features and walks the time axis itself,
so ``b``, ``a`` and the states are read and written exactly once and nothing of size ``L`` is
ever materialised beyond the output. Complex recurrences are carried as real / imaginary pairs
(Pallas has no complex type): ``x = a ⊙ h + b`` becomes two real multiply-adds per part.

Two variants, chosen by :func:`ssmix.kernels.scan.linear_scan` at trace time from
:func:`ssmix.auto_backend` (and part of its jit cache key):

- **TPU (Mosaic)**, also the CPU interpret variant: features padded to lanes of ``W = 128``
  and tiles of ``(8, 128)`` (``(G, 128)`` when ``G < 8``), the last two block dimensions, so
  one time step of a tile is one vector register. The grid is ``(B, G/8, L/T)``: the first two
  axes ``"parallel"``, the time axis ``"arbitrary"`` (sequential), each step a block of ``T``
  time steps (``chunk_size``, default :data:`DEFAULT_BLOCK`; the length is padded to a
  multiple, on the side walked last so the padding never reaches a real state). The carry
  lives in a VMEM scratch across the time blocks.
- **GPU (Triton)**: grid blocks run concurrently there, so no carry can pass between them.
  The grid is ``(B, N/W)`` with ``W = min(32, next power of 2 ≥ N)`` lanes per instance (one
  warp, one lane per thread: every step loads 128 contiguous bytes per array, and the
  ``B·N/32`` instances spread the latency-bound walk over many SMs), the block spans the
  whole length, and one ``fori_loop`` inside the kernel walks it, the carry in registers (as
  recurrentgemma does on GPU). Triton is selected with ``pallas.triton.CompilerParams``: the
  default Mosaic GPU lowering copies whole blocks into shared memory, which a length-long
  block does not fit. The lane and warp counts are a reasoned choice, not a measured one.

``reverse=True`` walks the time blocks and the steps inside them backwards (the block
index map is reversed), so nothing is flipped in memory. The backward pass is the generic
one of :mod:`ssmix.kernels.scan` (the same kernel run the other way on the cotangent with the
decay shifted by one step, and the decay gradient as an elementwise product and reduction).

``interpret=True`` runs the kernel through Pallas's interpreter (how it is tested on CPU);
float64 works there, the compiled kernels take float32 (TPU has no float64).

Memory: the kernel reads its inputs in the ``(…, G, W)`` lane layout, a free reshape when
``N`` is a multiple of the lanes and ``L`` of the time block; otherwise ``b`` (and a
time-varying ``a``) are padded copies. A time-varying decay broadcast along state axes (e.g.
``(1, L, H, 1)`` for ``S = (H, P)``) is materialised at the full ``(B|1, L, *S)``, and complex
inputs are split into real / imaginary copies. The states are written once, in the lane
layout, and sliced back.

Not yet measured on a device: ``method="auto"`` never picks this form.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

#: Time steps per grid block of the TPU / interpret variant when ``chunk_size`` is None.
DEFAULT_BLOCK = 64

#: Lane width (last block dimension) and sublane tile (second to last) of the TPU variant.
LANES, SUBLANES = 128, 8

#: Lanes per kernel instance of the GPU variant (one warp).
GPU_LANES = 32


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _layout(N: int, gpu: bool):
    """``(W, G, d)``: lanes per row, rows of padded features, rows per tile."""
    if gpu:
        W = min(GPU_LANES, _next_pow2(N))
        return W, -(-N // W), 1
    G = -(-N // LANES)
    if G > SUBLANES:
        G = -(-G // SUBLANES) * SUBLANES
    return LANES, G, min(G, SUBLANES)


def _split(x):
    """Real / imaginary parts of ``x`` (one part when real)."""
    return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def _kernel(*refs, n_parts, time_varying, has_h0, has_extra, reverse, T, carry_scratch):
    """One (batch row, feature tile) instance over ``T`` time steps of its time block."""
    it = iter(refs)
    a_refs = [next(it) for _ in range(n_parts)]
    b_refs = [next(it) for _ in range(n_parts)]
    h0_refs = [next(it) for _ in range(n_parts)] if has_h0 else None
    e_refs = [next(it) for _ in range(n_parts)] if has_extra else None
    out_refs = [next(it) for _ in range(n_parts)]
    scratch = [next(it) for _ in range(n_parts)] if carry_scratch else None
    s = pl.program_id(2) if carry_scratch else 0

    def initial():
        if has_h0:
            return tuple(r[...].astype(o.dtype) for r, o in zip(h0_refs, out_refs, strict=True))
        return tuple(jnp.zeros(o.shape[1:], o.dtype) for o in out_refs)

    if carry_scratch:

        @pl.when(s == 0)
        def _():
            for ref, value in zip(scratch, initial(), strict=True):
                ref[...] = value

        h = tuple(ref[...] for ref in scratch)
    else:
        h = initial()
    a_const = None if time_varying else tuple(r[...] for r in a_refs)

    def body(i, h):
        t = T - 1 - i if reverse else i
        a_t = tuple(r[t] for r in a_refs) if time_varying else a_const
        b_t = tuple(r[t] for r in b_refs)
        if has_extra:
            # The injected term enters with the first input consumed by the whole scan.
            first = jnp.logical_and(s == 0, i == 0)
            b_t = tuple(b + jnp.where(first, e[...], 0) for b, e in zip(b_t, e_refs, strict=True))
        if n_parts == 1:
            x = (a_t[0] * h[0] + b_t[0],)
        else:
            (ar, ai), (hr, hi), (br, bi) = a_t, h, b_t
            x = (ar * hr - ai * hi + br, ar * hi + ai * hr + bi)
        for ref, value in zip(out_refs, x, strict=True):
            ref[t] = value
        return x

    h = lax.fori_loop(0, T, body, h)
    if carry_scratch:
        for ref, value in zip(scratch, h, strict=True):
            ref[...] = value


def pallas_scan(
    a, b, x0, reverse, time_varying, T=None, extra=None, variant="tpu", interpret=False
):
    """States ``(B, L, *S)`` and final state ``(B, *S)`` by the fused kernel (promoted inputs;
    ``x0`` may be None; ``extra`` is added to the first input consumed; ``T`` the time block
    of the TPU variant; ``variant`` ``"tpu"`` or ``"gpu"``, module docstring)."""
    if variant not in ("tpu", "gpu"):
        raise ValueError(f"variant must be 'tpu' or 'gpu'; got {variant!r}")
    B, L = b.shape[:2]
    S = b.shape[2:]
    N = math.prod(S)
    dtype = b.dtype
    complex_ = any(jnp.iscomplexobj(x) for x in (a, b, x0, extra) if x is not None)
    n_parts = 2 if complex_ else 1
    if complex_ and not jnp.iscomplexobj(b):
        b = b.astype(jnp.result_type(b, 1j))
        dtype = b.dtype
    part_dtype = jnp.finfo(dtype).dtype
    gpu = variant == "gpu"
    W, G, d = _layout(N, gpu)
    if gpu:
        T, n_t, Lp = L, 1, L
    else:
        T = min(DEFAULT_BLOCK if T is None else T, L)
        n_t = -(-L // T)
        Lp = n_t * T
    # Padding: features at the end; time on the side walked last (never reaching real states).
    t_pad = (Lp - L, 0) if reverse else (0, Lp - L)

    def lanes(x, lead, time):
        """``x (*lead, [L,] N)`` -> parts of shape ``(*lead, [Lp,] G, W)``."""
        x = x.reshape(*lead, *((x.shape[len(lead)],) if time else ()), N)
        pads = [(0, 0)] * len(lead) + ([t_pad] if time else []) + [(0, G * W - N)]
        x = jnp.pad(x, pads) if any(p != (0, 0) for p in pads) else x
        x = x.reshape(*x.shape[:-1], G, W)
        return [p.astype(part_dtype) for p in _split(x.astype(dtype))]

    if time_varying:
        Ba = a.shape[0]
        a_full = jnp.broadcast_to(a, (Ba, L, *S))
        a_parts = lanes(a_full, (Ba,), True)
    else:
        Ba = 1
        a_parts = lanes(jnp.broadcast_to(a, S), (), False)
    b_parts = lanes(b, (B,), True)
    inputs = a_parts + b_parts
    if x0 is not None:
        inputs += lanes(x0, (B,), False)
    if extra is not None:
        inputs += lanes(extra, (B,), False)

    def t_index(s):
        return n_t - 1 - s if reverse else s

    if gpu:
        grid = (B, G)
        seq = lambda i, g: (i, 0, g, 0)  # noqa: E731
        seq_a = lambda i, g: (i if Ba > 1 else 0, 0, g, 0)  # noqa: E731
        row = lambda i, g: (i, g, 0)  # noqa: E731
        const = lambda i, g: (g, 0)  # noqa: E731
    else:
        grid = (B, G // d, n_t)
        seq = lambda i, g, s: (i, t_index(s), g, 0)  # noqa: E731
        seq_a = lambda i, g, s: (i if Ba > 1 else 0, t_index(s), g, 0)  # noqa: E731
        row = lambda i, g, s: (i, g, 0)  # noqa: E731
        const = lambda i, g, s: (g, 0)  # noqa: E731
    seq_spec = pl.BlockSpec((None, T, d, W), seq)
    row_spec = pl.BlockSpec((None, d, W), row)
    if time_varying:
        a_spec = pl.BlockSpec((None, T, d, W), seq_a)
    else:
        a_spec = pl.BlockSpec((d, W), const)
    in_specs = [a_spec] * n_parts + [seq_spec] * n_parts
    in_specs += [row_spec] * n_parts * ((x0 is not None) + (extra is not None))
    out_shape = [jax.ShapeDtypeStruct((B, Lp, G, W), part_dtype)] * n_parts

    kernel = functools.partial(
        _kernel,
        n_parts=n_parts,
        time_varying=time_varying,
        has_h0=x0 is not None,
        has_extra=extra is not None,
        reverse=reverse,
        T=T,
        carry_scratch=not gpu,
    )
    if gpu:
        from jax.experimental.pallas import triton as plt

        extra_args = dict(compiler_params=plt.CompilerParams(num_warps=1))
    else:
        from jax.experimental.pallas import tpu as pltpu

        extra_args = dict(
            scratch_shapes=[pltpu.VMEM((d, W), part_dtype)] * n_parts,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
        )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=[seq_spec] * n_parts,
        interpret=interpret,
        name="ssmix_linear_scan",
        **extra_args,
    )(*inputs)
    start = Lp - L if reverse else 0
    outs = [o[:, start : start + L].reshape(B, L, G * W)[..., :N] for o in outs]
    states = outs[0] if n_parts == 1 else lax.complex(outs[0], outs[1])
    states = states.reshape(B, L, *S).astype(dtype)
    final = states[:, 0] if reverse else states[:, -1]
    return states, final
