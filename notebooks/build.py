"""Write the example notebooks from the cell sources below and execute them in place.

Each notebook is one string in the percent format: a line ``# %%`` starts a code cell and
``# %% [markdown]`` a markdown cell (whose lines are plain markdown, not comments). The
notebooks are committed with their outputs, so after editing a source here run

    .venv/bin/python notebooks/build.py            # all notebooks
    .venv/bin/python notebooks/build.py 02_ssm_kernels

which rewrites ``notebooks/<name>.ipynb`` and prints each notebook's execution time. Cell ids
are fixed and timing metadata is not recorded, so regenerating an unchanged notebook only
changes its outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

# Every notebook starts with this cell: small inline PNGs keep the committed files small.
SETUP = """\
%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3, "font.size": 9})"""

NB01_HIPPO = r"""
# %% [markdown]
# # 01 · HiPPO: memory as projection
#
# A HiPPO operator is a linear ODE $x'(t) = A\,x(t) + B\,u(t)$ whose state $x(t) \in
# \mathbb{R}^N$ holds the coefficients of the best approximation of the input's *history*
# $u(s), s \le t$, by $N$ basis functions under a measure (how much each past moment
# matters). Every S4-family layer in ssmix starts from one of these matrices. This notebook
#
# 1. draws the matrices $A$ of the measures in `ssmix.hippo`,
# 2. runs the ODE over a signal (`hippo.project`) and rebuilds the history from the state
#    (`hippo.reconstruct`) for LegS, LegT and FouT as $N$ grows,
# 3. looks at the spectra of their normal-plus-low-rank (NPLR) forms, the structure that S4
#    exploits and S4D / S5 keep only the diagonal part of.

# %%
{setup}
from matplotlib.colors import SymLogNorm

from ssmix import hippo

# %% [markdown]
# ## 1. The measures
#
# `hippo.transition(measure, N)` returns $(A, B)$ in float64. The names say which basis and
# which window of the past:
#
# | measure | basis | window | structure of $A$ |
# |---|---|---|---|
# | `legs` | scaled Legendre | all of $[0, t]$, uniformly | lower triangular, diagonal $-(n+1)$ |
# | `legt` | translated Legendre | sliding window | dense, checkerboard signs |
# | `lmu`  | translated Legendre (LMU normalisation) | sliding window | dense, checkerboard signs |
# | `lagt` | Laguerre | exponentially decaying | lower triangular, diagonal $-\frac12$ |
# | `fout` | Fourier | sliding window | $2\times2$ rotations $-\,b\,b^\top$ (rank one) |
# | `foud` | Fourier, decaying | exponentially decaying | rotations $-\tfrac12 I$ (normal) |
#
# The colour scale below is symmetric-logarithmic because the Legendre entries grow like $N$.

# %%
N = 16
fig, axes = plt.subplots(1, 6, figsize=(11, 2.4), constrained_layout=True)
for ax, measure in zip(axes, ["legs", "legt", "lmu", "lagt", "fout", "foud"]):
    A, B = hippo.transition(measure, N)
    lim = np.abs(A).max()
    im = ax.imshow(A, cmap="RdBu_r", norm=SymLogNorm(linthresh=0.5, vmin=-lim, vmax=lim))
    ax.set_title(measure)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(im, ax=axes, shrink=0.8, label="A[n, k] (rightmost)")
plt.show()

# %% [markdown]
# All but LMU are *normal plus low rank*: adding $\sum_r P_r P_r^\top$ with the rank
# correction $P$ of `hippo.rank_correction` (rank 2 for LegT, rank 1 otherwise, zero for the
# already normal FouD) leaves $-c\,I$ plus a skew-symmetric matrix. The check: the symmetric
# part of $A + P^\top P$ is a multiple of the identity.

# %%
N = 64
print(f"{'measure':8s} {'rank':>4s} {'c':>6s}  max |sym(A + PᵀP) − (−c)·I|")
for measure in hippo.NPLR_MEASURES:
    rank = 2 if measure == "legt" else 1
    A, _ = hippo.transition(measure, N)
    P = hippo.rank_correction(measure, N, rank)
    S = A + P.T @ P
    c = -np.mean(np.diag(S))
    sym = (S + S.T) / 2
    print(f"{measure:8s} {rank:4d} {c:6.2f}  {np.abs(sym + c * np.eye(N)).max():.1e}")

# %% [markdown]
# ## 2. Online approximation and reconstruction
#
# `hippo.project(u, measure, N, dt)` runs the discretised ODE over the samples of `u` and
# returns the state after every sample; `hippo.reconstruct(c, measure, delays)` evaluates
# $\sum_n c_n G_n$ at delays back from the state's time, i.e. what the state remembers. The
# signal below is a random smooth function (12 sinusoids) over 1000 samples.
#
# * **LegS** summarises the whole history $[0, t]$ with uniform weight, whatever its length
#   (the ODE is time-varying, $x' = (Ax + Bu)/t$).
# * **LegT** and **FouT** summarise a sliding window, here the last 250 samples
#   (`dt = 2 / 250`: their window is 2 ODE time units).

# %%
rng = np.random.default_rng(0)
L, window = 1000, 250
s = np.linspace(0, 1, L)
u = sum(
    rng.normal() / f * np.sin(2 * np.pi * f * s + rng.uniform(0, 2 * np.pi)) for f in range(1, 13)
)

Ns = [4, 8, 16, 32, 64]
measures = ["legs", "legt", "fout"]
recon, errors = {}, {m: [] for m in measures}
for measure in measures:
    for n in Ns:
        if measure == "legs":
            coeffs = hippo.project(u, "legs", n, dt=1.0)
            delays = np.arange(L)  # one ODE unit per sample, back to the first one
            target = u[::-1]
            u_hat = hippo.reconstruct(coeffs[-1], "legs", delays, elapsed=L)
        else:
            dt = 2 / window
            coeffs = hippo.project(u, measure, n, dt)
            delays = dt * np.arange(window)
            target = u[::-1][:window]
            u_hat = hippo.reconstruct(coeffs[-1], measure, delays)
        recon[measure, n] = u_hat[::-1]  # oldest first, to plot against time
        errors[measure].append(np.sqrt(np.mean((u_hat - target) ** 2) / np.mean(target**2)))

fig, axes = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True, constrained_layout=True)
for ax, measure in zip(axes, measures):
    span = L if measure == "legs" else window
    t_axis = np.arange(L - span, L)
    ax.plot(np.arange(L), u, color="0.75", lw=3, label="signal")
    for n, style in [(8, ":"), (16, "--"), (64, "-")]:
        ax.plot(t_axis, recon[measure, n], style, lw=1.2, label=f"N = {n}")
    ax.set_title(f"{measure}: memory at t = {L}")
    ax.set_xlabel("sample")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# The memory is read out at the last sample. With $N = 64$ both Legendre memories lie on top
# of the signal; FouT rings at the window edges (Gibbs: the window's content is not
# periodic). The relative RMS error over the remembered span as $N$ grows:

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for measure in measures:
    ax.semilogy(Ns, errors[measure], "o-", label=measure)
ax.set_xscale("log", base=2)
ax.set_xlabel("state size N")
ax.set_ylabel("relative RMS error")
ax.legend()
plt.show()
for measure in measures:
    print(f"{measure:5s}", "  ".join(f"N={n}: {e:.1e}" for n, e in zip(Ns, errors[measure])))

# %% [markdown]
# * **LegT** converges fastest: its window holds about 3 periods of the fastest component,
#   which 16 Legendre polynomials already resolve; the floor near $10^{-4}$ is the
#   discretisation error of the bilinear step, not the projection.
# * **LegS** must hold 4× more signal (the whole history), so it needs more coefficients for
#   the same error, but it does so with one state and no window length to choose.
# * **FouT** converges slowly, like a Fourier series of a non-periodic function.
#
# ## 3. Spectra of the NPLR forms
#
# `hippo.nplr(measure, N)` diagonalises the normal part $A + PP^\top = V\Lambda V^*$ with a
# *unitary* $V$ and returns one eigenvalue of each conjugate pair (imaginary part $\le 0$),
# together with $\tilde P = V^*P$ and $\tilde B = V^*B$. Then
# $A = V(\Lambda - \tilde P\tilde P^*)V^*$: a diagonal plus low-rank matrix in a
# well-conditioned basis, which is what S4's Cauchy kernel needs. First the exactness of that
# identity (over both halves of each pair):

