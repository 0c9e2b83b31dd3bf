"""The S4D layer: a diagonal SSM per feature with a Vandermonde kernel.

Modes, state, masking and output layout are those of :class:`~ssmix.layers.s4.LTISSM`.
Initialisations are registered in :data:`S4D_INITS`: each entry maps a name to a function
``(d_state, n, key) -> (A, B)`` returning complex ``(n, N/2)`` arrays for ``n`` SSMs (the
layer's ``n_ssm``, by default ``H``), so adding a kind (for example PTD) is one function and
one dictionary entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssmix import hippo
from ssmix._checks import check_choice, check_positive_int
from ssmix.kernels.scan import linear_scan
from ssmix.kernels.vandermonde import (
    DISCS,
    diag_chunk_operators,
    diag_state_forward,
    diag_state_output,
    discretize_diag,
    vandermonde_kernel,
)
from ssmix.layers.base import SSMParam, as_complex, complex_param
from ssmix.layers.s4 import _MAX_REAL, LTISSM

__all__ = ["S4D", "S4D_INITS"]


def _hippo_diag(kind: str) -> Callable:
    def init(d_state: int, n: int, key: jax.Array):
        A, B = hippo.diag_init(kind, d_state, key=key)
        shape = (n, d_state // 2)
        return np.broadcast_to(A, shape), np.broadcast_to(B, shape)

    init.__doc__ = f"S4D-{kind} modes from :func:`ssmix.hippo.diag_init`, shared by all features."
    return init


def _ptd(d_state: int, n: int, key: jax.Array):
    """S4-PTD modes: the ``N/2`` modes of :func:`ssmix.hippo.ptd` for HiPPO-LegS of size ``N/2``.

    The perturbed spectrum is not conjugate-paired, so instead of one half of ``N/2`` pairs
    the layer's ``N/2`` stored modes are *all* modes of the size-``N/2`` PTD system (sign-fixed
    ``Λ̃``, ``B = Ṽ⁻¹ b`` with the LegS ``b``, unclipped). The kernel ``2·Re Σ C B̄ Ā^ℓ`` is
    then that system plus its complex conjugate: the same real state count ``N`` and parameter
    count as S4D-LegS at ``d_state = N``. ``C`` keeps S4D's complex-normal initialisation.
    """
    res = hippo.ptd("legs", d_state // 2)
    B = res.Vinv @ hippo.transition("legs", d_state // 2)[1]
    shape = (n, d_state // 2)
    return np.broadcast_to(res.Lambda, shape), np.broadcast_to(B, shape)


def _all_finite(a) -> bool:
    """Whether every entry of ``a`` is finite; True for a traced value, which has no entries
    to look at (the layer can then be built inside ``jit`` / ``eval_shape``, e.g. by
    ``nnx.bridge.to_linen``). The packaged initialisations return NumPy arrays."""
    if isinstance(a, jax.core.Tracer):
        return True
    return bool(np.all(np.isfinite(np.asarray(a))))


#: S4D initialisations: name -> ``(d_state, n_ssm, key) -> (A (n_ssm, N/2), B (n_ssm, N/2))``.
S4D_INITS: dict[str, Callable] = {
    kind: _hippo_diag(kind) for kind in ("lin", "inv", "legs", "real", "random")
}
S4D_INITS["ptd"] = _ptd


class S4D(LTISSM):
    """S4D: a diagonal SSM per feature, ``K_ℓ = 2·Re Σ_n C_n B̄_n Ā_n^ℓ``.

    Parameters (``SSMParam`` unless noted): ``A_re_log`` and ``A_im`` ``(S, N/2)`` with
    ``A = −exp(A_re_log) + i·A_im`` (negative real part by construction), ``B``
    ``(S, N/2, 2)`` (complex as real pairs), ``S = n_ssm`` (default ``H``; feature ``h`` uses
    SSM ``h mod S``), ``log_dt`` ``(H,)``; ``C``
    ``(channels[·2], H, N/2, 2)`` and ``D`` ``(channels, H)`` are plain ``nnx.Param``.

    Args:
      d_model: H, features.
      d_state: N, full state size (even; N/2 complex modes are stored).
      channels: output channels per feature (output ``channels·H`` features).
      init: a key of :data:`S4D_INITS` (``"lin"``, ``"inv"``, ``"legs"``, ``"real"``,
        ``"random"``, ``"ptd"`` for S4-PTD).
      disc: ``"zoh"``, ``"bilinear"`` or ``"dss"`` (see
        :func:`~ssmix.kernels.vandermonde.discretize_diag`).
      l_max: the normalisation length of ``disc="dss"`` (required there, unused otherwise).
      dt_min, dt_max: range of the log-uniform Δ initialisation.
      bidirectional: add a strictly anti-causal kernel with its own ``C`` rows.
      mode: ``"auto"``, ``"fft"``, ``"chunked"``, ``"scan"`` or ``"materialized"``.
      chunk_size: chunk length of the ``"chunked"`` mode.
      drop_kernel: dropout rate on the kernel's taps in training (``"fft"`` mode; pass
        ``rngs`` to the call), 0 = off.
      n_ssm: number of SSMs (``A``, ``B``) shared by the features, dividing ``H``; feature
        ``h`` uses SSM ``h mod n_ssm`` (state-spaces/s4's ``n_ssm``). None (default): ``H``.
      param_dtype: storage dtype of the parameters, float32 or float64 (they are complex:
        bfloat16 / float16 raise a ``ValueError``; use ``dtype`` for bfloat16 activations).
      dtype: dtype the input is read in (None: the input's own). The SSM itself (kernel,
        convolution, recurrence) runs in ``promote(dtype, param_dtype, float32)``: float32
        for bfloat16 inputs. The output has the input's dtype (see the precision policy of
        :mod:`ssmix.layers.base`).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        channels: int = 1,
        init: str = "legs",
        disc: str = "zoh",
        l_max: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        bidirectional: bool = False,
        mode: str = "auto",
        chunk_size: int = 64,
        drop_kernel: float = 0.0,
        n_ssm: int | None = None,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        check_choice("init", init, tuple(S4D_INITS))
        check_choice("disc", disc, DISCS)
        if disc == "dss":
            if l_max is None:
                raise ValueError("disc='dss' normalises the kernel over a fixed length: pass l_max")
            check_positive_int("l_max", l_max)
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
        self.init = init
        self.disc = disc
        self.l_max = l_max
        A, B = S4D_INITS[init](d_state, self.n_ssm, rngs.params())
        if not (_all_finite(A) and _all_finite(B)):
            raise ValueError(f"init {init!r} produced non-finite A or B")
        A, B = jnp.asarray(A), jnp.asarray(B)
        self.A_re_log = SSMParam(jnp.log(-jnp.minimum(A.real, _MAX_REAL)).astype(self.param_dtype))
        self.A_im = SSMParam(A.imag.astype(self.param_dtype))
        self.B = complex_param(B.astype(self._complex_dtype))
        dt = hippo.dt_init(rngs.params(), (d_model,), dt_min, dt_max, dtype=self.param_dtype)
        self.log_dt = SSMParam(jnp.log(dt))

    def _system(self, dtype):
        cdtype = jnp.promote_types(dtype, jnp.complex64)
        A = jax.lax.complex(-jnp.exp(self.A_re_log[...]), self.A_im[...]).astype(cdtype)
        B = as_complex(self.B).astype(cdtype)
        dt = jnp.exp(self.log_dt[...]).astype(dtype)
        A, B = self._per_feature(A), self._per_feature(B)
        return discretize_diag(A, B, dt, self.disc, l_norm=self.l_max)

    def _kernel(self, sys, C, L):
        log_dA, dB = sys
        return vandermonde_kernel(log_dA, C * dB, L)

    def _chunk_ops(self, sys, C, T, strict):
        return diag_chunk_operators(*sys, C, T, strict=strict)

    def _state_output(self, sys, C, state, L):
        return diag_state_output(sys[0], C, state, L)

    def _state_forward(self, sys, u, state):
        return diag_state_forward(*sys, u, state)

    def _advance(self, sys, state, steps, max_steps):
        return jnp.exp(steps[:, None, None].astype(sys[0].real.dtype) * sys[0]) * state

    def _scan_block(self, sys, C, strict):
        log_dA, dB = sys
        dA = jnp.exp(log_dA)

        def block(x, u_blk, m_blk, r_blk):
            b = dB * u_blk[..., None]  # (B, T, H, N/2)
            # Padded positions keep the state: decay 1 and (already zero) input.
            a = dA if m_blk is None else jnp.where(m_blk[:, :, None, None], dA, 1)
            if r_blk is not None:  # a segment starts: decay 0 drops the state before it
                a = jnp.where(r_blk[:, :, None, None], 0, a)
            states, x_new = linear_scan(a, b, x)
            if strict:
                states = jnp.concatenate([x[:, None], states[:, :-1]], axis=1)
                if r_blk is not None:  # the strict output at a start reads the zero state
                    states = jnp.where(r_blk[:, :, None, None], 0, states)
            return x_new, 2 * jnp.real(jnp.einsum("bthn,chn->btch", states, C))

        return block

    def _step_state(self, sys, state, u_t):
        log_dA, dB = sys
        return jnp.exp(log_dA) * state + dB * u_t[..., None]
