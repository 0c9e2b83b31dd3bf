"""Pallas SSD: one fused kernel per (batch, head) walking the chunks with the state on chip.

The length is cut into ``nc`` chunks of ``Q`` steps (:func:`pad_to_chunks`). One kernel
program handles one ``(batch, head)`` pair and walks its chunks in order, carrying the
``(P, N)`` state between them without writing it to memory; per chunk it does

1. the chunk-local quadratic form ``(C Bᵀ ⊙ exp(segsum)) · (dt·x)`` — two matmuls;
2. the entering state's contribution ``exp(cs_i)·C_i·stateᵀ`` — one matmul;
3. the state update ``exp(cs_end)·state + Σ_j (exp(cs_end − cs_j)·dt_j·x_j)ᵀ B_j`` — one
   matmul,

the shape of mamba's ``_chunk_scan_fwd`` + ``_state_passing_fwd`` fused into one kernel, or
of axlearn's Pallas SSD. ``cs`` is the within-chunk cumulative sum of ``dt·A`` (≤ 0 and
non-increasing), computed outside the kernel; every exponent is ≤ 0 (masked before the
exponential inside the chunk). Head ``h`` reads ``B`` and ``C`` of group ``h // (Hh // G)``
through the block index map, so groups are never expanded in memory.

Two variants of the same chunk body, chosen at trace time from :func:`ssmix.auto_backend`:

- ``"tpu"`` (also used on CPU): grid ``(batch, Hh, nc)`` with the chunk axis last and marked
  ``"arbitrary"`` (sequential); the state is carried in the final-state output block, which
  stays resident in VMEM because its index does not depend on the chunk. Blocks are whole
  ``(Q, P)`` / ``(Q, N)`` / ``(P, N)`` trailing dimensions, so any shape satisfies Mosaic's
  tiling rule. Lowered with Mosaic TPU.
- ``"gpu"``: grid ``(batch, Hh)``; each program loops over its chunks with a ``fori_loop``
  inside the kernel, loading one chunk at a time and carrying the state in registers (a GPU
  grid has no sequential axis). Lowered with **Triton** (``pallas.triton.CompilerParams``):
  the default Mosaic GPU lowering of ``pallas_call`` is deprecated and needs warpgroup-shaped
  kernels. Triton needs power-of-two ``Q``, ``P`` and ``N`` (at least 16 for its matmuls).

``interpret=None`` runs the kernel in Pallas interpret mode when ``jax.default_backend()`` is
CPU and compiled elsewhere.

Backward: **not a Pallas kernel**. The gradient is a ``custom_vjp`` whose backward is JAX's
VJP of the loop-free parallel form (:func:`ssmix.kernels.ssd.parallel.ssd_parallel`) on the
saved inputs: the forward is fused, the backward runs in XLA (it recomputes the parallel
forward's intermediates). Forward-mode differentiation is not supported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ssmix._backend import resolve_backend
from ssmix.kernels.ssd.common import pad_to_chunks
from ssmix.kernels.ssd.parallel import ssd_parallel

__all__ = ["ssd_pallas", "resolve_interpret", "kernel_target"]


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` -> interpret mode exactly when ``jax.default_backend()`` is CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def kernel_target(backend: str | None = None) -> str:
    """The kernel variant for a backend: ``"gpu"`` (chunk loop inside each program, Triton)
    on GPU, ``"tpu"`` (chunk axis as the sequential grid axis, Mosaic) on TPU and CPU.
    ``backend=None`` means :func:`ssmix.auto_backend`."""
    return "gpu" if resolve_backend(backend) == "gpu" else "tpu"


def _dot(a, b, contract):
    """2-D matmul contracting ``a``'s axis ``contract[0]`` with ``b``'s axis ``contract[1]``,
    accumulated in the operands' (float32 or float64) precision."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=prec,
        preferred_element_type=a.dtype,
    )


def _chunk(x, dt, cs_col, cs_row, Bm, Cm, state):
    """One chunk: ``x (Q, P)``, ``dt, cs_col (Q, 1)``, ``cs_row (1, Q)``, ``Bm, Cm (Q, N)``,
    entering ``state (P, N)`` -> ``(y (Q, P), state after the chunk (P, N))``."""
    Q = x.shape[0]
    u = x * dt
    row = lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    col = lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    causal = row >= col
    diff = lax.select(causal, cs_col - cs_row, jnp.zeros((Q, Q), x.dtype))
    decay = lax.select(causal, jnp.exp(diff), jnp.zeros((Q, Q), x.dtype))
    scores = _dot(Cm, Bm, (1, 1)) * decay  # (Q, Q): C_i·B_j·exp(cs_i − cs_j), j ≤ i
    y = _dot(scores, u, (1, 0)) + jnp.exp(cs_col) * _dot(Cm, state, (1, 1))
    # The chunk's total log-decay cs[Q − 1] as a masked reduction (no scalar extraction).
    last = lax.broadcasted_iota(jnp.int32, (1, Q), 1) == Q - 1
    total = jnp.sum(lax.select(last, cs_row, jnp.zeros_like(cs_row)), axis=1, keepdims=True)
    new_state = jnp.exp(total) * state + _dot(u * jnp.exp(total - cs_col), Bm, (0, 0))
    return y, new_state