# %%
N = 32
print(f"{'measure':8s}  max |V(Λ − P̃P̃*)V* − A|   max |V B̃ − B|")
forms = {}
for measure in ["legs", "legt", "lagt", "fout"]:
    rank = 2 if measure == "legt" else 1
    Lam, Pt, Bt, V = hippo.nplr(measure, N, rank)
    forms[measure] = Lam
    Vf = np.concatenate([V, V.conj()], axis=1)
    Lf = np.concatenate([Lam, Lam.conj()])
    Pf = np.concatenate([Pt, Pt.conj()], axis=1)
    Bf = np.concatenate([Bt, Bt.conj()])
    A, B = hippo.transition(measure, N)
    A_rec = Vf @ (np.diag(Lf) - Pf.T @ Pf.conj()) @ Vf.conj().T
    print(f"{measure:8s}  {np.abs(A_rec - A).max():.1e}                 "
          f"{np.abs(Vf @ Bf - B).max():.1e}")

# %% [markdown]
# Eigenvalues of $A$ itself (crosses) against those of the normal part (dots, both halves
# of each pair). The normal parts all sit on one vertical line $\operatorname{Re}\lambda =
# -c$; for LegS it is $-\frac12$ with imaginary parts spreading like $N^2$, the spectrum that
# S4D-LegS and S5 start from. LegS's own eigenvalues are the real numbers $-1, \dots, -N$ and
# LagT's are all $-\frac12$ (one Jordan block).

# %%
fig, axes = plt.subplots(1, 4, figsize=(11, 2.8), constrained_layout=True)
for ax, measure in zip(axes, forms):
    A, _ = hippo.transition(measure, N)
    eig_A = np.linalg.eigvals(A)
    Lam = np.concatenate([forms[measure], forms[measure].conj()])
    ax.plot(Lam.real, Lam.imag, ".", ms=5, label="normal part Λ")
    ax.plot(eig_A.real, eig_A.imag, "x", ms=5, label="eig(A)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(measure)
    ax.set_xlabel("Re λ")
axes[0].set_ylabel("Im λ")
axes[0].legend(fontsize=8, loc="upper left")
plt.show()

# %% [markdown]
# Why not diagonalise $A$ directly? Its eigenvectors are nearly parallel: the condition
# number of the eigenvector matrix of LegS grows exponentially with $N$, past $1/\epsilon$ of
# float64 by $N = 32$, while the NPLR basis is unitary ($\kappa = 1$). That is the problem
# S4 solves with the low-rank correction, S4D by dropping it, and PTD (notebook 02) by
# perturbing $A$ slightly before diagonalising.

# %%
for n in [4, 8, 16, 32, 64]:
    A, _ = hippo.transition("legs", n)
    _, W = np.linalg.eig(A)
    V = hippo.nplr("legs", n).V
    Vf = np.concatenate([V, V.conj()], axis=1)
    print(f"N = {n:2d}: κ(eigenvectors of A) = {np.linalg.cond(W):8.1e},"
          f"  κ(NPLR basis) = {np.linalg.cond(Vf):.3f}")
"""

NB02_SSM_KERNELS = r"""
# %% [markdown]
# # 02 · SSM kernels: S4, S4D and PTD
#
# A linear time-invariant SSM layer is a long convolution: per feature,
# $y = K * u + D\,u$ with the kernel $K_\ell = C\bar A^\ell \bar B$, $\ell = 0, 1, \dots$
# ($\bar A, \bar B$ the discretised state matrices, step $\Delta$). The S4 family differs in
# how $A$ is parametrised and how $K$ is computed:
#
# * **S4**: $A = \Lambda - PP^*$ (diagonal plus low rank, the NPLR form of a HiPPO matrix);
#   kernel by Cauchy sums with a Woodbury correction, `ssmix.kernels.cauchy.dplr_ssm_kernel`
#   (the layer's default computes the same kernel in the time domain by blocked powers of
#   $\bar A$, `dplr_power_kernel`, which is faster on CPU; `S4(kernel="cauchy")` uses the sums).
# * **S4D**: $A$ diagonal (several initialisations); kernel by a Vandermonde product,
#   `ssmix.kernels.vandermonde.diag_ssm_kernel`.
# * **S4-PTD**: $A$ diagonal, taken from a *perturbed* HiPPO-LegS that has a well-conditioned
#   eigenbasis (`ssmix.hippo.ptd`).
#
# This notebook draws the kernels, compares the diagonal approximations of LegS with the real
# thing in the time and frequency domains, and checks that the convolution and the step-by-step
# recurrence of every layer compute the same outputs.

# %%
{setup}
import jax
import jax.numpy as jnp
from flax import nnx

from ssmix import hippo
from ssmix.kernels.cauchy import dplr_diagonalize, dplr_ssm_kernel
from ssmix.kernels.vandermonde import diag_ssm_kernel
from ssmix.layers import S4, S4D, S4PTD, S5

# The kernel functions are plain JAX: jit them once (length and discretisation are static).
s4_kernel = jax.jit(dplr_ssm_kernel, static_argnames="L")
s4d_kernel = jax.jit(diag_ssm_kernel, static_argnames=("L", "disc"))


def batch1(*arrays):
    # One feature (H = 1): the kernels take (H, N/2) parameters.
    return [jnp.asarray(a)[None] for a in arrays]

# %% [markdown]
# ## 1. S4 as a delay line
#
# The HiPPO state $x$ holds the coefficients of the recent past, so a read-out
# $C = [G_0(\tau), \dots, G_{N-1}(\tau)]$ (the basis functions at delay $\tau$, from
# `hippo.basis`) rebuilds $u(t - \tau)$: the kernel should be a bump at lag $\tau / \Delta$.
# S4 works in the eigenbasis of the NPLR form, where the read-out is $\tilde C = C V$. Below,
# LegT and FouT (window of 2 time units) with $N = 64$ and $\Delta = 2/400$, so the window
# spans 400 steps, read out at delays of 100, 200 and 300 steps.

# %%
N, dt, L = 64, 2 / 400, 600
delays = np.array([100, 200, 300])
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True, constrained_layout=True)
for ax, measure in zip(axes, ["legt", "fout"]):
    rank = 2 if measure == "legt" else 1
    Lam, Pt, Bt, V = hippo.nplr(measure, N, rank)
    # FouT has a mode at exactly 0 (its constant component): give it the tiny decay the S4
    # layer gives it, or the kernel has a pole on the unit circle.
    Lam = np.minimum(Lam.real, -1e-4) + 1j * Lam.imag
    C = hippo.basis(measure, N, delays * dt).T @ V  # (3, N/2): one channel per delay
    K = s4_kernel(*batch1(Lam), jnp.asarray(Pt)[:, None], *batch1(Bt),
                  jnp.asarray(C)[:, None], jnp.array([dt]), L=L)[:, 0]
    for k, d in zip(K, delays):
        ax.plot(k / dt, label=f"delay {d}")
    print(f"{measure}: kernel peaks at lags {np.argmax(np.asarray(K), axis=1)} "
          f"(asked for {delays})")
    ax.set_title(f"S4-{measure}: kernels K / Δ")
    ax.set_xlabel("lag ℓ (steps)")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# Each kernel is a smoothed delta at its delay, of unit area (hence $K/\Delta$): an SSM of 64
# states delays the input by hundreds of steps. LegT's bumps are clean; FouT's ring like a
# truncated Fourier series and echo past the window's end (lag 400).
#
# ## 2. The S4D initialisations
#
# `hippo.diag_init(kind, N)` gives $N/2$ complex modes (one per conjugate pair); the kernel is
# $K_\ell = 2\,\mathrm{Re}\sum_n C_n \bar B_n \bar A_n^\ell$. The top row shows the modes
# $A_n$, the bottom row the kernel of each with the same random $C$ (complex normal, as the
# layers initialise it) and $\Delta = 0.01$.

