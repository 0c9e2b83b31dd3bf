"""Step 1 of the robustness study: transfer functions of HiPPO-LegS and its diagonal forms.

Three single-input single-output systems of state size ``N`` (HiPPO-LegS; S4D-LegS, Gu et
al. 2022; PTD, Yu et al. 2024), all
read out by ``c = b = √(2n+1)`` (the LegS reconstruction of the current input value, so
``G(0) = 1`` for HiPPO):

- ``hippo``: the full HiPPO-LegS matrix ``(A, b, c)``, ``G(s) = c (sI − A)⁻¹ b``.
- ``s4d``: S4D-LegS, the diagonal system of the normal part of LegS with the halved input
  of the S4D theory, ``(Λ, ½ V* b, c V)`` over the ``N/2`` conjugate pairs (both halves
  counted), where ``A + ½ b bᵀ = V diag(Λ) V*`` (:func:`ssmix.hippo.nplr`).
- ``ptd``: the perturb-then-diagonalise modes ``(Λ̃, Ṽ⁻¹ b, c Ṽ)`` over all ``N`` modes
  (:func:`ssmix.hippo.ptd`, sign-fixed).

Each is evaluated at ``s = iω`` on a logarithmic grid of ω, refined with every mode's own
resonance frequency ``|Im λ|`` (the spikes are as narrow as ``|Re λ| = ½``, far narrower than
any affordable log grid). The error of a diagonal form is ``|G_x(iω) − G_hippo(iω)|``; S4D's
*spikes* are the local maxima of its error, ranked by height.
"""

from __future__ import annotations

import jax
import numpy as np

from ssmix import hippo

__all__ = ["SYSTEMS", "find_spikes", "quiet_frequency", "systems", "transfer_study"]

#: The systems compared, in plotting order.
SYSTEMS = ("hippo", "s4d", "ptd")