def _tpu_kernel(x_ref, dt_ref, csc_ref, csr_ref, b_ref, c_ref, h0_ref, y_ref, state_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
        state_ref[...] = h0_ref[...]

    y, state = _chunk(
        x_ref[...],
        dt_ref[...],
        csc_ref[...],
        csr_ref[...],
        b_ref[...],
        c_ref[...],
        state_ref[...],
    )
    y_ref[...] = y.astype(y_ref.dtype)
    state_ref[...] = state


def _gpu_kernel(x_ref, dt_ref, csc_ref, csr_ref, b_ref, c_ref, h0_ref, y_ref, state_ref):
    nc = x_ref.shape[0]

    def step(c, state):
        y, state = _chunk(x_ref[c], dt_ref[c], csc_ref[c], csr_ref[c], b_ref[c], c_ref[c], state)
        y_ref[c] = y.astype(y_ref.dtype)
        return state

    state_ref[...] = lax.fori_loop(0, nc, step, h0_ref[...])


def _forward(x, dt, A, B, C, h0, chunk_size, interpret, target):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q, nc, (x, dt, B, C) = pad_to_chunks(x, dt, B, C, chunk_size)
    cs = jnp.cumsum((dt * A).reshape(b, nc, Q, H), axis=2)  # ≤ 0, non-increasing per chunk
    per_head = lambda v: jnp.moveaxis(v, 3, 1)  # (b, nc, Q, H, …) -> (b, H, nc, Q, …)  # noqa: E731
    xh = per_head(x.reshape(b, nc, Q, H, P))
    dth = per_head(dt.reshape(b, nc, Q, H, 1))
    csc = per_head(cs[..., None])
    csr = jnp.swapaxes(csc, -1, -2)  # (b, H, nc, 1, Q)
    Bg = per_head(B.reshape(b, nc, Q, G, N))
    Cg = per_head(C.reshape(b, nc, Q, G, N))
    dtype = x.dtype
    out_shape = (
        jax.ShapeDtypeStruct((b, H, nc, Q, P), dtype),
        jax.ShapeDtypeStruct((b, H, P, N), dtype),
    )
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        # One chunk per grid step; the chunk axis is sequential ("arbitrary").
        grid, lead, kernel = (b, H, nc), (None, None, None), _tpu_kernel
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
        head_index = lambda i, h, c: (i, h, c, 0, 0)  # noqa: E731
        group_index = lambda i, h, c: (i, lax.div(h, np.int32(R)), c, 0, 0)  # noqa: E731
        state_index = lambda i, h, c: (i, h, 0, 0)  # noqa: E731
    else:
        from jax.experimental.pallas import triton as pltriton

        # All chunks of one (batch, head) per program; the kernel loops over them.
        grid, lead, kernel = (b, H), (None, None, nc), _gpu_kernel
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
        head_index = lambda i, h: (i, h, 0, 0, 0)  # noqa: E731
        group_index = lambda i, h: (i, lax.div(h, np.int32(R)), 0, 0, 0)  # noqa: E731
        state_index = lambda i, h: (i, h, 0, 0)  # noqa: E731
    per_head_spec = lambda *tail: pl.BlockSpec((*lead, *tail), head_index)  # noqa: E731
    group_spec = pl.BlockSpec((*lead, Q, N), group_index)
    state_spec = pl.BlockSpec((None, None, P, N), state_index)
    in_specs = [
        per_head_spec(Q, P),  # x
        per_head_spec(Q, 1),  # dt
        per_head_spec(Q, 1),  # cs as a column
        per_head_spec(1, Q),  # cs as a row
        group_spec,  # B
        group_spec,  # C
        state_spec,  # h0
    ]
    out_specs = (per_head_spec(Q, P), state_spec)
    y, final = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=params,
        interpret=interpret,
    )(xh, dth, csc, csr, Bg, Cg, h0)
    y = jnp.moveaxis(y, 1, 3).reshape(b, nc * Q, H, P)[:, :L]
    return y, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ssd_fused(x, dt, A, B, C, h0, chunk_size, interpret, target):
    return _forward(x, dt, A, B, C, h0, chunk_size, interpret, target)


def _ssd_fused_fwd(x, dt, A, B, C, h0, chunk_size, interpret, target):
    out = _forward(x, dt, A, B, C, h0, chunk_size, interpret, target)
    return out, (x, dt, A, B, C, h0)


def _ssd_fused_bwd(chunk_size, interpret, target, saved, cotangents):
    _, vjp = jax.vjp(lambda *a: ssd_parallel(*a, chunk_size), *saved)
    return vjp(cotangents)


_ssd_fused.defvjp(_ssd_fused_fwd, _ssd_fused_bwd)


def ssd_pallas(x, dt, A, B, C, h0, chunk_size, *, interpret=None, target=None):
    """Pallas SSD, forward direction: ``(y (B, L, Hh, P), final state (B, Hh, P, N))`` from
    promoted inputs as in :func:`ssmix.kernels.ssd.ssd` (``h0`` or None).

    ``interpret``: Pallas interpret mode (None: on a CPU default backend). ``target``:
    ``"tpu"`` or ``"gpu"`` kernel variant (None: :func:`kernel_target`). Differentiable in
    reverse mode only; the backward is the parallel form's VJP in XLA (module docstring).
    """
    interpret = resolve_interpret(interpret)
    target = kernel_target() if target is None else target
    if target not in ("tpu", "gpu"):
        raise ValueError(f"target must be 'tpu' or 'gpu'; got {target!r}")
    if h0 is None:
        b, _, H, P = x.shape
        h0 = jnp.zeros((b, H, P, B.shape[3]), x.dtype)
    return _ssd_fused(x, dt, A, B, C, h0, chunk_size, interpret, target)
