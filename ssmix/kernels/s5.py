"""S5: one multi-input multi-output diagonal SSM over all features (S5, Smith et al. 2023).

With ``P`` complex modes ``Λ``, input matrix ``B (P, H)``, output matrix ``C (H, P)``,
skip ``D (H,)`` and a step ``Δ (P,)`` per mode, the discrete system is

    x_t = Λ̄ ⊙ x_{t−1} + B̄ u_t,        y_t = f·Re(C x_t) + D ⊙ u_t,

with ``f = 2`` when the modes are one half of conjugate pairs (``conj_sym``; the conjugate
half would contribute the complex conjugate) and ``f = 1`` otherwise. Bidirectional S5 adds a
second scan over the reversed sequence with the same ``Λ̄``, ``B̄`` and its own output
columns: ``y_t = f·Re(C_f x_t + C_b x'_t) + D ⊙ u_t`` with ``x'_t = Λ̄ ⊙ x'_{t+1} + B̄ u_t``
(the backward state includes the current input, as in lindermanlab/S5).

Shapes: B batch, L length, H features, P stored modes. Everything here is a pure function of
jax arrays:

- :func:`discretize`: ZOH or bilinear ``(Λ, B, Δ) → (Λ̄, B̄)`` (through
  :func:`ssmix.kernels.vandermonde.discretize_diag`).
- :func:`s5_ssm`: the whole layer map; ``method`` picks the scan of
  :func:`ssmix.kernels.scan.linear_scan` (``"associative"``, ``"sequential"``, ``"chunked"``,
  ``"parallel"``, or ``"auto"``: :func:`auto_method`).
  The projections in and out of the state are real matmuls over stacked real and imaginary
  parts, so no complex matmul is formed.
- :func:`s5_states`, :func:`s5_output`: the two halves of :func:`s5_ssm` (layers that need
  every state, e.g. to read the state at each sequence's last valid position, call them).
- :func:`s5_step`: one recurrence step for autoregressive decoding.
- :func:`s5_matrix`: the mixing matrices ``M (H, H, L, L)``, O(L²H²): the oracle.
- :func:`s5_ssm_naive`: a Python loop over time, straight from the formulas above.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssmix._backend import resolve_backend
from ssmix._checks import check_choice, check_ndim, check_positive_int
from ssmix.kernels.scan import METHODS, linear_scan
from ssmix.kernels.vandermonde import discretize_diag

__all__ = [
    "DISCS",
    "METHODS",
    "auto_method",
    "discretize",
    "s5_matrix",
    "s5_output",
    "s5_ssm",
    "s5_ssm_naive",
    "s5_states",
    "s5_step",
]

#: Discretisations of the diagonal system (S4D, Gu et al. 2022).
DISCS = ("zoh", "bilinear")


def auto_method(backend: str | None = None) -> str:
    """The scan ``method="auto"`` runs on ``backend`` (default: :func:`ssmix.auto_backend`).

    ``"cpu"``: ``"associative"`` (this function's default before the backend rules; the S5
    layer picks its own CPU mode by :func:`ssmix.layers.s5.auto_mode`). ``"gpu"``, ``"tpu"``:
    ``"parallel"``, the scan without a loop.
    """
    return "associative" if resolve_backend(backend) == "cpu" else "parallel"


def _check_method(method, chunk_size):
    """``method`` with ``"auto"`` resolved (in Python, so jit caches key on the result)."""
    check_choice("method", method, ("auto", *METHODS))
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    return auto_method() if method == "auto" else method


def _complex_dtype(*arrays):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.complex64)


def _real_dtype(*arrays):
    return jnp.finfo(_complex_dtype(*arrays)).dtype


def _check_system(Lambda, B, step):
    check_ndim("Lambda", Lambda, 1, "(P,)")
    P = Lambda.shape[0]
    check_ndim("B", B, 2, "(P, H)")
    if B.shape[0] != P:
        raise ValueError(f"B must have shape (P, H) with P = {P}; got {B.shape}")
    check_ndim("step", step, 1, "(P,)")
    if step.shape != (P,):
        raise ValueError(f"step must have shape (P,) = ({P},); got {step.shape}")
    if jnp.iscomplexobj(step):
        raise TypeError("step must be real (one positive step per mode)")


def discretize(Lambda, B, step, disc: str = "zoh"):
    """Discretise the diagonal system per mode: ``(Λ, B, Δ) → (Λ̄, B̄)``.

    - ``"zoh"``: ``Λ̄ = exp(ΔΛ)``, ``B̄ = (exp(ΔΛ) − 1)/Λ · B``.
    - ``"bilinear"``: ``Λ̄ = (1 + ΔΛ/2)/(1 − ΔΛ/2)``, ``B̄ = Δ/(1 − ΔΛ/2) · B``.

    Args:
      Lambda: complex ``(P,)`` continuous-time modes (non-zero for ZOH).
      B: complex or real ``(P, H)``.
      step: real positive ``(P,)``.
      disc: one of :data:`DISCS`.

    Returns:
      ``(Lambda_bar (P,), B_bar (P, H))``, complex.
    """
    check_choice("disc", disc, DISCS)
    Lambda, B, step = jnp.asarray(Lambda), jnp.asarray(B), jnp.asarray(step)
    _check_system(Lambda, B, step)
    cdtype = _complex_dtype(Lambda, B, step)
    Lambda = Lambda.astype(cdtype)
    # The per-mode factor of B̄ is the B̄ of a unit input vector: one row of modes.
    log_dA, factor = discretize_diag(
        Lambda[None], jnp.ones_like(Lambda)[None], step[None].astype(_real_dtype(cdtype)), disc
    )
    return jnp.exp(log_dA[0]), factor[0][:, None] * B.astype(cdtype)


def _dense(x, w):
    """``x (..., K) @ w (K, M)`` as one 2-D matmul (XLA on CPU is faster on flat operands)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _project_in(B_bar, u):
    """``B̄ u_t`` for every position: real ``u (B, L, H)`` → complex ``(B, L, P)``."""
    P = B_bar.shape[0]
    w = jnp.concatenate([B_bar.real, B_bar.imag], axis=0).T  # (H, 2P)
    r = _dense(u.astype(w.dtype), w)
    return jax.lax.complex(r[..., :P], r[..., P:])