def systems(N: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """``name -> (A, B, C, conj_symmetric)`` for the three systems of the module docstring."""
    A, b = hippo.transition("legs", N)
    c = b.copy()
    Lambda, _, _, V = hippo.nplr("legs", N)
    res = hippo.ptd("legs", N)
    return {
        "hippo": (A, b, c, False),
        "s4d": (Lambda, V.conj().T @ (b / 2), c @ V, True),
        "ptd": (res.Lambda, res.Vinv @ b, c @ res.V, False),
    }


def find_spikes(omega: np.ndarray, err: np.ndarray, count: int, *, min_ratio: float = 1.5):
    """The ``count`` highest local maxima of ``err`` over the sorted grid ``omega``.

    Peaks closer than a factor ``min_ratio`` in frequency to a higher one are dropped (one
    frequency per spike).

    Returns:
      list of ``(omega, err)`` pairs, highest first.
    """
    inner = (err[1:-1] > err[:-2]) & (err[1:-1] >= err[2:])  # plateaus are not peaks
    idx = np.flatnonzero(inner) + 1
    idx = idx[np.argsort(err[idx])[::-1]]
    picked: list[int] = []
    for i in idx:
        if all(max(omega[i], omega[j]) / min(omega[i], omega[j]) >= min_ratio for j in picked):
            picked.append(int(i))
        if len(picked) == count:
            break
    return [(float(omega[i]), float(err[i])) for i in picked]


def quiet_frequency(omega: np.ndarray, err: np.ndarray, spikes: list[float]) -> float:
    """The frequency in the band spanned by ``spikes`` where ``err`` is smallest.

    The control of the noise test: as high as the spikes, but where S4D matches HiPPO.
    """
    band = (omega >= min(spikes)) & (omega <= max(spikes))
    return float(omega[np.flatnonzero(band)[np.argmin(err[band])]])


def transfer_study(
    N: int = 64,
    *,
    n_grid: int = 3000,
    omega_min: float = 1e-2,
    omega_max: float = 1e5,
    n_spikes: int = 3,
) -> dict:
    """Evaluate the three transfer functions and locate S4D's spikes.

    Args:
      N: state size of HiPPO-LegS (even).
      n_grid: points of the logarithmic grid on ``[omega_min, omega_max]`` (the modes'
        resonance frequencies are added).
      omega_min, omega_max: grid range.
      n_spikes: how many of S4D's spikes to report.

    Returns:
      A JSON-ready dict: ``omega`` (sorted grid), ``gain[name]`` ``|G(iω)|``,
      ``error[name]`` ``|G − G_hippo|`` for the diagonal forms, ``summary[name]`` (maximum
      error and where, median error), ``spikes`` (S4D's, ``[{"omega", "error",
      "error_ptd", "gain_hippo"}]``) and ``control`` (:func:`quiet_frequency` of S4D's
      error, with both errors there).
    """
    sys = systems(N)
    modes = [np.abs(sys["s4d"][0].imag), np.abs(sys["ptd"][0].imag)]
    omega = np.geomspace(omega_min, omega_max, n_grid)
    omega = np.unique(
        np.concatenate([omega, *[m[(m >= omega_min) & (m <= omega_max)] for m in modes]])
    )
    G = {}
    with jax.enable_x64(True):
        for name, (A, B, C, conj) in sys.items():
            G[name] = np.asarray(hippo.transfer_function(A, B, C, omega, conj_symmetric=conj))
    error = {name: np.abs(G[name] - G["hippo"]) for name in SYSTEMS[1:]}
    spikes = find_spikes(omega, error["s4d"], n_spikes)
    at = {w: int(np.searchsorted(omega, w)) for w, _ in spikes}
    control = quiet_frequency(omega, error["s4d"], [w for w, _ in spikes])
    at_control = int(np.searchsorted(omega, control))
    summary = {
        name: {
            "max_error": float(error[name].max()),
            "argmax_omega": float(omega[error[name].argmax()]),
            "median_error": float(np.median(error[name])),
        }
        for name in SYSTEMS[1:]
    }
    return {
        "N": N,
        "readout": "c = b = sqrt(2n+1)",
        "omega": omega.tolist(),
        "gain": {name: np.abs(G[name]).tolist() for name in SYSTEMS},
        "error": {name: e.tolist() for name, e in error.items()},
        "summary": summary,
        "max_gain_hippo": float(np.abs(G["hippo"]).max()),
        "spikes": [
            {
                "omega": w,
                "error": e,
                "error_ptd": float(error["ptd"][at[w]]),
                "gain_hippo": float(np.abs(G["hippo"][at[w]])),
            }
            for w, e in spikes
        ],
        "control": {
            "omega": control,
            "error": float(error["s4d"][at_control]),
            "error_ptd": float(error["ptd"][at_control]),
            "gain_hippo": float(np.abs(G["hippo"][at_control])),
        },
    }


def plot_transfer(study: dict, path) -> None:
    """Two panels over ω (log axes): the gains ``|G(iω)|`` and the errors against HiPPO, with
    S4D's spikes (dotted) and the control frequency (dashed) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    omega = np.asarray(study["omega"])
    style = {"hippo": ("k", "HiPPO-LegS (full)"), "s4d": ("C3", "S4D-LegS (diagonal)")}
    style["ptd"] = ("C0", "PTD (diagonal)")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name in SYSTEMS:
        color, label = style[name]
        ax1.loglog(omega, study["gain"][name], color=color, lw=1, label=label)
    for name in SYSTEMS[1:]:
        color, label = style[name]
        ax2.loglog(omega, np.maximum(study["error"][name], 1e-12), color=color, lw=1, label=label)
    for i, spike in enumerate(study["spikes"]):
        ax2.axvline(
            spike["omega"], color="0.5", ls=":", lw=1, label="S4D spikes" if i == 0 else None
        )
    ax2.axvline(study["control"]["omega"], color="C2", ls="--", lw=1, label="control")
    ax1.set_ylabel("|G(iω)|")
    ax1.set_title(f"Transfer functions, N = {study['N']}, readout {study['readout']}")
    ax1.legend(loc="lower left", fontsize=8)
    ax2.set_ylabel("|G(iω) − G_HiPPO(iω)|")
    ax2.set_xlabel("ω")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