# %%
N, dt, L = 64, 0.01, 1000
rng = np.random.default_rng(0)
C = (rng.normal(size=N // 2) + 1j * rng.normal(size=N // 2)) * np.sqrt(0.5)
kinds = ["lin", "inv", "legs", "real", "random"]
fig, axes = plt.subplots(2, 5, figsize=(12, 4.4), constrained_layout=True)
for j, kind in enumerate(kinds):
    A, B = hippo.diag_init(kind, N, key=jax.random.key(0))
    K = np.asarray(s4d_kernel(*batch1(A, B, C), jnp.array([dt]), L=L, disc="zoh"))[0]
    axes[0, j].plot(A.real, -A.imag, ".", ms=4)
    axes[0, j].set_yscale("symlog", linthresh=1)
    axes[0, j].set_title(f"S4D-{kind}")
    axes[0, j].set_xlabel("Re A")
    axes[1, j].plot(K, lw=0.8)
    axes[1, j].set_xlabel("lag ℓ")
    print(f"S4D-{kind:6s}: |Im A| up to {np.abs(A.imag).max():7.1f}, "
          f"Re A in [{A.real.min():.1f}, {A.real.max():.1f}]")
axes[0, 0].set_ylabel("−Im A")
axes[1, 0].set_ylabel("K")
plt.show()

# %% [markdown]
# * **Lin** places frequencies $\pi n$ on a line, like a Fourier basis: the kernel is a sum of
#   damped sinusoids, all decaying at the same rate $e^{-\Delta\ell/2}$.
# * **Inv** and **LegS** put a few modes at very high frequencies ($\propto N^2$): at
#   $\Delta = 0.01$ they oscillate faster than the sampling, the kernel's fast wiggle.
# * **Real** has no oscillation at all: a sum of decaying exponentials, the fastest dominating
#   at small lags.
# * **Random** draws log-normal frequencies.
#
# ## 3. Where the diagonal approximations of LegS deviate
#
# S4D-LegS keeps only the normal part of LegS ($A + \frac12 bb^\top = V\Lambda V^*$, with the
# halved input $\frac12 V^* b$ of the S4D theory) and drops the low-rank term; S4-PTD instead
# diagonalises $A + E$ for a small perturbation $E$ ($\lVert E\rVert \le 4\%$ of
# $\lVert A\rVert$) chosen to make the eigenbasis well conditioned. We read out the current
# value, $c = b = \sqrt{2n+1}$, and compare three systems of state size $N = 64$:
# HiPPO-LegS itself (dense / DPLR), S4D-LegS, and PTD. Top: the impulse responses of two
# state components ($\Delta = 10^{-3}$, bilinear); bottom: the transfer functions
# $G(i\omega) = c\,(i\omega - A)^{-1}b$ from `hippo.transfer_function`, on a frequency grid that
# includes every mode's resonance. Computed in float64.

# %%
N, dt, L = 64, 1e-3, 3000
rows = [0, 3]  # the state components whose impulse responses are drawn
with jax.enable_x64(True):
    A, b = hippo.transition("legs", N)
    Lam, Pt, Bt, V = hippo.nplr("legs", N)
    ptd, info = hippo.ptd("legs", N, return_info=True)
    print(f"PTD: κ(V) = {info.kappa:.1f}, ‖E‖/‖A‖ = {info.perturbation:.3f}")
    # (modes, input, eigenvectors, conjugate-paired?) of the two diagonal systems.
    systems = {
        "S4D-LegS": (Lam, V.conj().T @ (b / 2), V, True),
        "PTD": (ptd.Lambda, ptd.Vinv @ b, ptd.V, False),
    }
    # Impulse responses of the states x_n: read out by rows of the eigenvector matrix.
    resp = {"HiPPO-LegS": s4_kernel(*batch1(Lam), jnp.asarray(Pt)[:, None], *batch1(Bt),
                                    jnp.asarray(V[rows])[:, None], jnp.array([dt]), L=L)[:, 0]}
    for name, (modes, b_in, basis, paired) in systems.items():
        # diag_ssm_kernel sums 2·Re over its modes: halve the read-out of an unpaired system.
        C = (1.0 if paired else 0.5) * basis[rows]
        resp[name] = s4d_kernel(*batch1(modes, b_in), jnp.asarray(C)[:, None], jnp.array([dt]),
                                L=L, disc="bilinear")[:, 0]
    # Transfer functions of the read-out of the current value, c = b.
    omega = np.concatenate([np.geomspace(1e-2, 1e4, 800), np.abs(Lam.imag)])
    omega.sort()
    G = {"HiPPO-LegS": hippo.transfer_function(A, b, b, omega)}
    for name, (modes, b_in, basis, paired) in systems.items():
        G[name] = hippo.transfer_function(modes, b_in, b @ basis, omega, conj_symmetric=paired)
    resp = {k: np.asarray(v) / dt for k, v in resp.items()}
    G = {k: np.asarray(v) for k, v in G.items()}

fig, axes = plt.subplots(2, 2, figsize=(10, 5), constrained_layout=True)
t = np.arange(L) * dt
style = {"S4D-LegS": dict(color="C1", lw=0.6), "HiPPO-LegS": dict(color="k", lw=1.5),
         "PTD": dict(color="C2", lw=1.5, ls="--")}
for name in style:  # S4D first: its fast oscillation would hide the others
    for ax, r in zip(axes[0], resp[name]):
        ax.plot(t, r, label=name, **style[name])
    axes[1, 0].loglog(omega, np.abs(G[name]), label=name, **style[name])
for name in systems:
    axes[1, 1].loglog(omega, np.abs(G[name] - G["HiPPO-LegS"]), label=name,
                      **{**style[name], "ls": "-", "lw": 1})
for ax, n in zip(axes[0], rows):
    ax.set(title=f"impulse response of state x_{n}", xlabel="t")
axes[1, 0].set(title="|G(iω)|, read-out c = b", xlabel="ω")
axes[1, 1].set(title="|G(iω) − G_HiPPO(iω)|", xlabel="ω")
axes[0, 0].legend(fontsize=8)
axes[1, 1].legend(fontsize=8)
plt.show()
peak = np.abs(G["HiPPO-LegS"]).max()
for name in systems:
    err_t = np.abs(resp[name] - resp["HiPPO-LegS"]).max() / np.abs(resp["HiPPO-LegS"]).max()
    err_w = np.abs(G[name] - G["HiPPO-LegS"]).max() / peak
    print(f"{name:9s}: max error of the impulse responses {err_t:.2f}, of the transfer "
          f"function {err_w:.2g} (relative to HiPPO's peaks)")

# %% [markdown]
# In time, S4D-LegS follows LegS only on average: its impulse responses carry a fast
# oscillation from the high-frequency modes (they converge only *weakly* as $N$ grows); PTD's
# follow HiPPO's closely. In frequency, the deviation shows as
# spikes: at each mode's resonance $\omega = |\mathrm{Im}\,\Lambda_n|$ the S4D-LegS transfer
# function overshoots by orders of magnitude, because the dropped low-rank term is what damps
# those resonances in HiPPO. PTD stays within a fraction of the peak at every frequency: the
# perturbation is small in norm, so (with a well-conditioned basis) the transfer function moves
# little. This is what makes S4D sensitive to inputs at those frequencies and S4-PTD robust
# (`experiments/robustness`).
#
# Why not diagonalise the DPLR system exactly? `dplr_diagonalize` does that (the eigenvectors
# of the discrete $\bar A$), and the kernel it gives drifts from the Cauchy kernel as soon as
# $N$ is moderate, even in float64, because those eigenvectors are nearly parallel (notebook 01):

# %%
@jax.jit
def cauchy_vs_eig(Lam, P, B, C, dt):
    K_cauchy = dplr_ssm_kernel(Lam, P, B, C, dt, 512)
    lam, b_d, c_d = dplr_diagonalize(Lam, P, B, C, dt)
    K_eig = jnp.real(jnp.einsum("chn,hn,hnl->chl", c_d, b_d, lam[..., None] ** jnp.arange(512)))
    return jnp.abs(K_eig[0] - K_cauchy).max() / jnp.abs(K_cauchy).max()


with jax.enable_x64(True):
    for n in [8, 16, 32]:
        Lam, Pt, Bt, V = hippo.nplr("legs", n)
        C = rng.normal(size=n // 2) + 1j * rng.normal(size=n // 2)
        rel = cauchy_vs_eig(*batch1(Lam), jnp.asarray(Pt)[:, None], *batch1(Bt, C), jnp.array([dt]))
        print(f"N = {n:2d}: relative error of the eigendecomposed kernel {float(rel):.1e}")

# %% [markdown]
# ## 4. Convolution and recurrence compute the same function
#
# Every S4-family layer has a parallel form for training (FFT convolution with the kernel, or a
# chunked scan) and a step form for autoregressive decoding (`layer.step(state, x_t)`). They
# must agree. Below: four layers with $H = 4$ features and state size $N = 32$ on a batch of two
# sequences of length 256, run in their parallel modes (`fft`, `chunked`; S5's `associative`
# scan) and by 256 calls of `step`.

# %%
Bsz, L, H, N = 2, 256, 4, 32
x = jax.random.normal(jax.random.key(1), (Bsz, L, H))
apply = nnx.jit(lambda layer, x: layer(x))


@nnx.jit
def run_steps(layer, x):
    # L calls of layer.step, as a decoder would make them (inside one lax.scan).
    def one(state, x_t):
        return layer.step(state, x_t)

    _, ys = jax.lax.scan(one, layer.init_state(x.shape[0]), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


layers = {
    "S4 (LegS)": (lambda mode: S4(H, N, mode=mode, rngs=nnx.Rngs(0)), ["fft"]),
    "S4D (LegS)": (lambda mode: S4D(H, N, mode=mode, rngs=nnx.Rngs(0)), ["fft", "chunked"]),
    "S4-PTD": (lambda mode: S4PTD(H, N, mode=mode, rngs=nnx.Rngs(0)), ["fft"]),
    "S5": (lambda mode: S5(H, N, mode=mode, rngs=nnx.Rngs(0)), ["associative"]),
}
outputs = {}
for name, (make, modes) in layers.items():
    y_step = run_steps(make(modes[0]), x)
    diffs = []
    for mode in modes:
        y = apply(make(mode), x)
        outputs[name, mode] = y
        diffs.append(f"{mode}: {float(jnp.abs(y - y_step).max()):.1e}")
    outputs[name, "step"] = y_step
    print(f"{name:11s} max |parallel − step|   " + "   ".join(diffs))

# %% [markdown]
# All differences are at float32 rounding level ($10^{-6}$ on outputs of size 1), and they do
# not accumulate along the sequence:

# %%
fig, ax = plt.subplots(figsize=(6, 2.8))
for name, (_, modes) in layers.items():
    err = jnp.abs(outputs[name, modes[0]] - outputs[name, "step"]).max(axis=(0, 2))
    ax.semilogy(np.asarray(err), lw=0.8, label=f"{name} ({modes[0]})")
ax.set(xlabel="position t", ylabel="max |parallel − step|")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Chunked inference relies on the same equivalence: running the first half with
# `return_state=True` and continuing from that state gives the outputs of one call over the
# whole sequence.

# %%
layer = S4D(H, N, mode="chunked", rngs=nnx.Rngs(0))
first = nnx.jit(lambda layer, x: layer(x, return_state=True))
rest = nnx.jit(lambda layer, x, state: layer(x, state=state))
y1, state = first(layer, x[:, :100])
y2 = rest(layer, x[:, 100:], state)
y_both = jnp.concatenate([y1, y2], axis=1)
print("S4D, two calls vs one:", float(jnp.abs(y_both - outputs["S4D (LegS)", "chunked"]).max()))
"""

NB03_MATRIX_MIXERS = r"""
# %% [markdown]
# # 03 · Matrix mixers: every layer is a matrix
#
# Every sequence mixer in ssmix is a linear map along the sequence, $y = M x$, with an
# $L \times L$ matrix $M$ per channel or head: fixed for the LTI layers (S4, S4D, S5), built from
# the input for Hydra, the data-dependent matrix mixers and attention. Each layer's
# `materialize` returns that matrix. The *structure* of $M$ is what buys a fast algorithm: a
# Toeplitz matrix is a convolution (FFT), a semiseparable one a scan, a low-rank one two thin
# matrix products. This notebook draws the matrices and times each structured form against
# the dense product.

# %%
{setup}
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ssmix.kernels.attention import softmax_attention
from ssmix.kernels.fftconv import fft_conv
from ssmix.kernels.ssd import quasiseparable, quasiseparable_matrix
from ssmix.layers import S4D, S5, Hydra, MatrixMixer

L, d_model = 64, 16
x = jax.random.normal(jax.random.key(0), (1, L, d_model))
# materialize is pure JAX: jit it (one compile per layer type beats op-by-op dispatch).
matrix_of_length = nnx.jit(lambda layer: layer.materialize(L))
matrix_of_input = nnx.jit(lambda layer, x: layer.materialize(x))


def heatmap(ax, M, title):
    # Symmetric colour scale around zero, so sign and structure both show.
    M = np.asarray(M)
    lim = np.abs(M).max()
    ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)

# %% [markdown]
# ## 1. LTI state space models: Toeplitz matrices
#
# An S4D layer with $H$ features has one matrix per feature, $M[t, s] = K_{t-s}$ (plus $D$ on
# the diagonal): lower triangular and **Toeplitz**, constant along every diagonal. The
# bidirectional layer adds a second kernel above the diagonal. S5 is a single
# multi-input multi-output SSM, so its `materialize` returns $H \times H$ blocks
# $M_{ij}$ (input feature $j$ to output feature $i$), each Toeplitz; drawn below as one
# $HL \times HL$ matrix for $H = 4$.

# %%
s4d = S4D(4, 16, rngs=nnx.Rngs(0))
s4d_bi = S4D(4, 16, bidirectional=True, rngs=nnx.Rngs(0))
s5 = S5(4, 16, rngs=nnx.Rngs(0))
M_s4d = matrix_of_length(s4d)  # (H, L, L)
M_bi = matrix_of_length(s4d_bi)
M_s5 = matrix_of_length(s5)  # (H, H, L, L): [output feature, input feature, t, s]
H = M_s5.shape[0]
M_s5_flat = jnp.transpose(M_s5, (0, 2, 1, 3)).reshape(H * L, H * L)

fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), constrained_layout=True)
heatmap(axes[0], M_s4d[0], "S4D (causal), feature 0")
heatmap(axes[1], M_bi[0], "S4D bidirectional, feature 0")
heatmap(axes[2], M_s5_flat, "S5: 4 × 4 blocks of L × L")
plt.show()


def toeplitz_defect(M):
    # Largest change along a diagonal: zero for a Toeplitz matrix.
    return float(jnp.abs(M[..., 1:, 1:] - M[..., :-1, :-1]).max())


print(f"Toeplitz defect: S4D {toeplitz_defect(M_s4d):.1e}, bidirectional "
      f"{toeplitz_defect(M_bi):.1e}, S5 blocks {toeplitz_defect(M_s5):.1e}")
u = jax.random.normal(jax.random.key(1), (1, L, 4))
print("S4D layer vs its matrix:", float(jnp.abs(s4d(u) - jnp.einsum("hts,bsh->bth", M_s4d, u)).max()))
print("S5 layer vs its matrix: ", float(jnp.abs(s5(u) - jnp.einsum("ijts,bsj->bti", M_s5, u)).max()))

# %% [markdown]
# ## 2. Hydra: a quasiseparable matrix
#
# Hydra mixes with a data-dependent **quasiseparable** matrix: a forward selective SSM below the
# diagonal, a backward one above it, and a free diagonal $\delta_t$. Each off-diagonal part is
# *semiseparable*: every submatrix taken entirely below (or above) the diagonal has rank at most
# the state size $N$, however large it is. That is what lets two scans compute $Mx$ in linear
# time. Below: head 0 of `Hydra(d_model=16, d_state=4, headdim=8)` on a random input, and its
# three parts.

# %%
hydra = Hydra(d_model, d_state=4, headdim=8, rngs=nnx.Rngs(0))
M_hydra = matrix_of_input(hydra, x)[0, 0]  # (L, L), head 0
parts = {
    "Hydra M (head 0)": M_hydra,
    "lower: forward SSM": jnp.tril(M_hydra, -1),
    "upper: backward SSM": jnp.triu(M_hydra, 1),
    "diagonal δ": jnp.diag(jnp.diag(M_hydra)),
}
fig, axes = plt.subplots(1, 4, figsize=(11, 3), constrained_layout=True)
for ax, (name, M) in zip(axes, parts.items()):
    heatmap(ax, M, name)
plt.show()


def numerical_rank(M):
    s = np.linalg.svd(np.asarray(M, np.float64), compute_uv=False)
    return int(np.sum(s > 1e-5 * s[0]))


print("rank of blocks strictly below the diagonal:",
      [numerical_rank(M_hydra[k:, :k]) for k in (8, 32, 56)], "(state size 4)")
print("rank of blocks strictly above the diagonal:",
      [numerical_rank(M_hydra[:k, k:]) for k in (8, 32, 56)])
print("rank of the whole matrix:", numerical_rank(M_hydra), "of", L)

# %% [markdown]
# ## 3. The matrix-mixer family
#
# `MatrixMixer(kind=...)` puts one structured matrix inside the same gated wrapper as Hydra
# (input projection, short convolution, gated norm, output projection), so structures can be
# compared on equal terms. With `data_dependent=True` (the default) the matrix is built from the
# input: taps for **Toeplitz**, $q, k$ features for **Vandermonde**
# ($\sum_d \cos(2\pi q_{td}s/L) - \cos(2\pi k_{sd}t/L)$), **Cauchy** ($\sum_d 1/(q_{td} + k_{sd})$),
# **low rank** ($q_t \cdot k_s$) and **attention** (softmax rows); $B, C, \Delta$ for the
# **semiseparable** (SSD, causal) and **quasiseparable** kinds. **Dense** is a learned matrix.
# Head 0 of each, with the skip $D$ on the diagonal included:

# %%
kinds = ["dense", "toeplitz", "vandermonde", "cauchy", "low_rank", "attention", "semiseparable",
         "quasiseparable"]
mixers, M_kind = {}, {}
for kind in kinds:
    mixers[kind] = MatrixMixer(d_model, kind, max_len=L, data_dependent=kind != "dense",
                               headdim=8, qk_dim=4, rngs=nnx.Rngs(0))
    M_kind[kind] = matrix_of_input(mixers[kind], x)[0, 0]
fig, axes = plt.subplots(2, 4, figsize=(11, 5.4), constrained_layout=True)
for ax, kind in zip(axes.flat, kinds):
    heatmap(ax, M_kind[kind], kind)
plt.show()

# %% [markdown]
# The structure shows in numbers too. Low rank: removing the skip $D$ leaves rank at most
# $d = 4$. Toeplitz: constant diagonals. Semiseparable: lower triangular, with rank-limited
# blocks below the diagonal. And for the kinds whose fast form is not the dense product (a
# structured product, or for Vandermonde, Cauchy and attention the matrix built and applied a
# tile of rows at a time, so that memory stays bounded), the layer's output with `mode="fast"`
# equals the one with `mode="materialized"`:

# %%
D0 = float(mixers["low_rank"].D[...][0])
print("low rank, rank of M − D·I:", numerical_rank(M_kind["low_rank"] - D0 * jnp.eye(L)))
print(f"Toeplitz defect: {toeplitz_defect(M_kind['toeplitz']):.1e}")
M_ss = M_kind["semiseparable"]
print("semiseparable: max above diagonal", float(jnp.abs(jnp.triu(M_ss, 1)).max()),
      "| ranks below:", [numerical_rank(M_ss[k:, :k]) for k in (16, 32, 48)])
apply = nnx.jit(lambda layer, x: layer(x))
for kind in ["toeplitz", "low_rank", "semiseparable", "quasiseparable", "vandermonde", "cauchy",
             "attention"]:
    fast = apply(mixers[kind], x)
    twin = MatrixMixer(d_model, kind, max_len=L, headdim=8, qk_dim=4, mode="materialized",
                       rngs=nnx.Rngs(0))  # same seed: same parameters
    print(f"{kind:15s} max |fast − materialized| = {float(jnp.abs(fast - apply(twin, x)).max()):.1e}")

# %% [markdown]
# ## 4. Cost of each form against L
#
# The same product $y = Mx$ computed two ways, with the kernels of `ssmix.kernels` (one batch,
# 16 channels, jit-compiled, best of three runs):
#
# | structure | structured form | cost | dense form |
# |---|---|---|---|
# | Toeplitz (S4, S4D, S5 kernels) | `fft_conv` | $O(L \log L)$ | build $M$, multiply: $O(L^2)$ |
# | quasiseparable (Hydra) | `quasiseparable(method="chunked")` | $O(L)$ | `method="materialized"` |
# | low rank | $q\,(k^\top v)$ | $O(L)$ | $(q k^\top)\,v$ |
# | softmax attention | blocked online softmax | $O(L^2)$, $O(L)$ memory | weights matrix |
#
# Each dense form is checked against its structured twin at every length (printed max
# difference, relative to the output's scale).

# %%
def best_time(f, *args, reps=3):
    # Best of a few runs after one warm-up call (which also compiles): seconds.
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def toeplitz_product(u, k):
    # Dense form of the causal convolution: M[h, t, s] = k[h, t − s] below the diagonal.
    n = u.shape[1]
    lag = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
    M = jnp.where(lag >= 0, k[:, jnp.clip(lag, 0, n - 1)], 0.0)
    return jnp.einsum("hts,bsh->bth", M, u)


def qs_inputs(n, key):
    # Hydra-like inputs with 2 heads of 8 channels, state size 16.
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (1, n, 2, 8))
    dt = [jax.nn.softplus(jax.random.normal(k, (1, n, 2))) * 0.1 for k in ks[1:3]]
    B_fw, C_fw, B_bw, C_bw = (jax.random.normal(k, (1, n, 1, 16)) / 4 for k in ks[3:7])
    return x, dt[0], dt[1], -jnp.ones(2), B_fw, C_fw, B_bw, C_bw, jnp.ones((1, n, 2))