def _project_out(C, states):
    """``Re(C x_t)``: complex ``C (H, P)``, ``states (B, L, P)`` → real ``(B, L, H)``."""
    # One matmul over [Re x, Im x] (K = 2P) beats two with K = P despite the concatenation.
    x = jnp.concatenate([states.real, states.imag], axis=-1)
    return _dense(x, jnp.concatenate([C.real, -C.imag], axis=1).T)


def _batched(u, name="u"):
    check_ndim(name, u, (2, 3), "(L, H) or (B, L, H)")
    return (u[None], True) if u.ndim == 2 else (u, False)


def s5_states(
    Lambda_bar,
    B_bar,
    u,
    *,
    reverse: bool = False,
    initial_state=None,
    method: str = "auto",
    chunk_size: int | None = None,
    segment_ids=None,
):
    """All states of ``x_t = Λ̄ ⊙ x_{t−1} + B̄ u_t`` (``x_{t+1}`` with ``reverse``).

    Args:
      Lambda_bar: complex ``(P,)`` discrete modes.
      B_bar: complex ``(P, H)``.
      u: real input ``(B, L, H)``.
      reverse: run from the end of the sequence (the backward scan of bidirectional S5).
      initial_state: complex ``(B, P)`` state before the first step (zeros when None).
      method: ``"auto"`` (:func:`auto_method`), ``"associative"``, ``"sequential"``,
        ``"chunked"`` or ``"parallel"`` (see :func:`ssmix.kernels.scan.linear_scan`).
      chunk_size: chunk length of ``"chunked"`` and ``"parallel"`` (None: their defaults).
      segment_ids: packed sequences, integer ``(B, L)``: the state is reset where the id
        changes (in the direction of the scan; see :func:`ssmix.kernels.scan.linear_scan`).

    Returns:
      ``(states (B, L, P), final_state (B, P))``, complex.
    """
    method = _check_method(method, chunk_size)
    check_ndim("u", u, 3, "(B, L, H)")
    if B_bar.shape[1] != u.shape[-1]:
        raise ValueError(f"u must have shape (B, L, {B_bar.shape[1]}) for B_bar; got {u.shape}")
    Bu = _project_in(B_bar, u)
    return linear_scan(
        Lambda_bar,
        Bu,
        initial_state,
        reverse=reverse,
        method=method,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
    )