forms = {
    "Toeplitz": {
        "inputs": lambda n, key: (jax.random.normal(key, (1, n, 16)),
                                  jax.random.normal(key, (16, n)) * jnp.exp(-jnp.arange(n) / 50)),
        "fft_conv": jax.jit(fft_conv),
        "dense": jax.jit(toeplitz_product),
    },
    "quasiseparable": {
        "inputs": qs_inputs,
        "chunked": lambda *a: quasiseparable(*a, method="chunked"),
        "dense": jax.jit(lambda x, *a: jnp.einsum("bhts,bshp->bthp", quasiseparable_matrix(*a), x)),
    },
    "low rank": {
        "inputs": lambda n, key: tuple(jax.random.normal(k, (1, n, 16)) for k in jax.random.split(key, 3)),
        "q(kᵀv)": jax.jit(lambda q, k, v: jnp.einsum("bsd,bse,btd->bte", k, v, q)),
        "dense": jax.jit(lambda q, k, v: jnp.einsum("btd,bsd,bse->bte", q, k, v, optimize=False)),
    },
    "softmax attention": {
        "inputs": lambda n, key: tuple(jax.random.normal(k, (1, 1, n, 16)) for k in jax.random.split(key, 3)),
        "blocked": jax.jit(lambda q, k, v: softmax_attention(q, k, v, block_size=128)),
        "dense": jax.jit(lambda q, k, v: softmax_attention(q, k, v)),
    },
}
lengths = [64, 256, 1024]
timings = {}
for structure, spec in forms.items():
    names = [name for name in spec if name != "inputs"]
    for n in lengths:
        args = spec["inputs"](n, jax.random.key(n))
        outs = [spec[name](*args) for name in names]
        scale = float(jnp.abs(outs[1]).max())
        diff = float(jnp.abs(outs[0] - outs[1]).max()) / scale
        for name in names:
            timings[structure, name, n] = best_time(spec[name], *args)
        print(f"{structure:18s} L = {n:4d}: " + ",  ".join(
            f"{name} {timings[structure, name, n] * 1e3:7.2f} ms" for name in names)
            + f"   (relative difference {diff:.0e})")

fig, axes = plt.subplots(1, 4, figsize=(12, 2.8), constrained_layout=True)
for ax, (structure, spec) in zip(axes, forms.items()):
    for name in spec:
        if name != "inputs":
            ax.loglog(lengths, [timings[structure, name, n] for n in lengths], "o-", label=name)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set(title=structure, xlabel="L")
    ax.legend(fontsize=8)
axes[0].set_ylabel("seconds (best of 3)")
plt.show()

# %% [markdown]
# The dense forms grow like $L^2$ (4× longer, about 16× slower once the fixed costs are
# amortised); the structured ones about linearly, so the gap widens with $L$. Attention has no
# sub-quadratic structure: blocking changes its memory, not its cost. These timings are taken
# on whatever machine ran the notebook; `benchmarks/` has the careful comparisons.
"""

NB04_ATTENTION = r"""
# %% [markdown]
# # 04 · Attention: full, Kronecker and tensor
#
# Softmax attention mixes a sequence by an $L \times L$ matrix of weights computed from the
# input, at $O(L^2)$ cost. This notebook looks at two departures from it, both in
# `ssmix.kernels.attention` (and the layers `KroneckerAttention`, `TensorAttention`):
#
# * **Kronecker attention (KAO)** on an $h \times w$ grid attends to the $h + w$ row and
#   column means instead of all $hw$ positions: cost $O(hw\,(h + w))$ instead of $O((hw)^2)$.
# * **Tensor attention** goes the other way: each query attends to *pairs* of keys $(i, j)$,
#   one softmax over all $n^2$ pairs, $O(n^3)$. Its blocked, 2-simplicial (windowed) and
#   approximate (Taylor features) forms trade exactness, window and cost.

# %%
{setup}
import time

import jax
import jax.numpy as jnp
from flax import nnx
from matplotlib.colors import LogNorm

from ssmix.kernels.attention import (
    kao,
    kao_mixing_matrix,
    softmax_attention,
    softmax_attention_weights,
    tensor_attention,
    tensor_attention_error_bound,
)
from ssmix.layers import TensorAttention


def best_time(f, *args, reps=5):
    # Best of a few runs after one warm-up call (which also compiles): seconds. The minimum is
    # the least disturbed by other work on the machine.
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return min(times)

# %% [markdown]
# ## 1. Kronecker attention vs full attention
#
# An $8 \times 8$ grid with $c = 16$ channels whose features vary smoothly in space (random
# Fourier features of the position), used as queries and keys. Full attention gives every
# position its own row of 64 weights. KAO-KV lets each position attend to the 8 row means and
# 8 column means, so its mixing matrix (`kao_mixing_matrix`, the operator applied to the
# values) is built from those 16 averages; KAO-QKV lets the means attend to each other and
# spreads the result back along rows and columns.

# %%
h = w = 8
c = 16
rng = np.random.default_rng(0)
freqs = rng.normal(size=(2, c)) * 0.6
phase = rng.uniform(0, 2 * np.pi, size=c)
ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
grid = np.cos(ii[..., None] * freqs[0] + jj[..., None] * freqs[1] + phase) * 2
x = jnp.asarray(grid[None], jnp.float32)  # (1, h, w, c)
x_seq = x.reshape(1, 1, h * w, c)  # (B, heads, L, c) for softmax attention