def s5_output(C, states_fwd, states_bwd=None, D=None, u=None, *, conj_sym: bool = True):
    """Read out the states: ``y = f·Re(C_f x + C_b x') (+ D ⊙ u)``, ``f = 2`` with ``conj_sym``.

    Args:
      C: complex ``(H, P)``, or ``(H, 2P)`` when ``states_bwd`` is given (forward columns
        first).
      states_fwd: complex ``(B, L, P)``.
      states_bwd: complex ``(B, L, P)`` backward states, or None.
      D: real ``(H,)`` skip, or None (then ``u`` is not used).
      u: real ``(B, L, H)``, needed with ``D``.
      conj_sym: the modes are halves of conjugate pairs (output doubled).

    Returns:
      Real ``(B, L, H)``.
    """
    P = states_fwd.shape[-1]
    expected = 2 * P if states_bwd is not None else P
    if C.ndim != 2 or C.shape[1] != expected:
        raise ValueError(f"C must have shape (H, {expected}); got {C.shape}")
    y = _project_out(C[:, :P], states_fwd)
    if states_bwd is not None:
        y = y + _project_out(C[:, P:], states_bwd)
    if conj_sym:
        y = 2 * y
    if D is not None:
        y = y + D.astype(y.dtype) * u.astype(y.dtype)
    return y


def _check_ssm(Lambda, B, C, D, step, u, bidirectional, initial_state):
    _check_system(Lambda, B, step)
    P, H = B.shape
    check_ndim("u", u, (2, 3), "(L, H) or (B, L, H)")
    if u.shape[-1] != H or u.shape[-2] < 1:
        raise ValueError(f"u must have shape (L, {H}) or (B, L, {H}) with L >= 1; got {u.shape}")
    n_out = 2 * P if bidirectional else P
    if C.shape != (H, n_out):
        what = "(H, 2P)" if bidirectional else "(H, P)"
        raise ValueError(f"C must have shape {what} = {(H, n_out)}; got {C.shape}")
    if D.shape != (H,):
        raise ValueError(f"D must have shape (H,) = ({H},); got {D.shape}")
    if initial_state is not None:
        if bidirectional:
            raise ValueError(
                "a bidirectional S5 reads the future: initial_state needs a causal one"
            )
        expected = (P,) if u.ndim == 2 else (u.shape[0], P)
        if initial_state.shape != expected:
            raise ValueError(f"initial_state must have shape {expected}; got {initial_state.shape}")