matrices = {
    "full softmax": softmax_attention_weights(x_seq, x_seq)[0, 0],
    "KAO-KV": kao_mixing_matrix(x, variant="kv")[0, 0],
    "KAO-QKV": kao_mixing_matrix(x, variant="qkv")[0, 0],
}
fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), constrained_layout=True)
for ax, (name, M) in zip(axes, matrices.items()):
    im = ax.imshow(np.asarray(M), cmap="viridis")
    ax.grid(False)
    ax.set_title(name)
    ax.set_xlabel("key position (row-major)")
    fig.colorbar(im, ax=ax, shrink=0.8)
axes[0].set_ylabel("query position")
plt.show()

v = jax.random.normal(jax.random.key(1), (1, h, w, c))
for name, M in matrices.items():
    s = np.linalg.svd(np.asarray(M, np.float64), compute_uv=False)
    print(f"{name:12s} numerical rank {np.sum(s > 1e-5 * s[0]):2d} of {h * w}")
for variant in ["kv", "qkv"]:
    direct = kao(x, variant=variant, values=v).reshape(h * w, c)
    via_matrix = matrices[f"KAO-{variant.upper()}"] @ v.reshape(h * w, c)
    print(f"kao({variant!r}) vs its mixing matrix: max diff {float(jnp.abs(direct - via_matrix).max()):.1e}")

# %% [markdown]
# The full weights are local (smooth features: nearby positions have similar keys) and of
# full rank. KAO's matrix has rank at most $h + w - 1 = 15$: every output is a mix of row
# and column averages, visible as the repeated 8-wide stripes (positions in the same grid
# column share a column mean). KAO-QKV's rows depend only on the query's row and column.
# The printed checks confirm that `kao` applies exactly this matrix.
#
# ## 2. Cost against grid size
#
# Square grids of side $s$ ($L = s^2$ positions, 32 channels); one call each, best of five,
# after compilation. Full attention grows like $L^2$, KAO-KV like $L^{3/2}$, KAO-QKV like $L$
# (building the means).

# %%
c = 32
full = jax.jit(lambda x: softmax_attention(x, x, x))
kao_kv = jax.jit(lambda g: kao(g, variant="kv"))
kao_qkv = jax.jit(lambda g: kao(g, variant="qkv"))
sides = [8, 16, 32, 48]
costs = {"full softmax": [], "KAO-KV": [], "KAO-QKV": []}
for s in sides:
    g = jax.random.normal(jax.random.key(s), (1, s, s, c))
    costs["full softmax"].append(best_time(full, g.reshape(1, 1, s * s, c)))
    costs["KAO-KV"].append(best_time(kao_kv, g))
    costs["KAO-QKV"].append(best_time(kao_qkv, g))

lengths = np.array(sides) ** 2
print(f"{'L':>6s}" + "".join(f"{name:>15s}" for name in costs) + "   full / KAO-KV")
for i, n in enumerate(lengths):
    row = "".join(f"{costs[name][i] * 1e3:12.3f} ms" for name in costs)
    print(f"{n:6d}{row}   {costs['full softmax'][i] / costs['KAO-KV'][i]:8.1f}×")
fig, ax = plt.subplots(figsize=(5, 3))
for name, t in costs.items():
    ax.loglog(lengths, t, "o-", label=name)
ax.set(xlabel="positions L = s²", ylabel="seconds (best of 5)")
ax.legend()
plt.show()

# %% [markdown]
# At small grids every call costs the same fixed dispatch overhead; from a few hundred
# positions on, the quadratic cost of full attention takes over.
#
# ## 3. Tensor attention
#
# For queries $q_\ell$ and two sets of keys and values,
# $\mathrm{out}_\ell = \sum_{i,j} \mathrm{softmax}_{(i,j)}\big(\tfrac{1}{\sqrt d}\sum_k q_{\ell k}
# k^1_{ik} k^2_{jk}\big)\,(v^1_i \circ v^2_j)$: every query weighs all $n^2$ key pairs.
# `TensorAttention.materialize` returns these $n \times n^2$ weights. Below, the pair weights of
# one query (position 40 of 48) in three configurations: all pairs, causal ($i, j \le 40$), and
# 2-simplicial with windows $w_1 = 12$, $w_2 = 6$ (only the most recent keys of each set). The
# colour scale is logarithmic and pairs of weight zero are white, so the support is visible.

# %%
n, features = 48, 16
x = jax.random.normal(jax.random.key(2), (1, n, features))
configs = {
    "all pairs": dict(method="blocked"),
    "causal": dict(method="blocked", causal=True),
    "simplicial w1=12, w2=6": dict(method="simplicial", w1=12, w2=6),
}
fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), constrained_layout=True)
for ax, (name, kw) in zip(axes, configs.items()):
    layer = TensorAttention(features, head_dim=8, rngs=nnx.Rngs(0), **kw)
    W = layer.materialize(x)[0, 0, 40]  # (n, n) weights over key pairs (i, j)
    im = ax.imshow(np.ma.masked_equal(np.asarray(W), 0), cmap="magma_r",
                   norm=LogNorm(vmin=1e-6, vmax=1))
    ax.grid(False)
    ax.set(title=name, xlabel="key j (second set)")
    print(f"{name:24s}: pairs with weight > 0: {int(jnp.sum(W > 0)):4d}, total weight "
          f"{float(W.sum()):.4f}")
axes[0].set_ylabel("key i (first set)")
fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
plt.show()

# %% [markdown]
# The four kernel methods agree on the same inputs: `"blocked"` (online softmax over blocks of
# pairs, never storing the $n^2$ pair scores) and `"simplicial"` (windows) exactly, and
# `"approx"` (Taylor features, section 5) up to its approximation error.

# %%
n, d = 64, 8
q, k1, k2, v1, v2 = (jax.random.uniform(jax.random.key(i), (2, n, d), minval=-0.5, maxval=0.5)
                     for i in range(5))
attend = jax.jit(tensor_attention, static_argnames=("method", "causal", "w1", "w2", "degree"))
ref = attend(q, k1, k2, v1, v2, method="naive")
ref_causal = attend(q, k1, k2, v1, v2, method="naive", causal=True)
ref_window = attend(q, k1, k2, v1, v2, method="naive", causal=True, w1=16, w2=8)
checks = {
    "blocked vs naive": (attend(q, k1, k2, v1, v2, method="blocked"), ref),
    "simplicial (no window) vs naive causal": (
        attend(q, k1, k2, v1, v2, method="simplicial", causal=True), ref_causal),
    "simplicial (w1=16, w2=8) vs naive windowed": (
        attend(q, k1, k2, v1, v2, method="simplicial", causal=True, w1=16, w2=8), ref_window),
    "approx (degree 4) vs naive": (attend(q, k1, k2, v1, v2, method="approx"), ref),
}
for name, (got, want) in checks.items():
    print(f"{name:44s} max diff {float(jnp.abs(got - want).max()):.1e}")

# %% [markdown]
# ## 4. The cubic cost, and the ways around it
#
# Forward time against $n$ ($d = 8$, one sequence; best of five after compilation). `naive`
# and `blocked` touch all $n^2$ pairs per query: $O(n^3)$, about 8× per doubling of $n$
# (`blocked` with far less memory). `simplicial` with fixed windows $w_1 = w_2 = 16$ costs
# $O(n\,w_1 w_2)$ and `approx` $O(n\,D)$ with $D = \binom{d + p}{p}$ features: both linear.

# %%
methods = {
    "naive": dict(method="naive"),
    "blocked": dict(method="blocked"),
    "simplicial w=16": dict(method="simplicial", causal=True, w1=16, w2=16),
    "approx p=4": dict(method="approx"),
}
ns = [64, 128, 256]
tensor_costs = {name: [] for name in methods}
for n in ns:
    args = [jax.random.uniform(jax.random.key(i), (1, n, 8), minval=-0.5, maxval=0.5)
            for i in range(5)]
    for name, kw in methods.items():
        tensor_costs[name].append(best_time(lambda *a, kw=kw: attend(*a, **kw), *args))

print(f"{'n':>5s}" + "".join(f"{name:>17s}" for name in methods))
for i, n in enumerate(ns):
    print(f"{n:5d}" + "".join(f"{tensor_costs[name][i] * 1e3:14.2f} ms" for name in methods))
growth = {name: t[-1] / t[-2] for name, t in tensor_costs.items()}
print("time ratio n = 256 / n = 128:  " + ",  ".join(f"{k} {v:.1f}×" for k, v in growth.items()))
fig, ax = plt.subplots(figsize=(5, 3))
for name, t in tensor_costs.items():
    ax.loglog(ns, t, "o-", label=name)