def s5_ssm(
    Lambda,
    B,
    C,
    D,
    step,
    u,
    *,
    disc: str = "zoh",
    bidirectional: bool = False,
    conj_sym: bool = True,
    method: str = "auto",
    chunk_size: int | None = None,
    initial_state=None,
    return_state: bool = False,
):
    """Apply an S5 SSM to ``u``: discretise, scan, read out (module docstring).

    Not jitted itself (the scans inside are): wrap it in ``jax.jit`` with the keyword
    options static, or call it inside a jitted model. Left eager, the compiled scans are
    shared between every configuration with the same shapes.

    Args:
      Lambda: complex ``(P,)`` continuous-time modes.
      B: complex ``(P, H)``.
      C: complex ``(H, P)``, or ``(H, 2P)`` when bidirectional (first ``P`` columns read the
        forward states, the last ``P`` the backward states).
      D: real ``(H,)``.
      step: real positive ``(P,)`` step per mode.
      u: real ``(L, H)`` or ``(B, L, H)``.
      disc: ``"zoh"`` or ``"bilinear"``.
      bidirectional: add the backward scan.
      conj_sym: the ``P`` modes are one half of conjugate pairs: the output is
        ``2·Re(C x)`` (the system has ``2P`` real-equivalent modes); otherwise ``Re(C x)``.
      method: scan method, ``"auto"`` (:func:`auto_method`), ``"associative"``,
        ``"sequential"``, ``"chunked"`` or ``"parallel"``.
      chunk_size: chunk length of ``"chunked"`` and ``"parallel"`` (None: their defaults).
      initial_state: complex ``(P,)`` / ``(B, P)`` state before the sequence (causal only).
      return_state: also return the state after the last position (causal only).

    Returns:
      ``y`` with the shape of ``u`` (real, at least float32), or ``(y, final_state)`` with
      ``return_state`` (``final_state`` complex ``(P,)`` / ``(B, P)``).
    """
    check_choice("disc", disc, DISCS)
    method = _check_method(method, chunk_size)
    Lambda, B, C, D, step, u = map(jnp.asarray, (Lambda, B, C, D, step, u))
    _check_ssm(Lambda, B, C, D, step, u, bidirectional, initial_state)
    if return_state and bidirectional:
        raise ValueError(
            "a bidirectional S5 has no causal final state: return_state needs a causal one"
        )
    rdtype = _real_dtype(Lambda, B, C, D, step, u)
    ub, unbatched = _batched(u)
    ub = ub.astype(rdtype)
    x0 = None
    if initial_state is not None:
        x0 = jnp.asarray(initial_state).astype(_complex_dtype(rdtype))
        x0 = x0[None] if unbatched else x0
    Lambda_bar, B_bar = discretize(Lambda, B, step.astype(rdtype), disc)
    scan = functools.partial(s5_states, method=method, chunk_size=chunk_size)
    states, final = scan(Lambda_bar, B_bar, ub, initial_state=x0)
    states_bwd = scan(Lambda_bar, B_bar, ub, reverse=True)[0] if bidirectional else None
    y = s5_output(C, states, states_bwd, D, ub, conj_sym=conj_sym).astype(rdtype)
    if unbatched:
        y, final = y[0], final[0]
    return (y, final) if return_state else y


def s5_ssm_naive(
    Lambda,
    B,
    C,
    D,
    step,
    u,
    *,
    disc: str = "zoh",
    bidirectional: bool = False,
    conj_sym: bool = True,
    initial_state=None,
    return_state: bool = False,
):
    """Reference for :func:`s5_ssm`: the discretisation formulas (S4D, Gu et al.
    2022) and a Python loop.

    Same arguments and results as :func:`s5_ssm` (no ``method``); slow, obviously right.
    """
    check_choice("disc", disc, DISCS)
    Lambda, B, C, D, step, u = map(jnp.asarray, (Lambda, B, C, D, step, u))
    _check_ssm(Lambda, B, C, D, step, u, bidirectional, initial_state)
    rdtype = _real_dtype(Lambda, B, C, D, step, u)
    cdtype = _complex_dtype(rdtype)
    Lambda, B, C = Lambda.astype(cdtype), B.astype(cdtype), C.astype(cdtype)
    step = step.astype(rdtype)
    if disc == "zoh":
        Lambda_bar = jnp.exp(step * Lambda)
        B_bar = ((Lambda_bar - 1) / Lambda)[:, None] * B
    else:
        den = 1 - step * Lambda / 2
        Lambda_bar = (1 + step * Lambda / 2) / den
        B_bar = (step / den)[:, None] * B
    ub, unbatched = _batched(u.astype(rdtype))
    P = Lambda.shape[0]
    f = 2 if conj_sym else 1
    L = ub.shape[1]
    x = jnp.zeros((ub.shape[0], P), cdtype)
    if initial_state is not None:
        x = jnp.asarray(initial_state).astype(cdtype)
        x = x[None] if unbatched else x
    ys = [None] * L
    for t in range(L):
        x = Lambda_bar * x + ub[:, t] @ B_bar.T
        ys[t] = f * jnp.real(x @ C[:, :P].T) + D * ub[:, t]
    final = x
    if bidirectional:
        xb = jnp.zeros_like(x)
        for t in reversed(range(L)):
            xb = Lambda_bar * xb + ub[:, t] @ B_bar.T
            ys[t] = ys[t] + f * jnp.real(xb @ C[:, P:].T)
    y = jnp.stack(ys, axis=1).astype(rdtype)
    if unbatched:
        y, final = y[0], final[0]
    return (y, final) if return_state else y