ax.loglog(ns, tensor_costs["naive"][-1] * (np.array(ns) / ns[-1]) ** 3, "k:", label="∝ n³")
ax.set(xlabel="sequence length n", ylabel="seconds (best of 5)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 5. Approximation error against the entry bound
#
# `"approx"` replaces $e^x$ by its Taylor polynomial of even degree $p$. Because the score is
# trilinear, $x^m$ factorises into monomial features of $q$, $k^1$ and $k^2$, which makes the
# sums over $i$ and $j$ separate. It is accurate only while every score is small:
# `tensor_attention_error_bound` bounds $|x| \le R = \tfrac{1}{\sqrt d}\sum_k \max|q_k|
# \max|k^1_k| \max|k^2_k|$ and the output error by $\frac{2\varepsilon}{1 - \varepsilon}
# \max|v^1 \circ v^2|$ with $\varepsilon = R^{p+1}e^R/(p+1)!$. Below, entries of $q, k^1, k^2$
# uniform in $[-a, a]$ ($d = 8$, so $R = 2\sqrt2\,a^3$), for three degrees: the measured
# maximum error (solid) and the bound (dashed). In float64, so that rounding does not hide the
# smallest errors.

# %%
n, d = 64, 8
bounds = np.linspace(0.2, 1.3, 12)
degrees = [2, 4, 6]
measured = {p: [] for p in degrees}
guaranteed = {p: [] for p in degrees}
with jax.enable_x64(True):
    for a in bounds:
        q, k1, k2 = (jax.random.uniform(jax.random.key(i), (1, n, d), jnp.float64, -a, a)
                     for i in range(3))
        v1, v2 = (jax.random.uniform(jax.random.key(i), (1, n, d), jnp.float64, -1, 1)
                  for i in (3, 4))
        want = attend(q, k1, k2, v1, v2, method="naive")
        for p in degrees:
            err = jnp.abs(attend(q, k1, k2, v1, v2, method="approx", degree=p) - want).max()
            _, bound = tensor_attention_error_bound(q, k1, k2, v1, v2, degree=p)
            measured[p].append(float(err))
            guaranteed[p].append(float(bound.max()))

fig, ax = plt.subplots(figsize=(6, 3.2))
for i, p in enumerate(degrees):
    ax.semilogy(bounds, measured[p], "o-", color=f"C{i}", ms=3, label=f"p = {p} measured")
    ax.semilogy(bounds, guaranteed[p], "--", color=f"C{i}", label=f"p = {p} bound")
ax.set(xlabel="entry bound a  (|q|, |k¹|, |k²| ≤ a)", ylabel="max output error",
       ylim=(1e-14, 10))
ax.legend(fontsize=7, ncol=2)
plt.show()
holds = all(m <= g for p in degrees for m, g in zip(measured[p], guaranteed[p]))
print("bound holds at every point:", holds)
for p in degrees:
    i = int(np.argmin(np.abs(bounds - 0.5)))
    print(f"p = {p}: at a = {bounds[i]:.1f} measured {measured[p][i]:.1e}, bound {guaranteed[p][i]:.1e}")

# %% [markdown]
# The bound holds everywhere and is tight within an order of magnitude or two. Below
# $a \approx 0.6$ ($R \lesssim 0.6$) degree 4 is accurate to about $10^{-5}$; by $a \approx 1$
# ($R \approx 3$) every degree breaks down, and the bound says so (it becomes infinite once
# $\varepsilon \ge 1$). In a model, keep $q, k^1, k^2$ small (e.g. normalise them) before using
# the approximate method.
"""

NB05_CAUSAL_MODELS = r"""
# %% [markdown]
# # 05 · Causal models: train, then generate with `step`
#
# A causal sequence model predicts token $t + 1$ from tokens $0 \dots t$. ssmix builds one
# from the same parts as its classifiers: `SequenceModel(..., head="token")` returns
# per-position logits $(B, L, V)$ instead of a pooled class. Trained in parallel (here S4D's
# FFT convolution over the whole sequence), the same weights then decode **recurrently**:
# `model.init_state(B)` and `model.step(state, token)` advance every block's SSM state by one
# position at constant cost per token, equal to the convolutional forward pass position by
# position. This notebook
#
# 1. makes a toy generative task offline and trains a small causal S4D model on it,
# 2. checks that stepping reproduces the forward pass and samples continuations with `step`,
# 3. times recurrent decoding against re-running the convolutional forward for every new
#    token.

# %%
{setup}
import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssmix.blocks import SequenceModel
from ssmix.layers import S4D

# %% [markdown]
# ## 1. The task: noisy arithmetic progressions
#
# Each sequence counts modulo $V = 10$ from a random start with a random step
# $k \in \{-2, -1, 1, 2, 3\}$: `3 5 7 9 1 3 …`. Each token is replaced by a uniformly random
# one with probability 5 %. A model has to infer $k$ from the context (two clean tokens
# suffice) and then continue the rule while ignoring the noise. Inputs start with a `BOS`
# token and are the targets shifted by one.
#
# Once $k$ is known the best possible next-token distribution puts $0.95 + 0.005$ on the
# rule's token and $0.005$ on each other: its cross-entropy, $0.282$ nats, is the floor of
# the loss at positions $t \ge 2$ (on clean inputs).

# %%
V, BOS, L = 10, 10, 48
STEPS = np.array([-2, -1, 1, 2, 3])
NOISE = 0.05


def make_batch(rng, n, length=L, noise=NOISE):
    # (n, length) token sequences and their steps k.
    k = rng.choice(STEPS, size=n)
    seq = (rng.integers(0, V, size=(n, 1)) + k[:, None] * np.arange(length)) % V
    flip = rng.random((n, length)) < noise
    return np.where(flip, rng.integers(0, V, size=(n, length)), seq), k


def shift(seq):
    # Model input: BOS, then the sequence without its last token.
    return np.concatenate([np.full((len(seq), 1), BOS), seq[:, :-1]], axis=1)


p = 1 - NOISE + NOISE / V
floor = -(p * np.log(p) + (V - 1) * (NOISE / V) * np.log(NOISE / V))
print(make_batch(np.random.default_rng(0), 3)[0][:, :16])
print(f"loss floor at t >= 2: {floor:.3f} nats")

# %% [markdown]
# ## 2. A causal S4D model and its training
#
# Two pre-norm residual blocks of S4D (LegS initialisation, state size 16, FFT mode), width
# 32, a token embedding of the $V + 1$ input ids and a token head of $V$ logits. Every S4D
# layer is causal by default (`bidirectional=False`), which is what makes the model
# steppable. 300 Adam steps on fresh batches of 32 sequences.

# %%
model = SequenceModel(
    functools.partial(S4D, d_state=16, mode="fft"),
    n_layers=2, d_model=32, vocab_size=V + 1, n_classes=V, head="token", rngs=nnx.Rngs(0),
)
n_steps = 300
opt = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(5e-3, n_steps)), wrt=nnx.Param)


@nnx.jit
def train_step(model, opt, x, y):
    def loss_fn(model):
        logits = model(x)  # (B, L, V)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


rng = np.random.default_rng(1)
losses = []
start = time.perf_counter()
for _ in range(n_steps):
    seq, _ = make_batch(rng, 32)
    losses.append(float(train_step(model, opt, jnp.asarray(shift(seq)), jnp.asarray(seq))))
print(f"{n_steps} steps in {time.perf_counter() - start:.1f} s; "
      f"last 20 steps' mean loss {np.mean(losses[-20:]):.3f}")
model.eval()

fig, ax = plt.subplots(figsize=(7, 2.8))
ax.plot(losses, lw=1)
ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor at t ≥ 2 ({floor:.3f})")
ax.set_yscale("log")
ax.set_xlabel("training step")
ax.set_ylabel("cross-entropy (nats)")
ax.set_title("training loss (all positions, t = 0 and 1 included)")
ax.legend()
plt.show()

# %% [markdown]
# The first positions cannot reach the floor (the start and the step are unknown until a few
# tokens have been seen, see below), and noisy inputs make later predictions harder, so the
# mean over all 48 positions stays above it. Per position, on clean test sequences: the
# probability the model gives the rule's next token, from the ordinary (convolutional)
# forward pass. A calibrated model gives it $0.955$, the data's own rate, once it knows the
# rule.

# %%
test_seq, test_k = make_batch(np.random.default_rng(2), 64, noise=0.0)
x_test = jnp.asarray(shift(test_seq))
logits = nnx.jit(lambda model, x: model(x))(model, x_test)
prob = jnp.take_along_axis(jax.nn.softmax(logits), jnp.asarray(test_seq)[..., None], -1)[..., 0]
prob = np.asarray(prob).mean(axis=0)