def s5_step(Lambda_bar, B_bar, C, D, state, u_t, *, conj_sym: bool = True):
    """One causal step: ``x ← Λ̄ ⊙ x + B̄ u_t``, ``y_t = f·Re(C x) + D ⊙ u_t``.

    Args:
      Lambda_bar: complex ``(P,)``.
      B_bar: complex ``(P, H)``.
      C: complex ``(H, P)`` (the forward columns).
      D: real ``(H,)``.
      state: complex ``(B, P)``.
      u_t: real ``(B, H)``.
      conj_sym: output doubled for conjugate-pair halves.

    Returns:
      ``(state (B, P), y_t (B, H))``.
    """
    rdtype = jnp.promote_types(u_t.dtype, jnp.finfo(Lambda_bar.dtype).dtype)
    u_t = u_t.astype(rdtype)
    state = Lambda_bar * state + _project_in(B_bar, u_t[:, None])[:, 0]
    y = _project_out(C, state[:, None])[:, 0]
    if conj_sym:
        y = 2 * y
    return state, y + D.astype(rdtype) * u_t


def s5_matrix(Lambda_bar, B_bar, C, D, L: int, *, bidirectional: bool = False, conj_sym=True):
    """Mixing matrices: ``y[b, t, i] = Σ_{s, j} M[i, j, t, s]·u[b, s, j]``; O(H²L²) memory.

    ``M[i, j, t, s] = f·Re Σ_p C_f[i, p] Λ̄_p^{t−s} B̄[p, j]`` for ``s ≤ t``, plus
    ``f·Re Σ_p C_b[i, p] Λ̄_p^{s−t} B̄[p, j]`` for ``s ≥ t`` when bidirectional, plus
    ``D_i`` where ``i = j`` and ``t = s``.

    Args:
      Lambda_bar: complex ``(P,)``.
      B_bar: complex ``(P, H)``.
      C: complex ``(H, P)`` or ``(H, 2P)`` (bidirectional).
      D: real ``(H,)``.
      L: sequence length.
      bidirectional: add the backward part.
      conj_sym: output doubled for conjugate-pair halves.

    Returns:
      Real ``(H, H, L, L)``.
    """
    check_positive_int("L", L)
    P = Lambda_bar.shape[0]
    f = 2 if conj_sym else 1
    rdtype = jnp.finfo(Lambda_bar.dtype).dtype
    powers = jnp.exp(jnp.log(Lambda_bar)[:, None] * jnp.arange(L, dtype=rdtype))  # (P, L)
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]  # t − s

    def toeplitz(Cpart, lags):
        K = f * jnp.real(jnp.einsum("ip,pk,pj->ijk", Cpart, powers, B_bar))  # (H, H, L)
        taps = jnp.take(K, jnp.clip(lags, 0, L - 1), axis=-1)
        return jnp.where(lags >= 0, taps, 0)

    M = toeplitz(C[:, :P], lag)
    if bidirectional:
        M = M + toeplitz(C[:, P:], -lag)
    H = D.shape[0]
    eye = jnp.eye(H, dtype=rdtype)[:, :, None, None] * jnp.eye(L, dtype=rdtype)
    return M + D.astype(rdtype)[:, None, None, None] * eye