fig, ax = plt.subplots(figsize=(7, 2.6))
ax.plot(prob, "o-", ms=3)
ax.axhline(p, color="k", ls="--", lw=1, label=f"calibrated ({p:.3f})")
ax.set_xlabel("position t")
ax.set_ylabel("p(rule's token)")
ax.set_ylim(0, 1.02)
ax.legend(loc="lower right")
plt.show()
print(f"mean probability at t >= 2: {prob[2:].mean():.3f} (calibrated {p:.3f})")

# %% [markdown]
# ## 3. Recurrent decoding with `step`
#
# `generate` feeds a prompt through `model.step` (teacher forcing) and then samples each
# next token from the logits of the previous step, all inside one `jax.lax.scan`: the state
# (one complex SSM state per block and feature, and the position) is a pytree of fixed shape.
# The logits it computes on the prompt must equal the forward pass's at the same positions:
# the model is causal, so later tokens cannot change them.

# %%
@nnx.jit(static_argnames="length")
def generate(model, prompt, key, length, temperature=1.0):
    # prompt (B, P) token ids -> (tokens (B, P + length), logits on the prompt (B, P, V)).
    def feed(state, token):
        return model.step(state, token)

    state = model.init_state(prompt.shape[0])
    state, prompt_logits = jax.lax.scan(feed, state, jnp.swapaxes(prompt, 0, 1))

    def sample(carry, key):
        state, logits = carry
        token = jax.random.categorical(key, logits / temperature).astype(prompt.dtype)
        state, logits = model.step(state, token)
        return (state, logits), token

    keys = jax.random.split(key, length)
    _, tokens = jax.lax.scan(sample, (state, prompt_logits[-1]), keys)
    return (jnp.concatenate([prompt, jnp.swapaxes(tokens, 0, 1)], axis=1),
            jnp.swapaxes(prompt_logits, 0, 1))


P = 5  # BOS and four tokens of each test sequence
tokens, prompt_logits = generate(model, x_test[:, :P], jax.random.key(0), length=L - P + 1)
print("max |step logits - forward logits| on the prompts:",
      f"{float(jnp.abs(prompt_logits - logits[:, :P]).max()):.1e}")


def rule_stats(tokens):
    # Drop BOS; a token follows the rule when it is its predecessor + k (mod V).
    gen = np.asarray(tokens[:, 1:])
    follows = np.ones_like(gen, dtype=bool)
    follows[:, 1:] = (gen[:, 1:] - gen[:, :-1]) % V == test_k[:, None] % V
    return gen, follows


fig, axes = plt.subplots(1, 2, figsize=(11, 2.6), constrained_layout=True)
print("temperature | sampled tokens = predecessor + k | on the prompt's progression")
for ax, temperature in zip(axes, (1.0, 0.5)):
    if temperature != 1.0:
        tokens, _ = generate(model, x_test[:, :P], jax.random.key(0), length=L - P + 1,
                             temperature=temperature)
    gen, follows = rule_stats(tokens)
    print(f"{temperature:11.1f} | {follows[:, P - 1:].mean():32.3f} | "
          f"{(gen == test_seq)[:, P - 1:].mean():.3f}")
    show = gen[:6, :32]
    ax.imshow(show, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for i, j in zip(*np.nonzero(~follows[:6, :32])):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="k", lw=1.5))
    for (i, j), token in np.ndenumerate(show):
        ax.text(j, i, token, ha="center", va="center", fontsize=6, color="w")
    ax.axvline(P - 1.5, color="k", lw=2)
    ax.set_yticks(range(6), [f"k = {k:+d}" for k in test_k[:6]])
    ax.set_xlabel("position (left of the bar: prompt; right: sampled with step)")
    ax.set_title(f"temperature {temperature} (boxed: not its predecessor + k)")
    ax.grid(False)
plt.show()

# %% [markdown]
# At temperature 1 the model samples the 5 % noise it has learned as part of the data's
# distribution. An off-rule token is then evidence for another start or another step, and
# since the model infers the rule from the recent context, it sometimes follows the new one:
# errors compound, and a sequence can drift to another rule. Sharpening the
# distribution (temperature 0.5) removes most of that noise, and the continuations follow
# their prompt's rule.
#
# ## 4. Recurrent against convolutional decoding
#
# Without a recurrent form, generating token $t + 1$ means running the whole forward pass
# again over the tokens so far. Here that baseline runs the FFT forward over a buffer of the
# final length (padding after $t$ does not reach position $t$, the model is causal) and reads
# position $t$: $n$ forward passes of cost $O(n \log n)$ each for $n$ tokens, against $n$
# steps of constant cost. Batch 1, best of a few runs after compilation, on this machine's
# CPU.

# %%
@nnx.jit(static_argnames="length")
def decode_by_convolution(model, prompt, key, length):
    # Sample `length` tokens after a one-token prompt by re-running the forward pass.
    buf = jnp.zeros((prompt.shape[0], length + 1), prompt.dtype).at[:, 0].set(prompt[:, 0])

    def body(t, buf):
        logits = model(buf)[:, t]  # the full causal forward; position t
        token = jax.random.categorical(jax.random.fold_in(key, t), logits)
        return buf.at[:, t + 1].set(token.astype(buf.dtype))

    return jax.lax.fori_loop(0, length, body, buf)


def best_time(f, *args, reps=3, **kwargs):
    # Best of `reps` runs after one warm-up call (which also compiles): seconds.
    jax.block_until_ready(f(*args, **kwargs))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return min(times)


bos = jnp.full((1, 1), BOS)
rows = []
for n in (32, 128, 512):
    t_rec = best_time(generate, model, bos, jax.random.key(1), length=n, reps=5)
    t_conv = best_time(decode_by_convolution, model, bos, jax.random.key(1), length=n,
                       reps=1 if n > 128 else 3)
    rows.append((n, t_rec, t_conv))

print("tokens | recurrent (step) | per token | convolution re-run | per token | ratio")
for n, t_rec, t_conv in rows:
    print(f"{n:6d} | {1e3 * t_rec:13.1f} ms | {1e6 * t_rec / n:6.0f} µs | "
          f"{1e3 * t_conv:15.1f} ms | {1e6 * t_conv / n:6.0f} µs | {t_conv / t_rec:5.0f}×")

n_, rec_, conv_ = (np.array(c) for c in zip(*rows))
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.loglog(n_, 1e3 * rec_, "o-", label="recurrent: model.step")
ax.loglog(n_, 1e3 * conv_, "s-", label="re-run the FFT forward per token")
ax.set_xticks(n_, [str(n) for n in n_], minor=False)
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.set_xlabel("tokens generated")
ax.set_ylabel("time (ms)")
ax.legend()
plt.show()

# %% [markdown]
# The recurrent decoder's cost per token is constant (the shortest run is dominated by the
# fixed cost of a call), so its time grows linearly with the number of tokens, while
# re-running the forward pass grows faster than quadratically: every new token pays for the
# whole sequence again. The training-time form (FFT convolution over the whole sequence) and
# the inference-time form (the recurrence) are the same model; ssmix's tests check that
# `SequenceModel.step` equals the forward pass position by position in float64 for S4, S4D,
# S5, their PTD variants, Mamba-2 and causal attention (whose state is a KV cache, so its
# step cost grows with the position).
"""

NOTEBOOKS = {
    "01_hippo": NB01_HIPPO,
    "02_ssm_kernels": NB02_SSM_KERNELS,
    "03_matrix_mixers": NB03_MATRIX_MIXERS,
    "04_attention": NB04_ATTENTION,
    "05_causal_models": NB05_CAUSAL_MODELS,
}


def parse(source: str) -> list:
    """Split a percent-format source into nbformat cells (markdown lines lose their ``# ``)."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#")
                for line in text.splitlines()
            )
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code":
            cells.append(nbformat.v4.new_code_cell(text.replace("{setup}", SETUP)))

    for line in source.strip("\n").splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(name: str, *, execute: bool = True, timeout: int = 300) -> float:
    """Write ``notebooks/<name>.ipynb`` (executed unless ``execute=False``); return seconds."""
    cells = parse(NOTEBOOKS[name])
    for i, cell in enumerate(cells):
        cell.id = f"{name[:2]}-{i:02d}"
    nb = nbformat.v4.new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    start = time.perf_counter()
    if execute:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(HERE)}},
        )
        client.execute()
    elapsed = time.perf_counter() - start
    nbformat.validate(nb)
    nbformat.write(nb, HERE / f"{name}.ipynb")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"notebooks to build (default all): {NOTEBOOKS}")
    parser.add_argument("--no-execute", action="store_true", help="write the cells only")
    args = parser.parse_args(argv)
    for name in args.names or list(NOTEBOOKS):
        if name not in NOTEBOOKS:
            sys.exit(f"unknown notebook {name!r}; choose from {list(NOTEBOOKS)}")
        seconds = build(name, execute=not args.no_execute)
        size = (HERE / f"{name}.ipynb").stat().st_size
        print(f"{name}: executed in {seconds:.1f} s, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
