"""S4-PTD and S5-PTD (PTD, Yu et al. 2024): thin factories over S4D and S5 with ``init="ptd"``.

Both start from :func:`ssmix.hippo.ptd`, a well-conditioned diagonalisation ``A + E = Ṽ Λ̃ Ṽ⁻¹``
of HiPPO-LegS under a small perturbation ``E`` (real parts sign-fixed to ``−|Re Λ̃|``), whose
transfer function stays uniformly close to HiPPO's, unlike the diagonal S4D / S5
initialisations with their spikes (``experiments/robustness``).

- :func:`S4PTD` is ``S4D(init="ptd")``: every feature's ``N/2`` stored modes are all modes of
  the size-``N/2`` PTD system with ``B = Ṽ⁻¹ b`` (see :data:`ssmix.layers.s4d.S4D_INITS`).
- :func:`S5PTD` is ``S5(init="ptd", conj_sym=False)``: block-diagonal ``Λ̃``, ``Ṽ``, ``Ṽ⁻¹`` of
  size ``P/J`` with S5's random ``B`` and ``C`` (``B̃ = Ṽ⁻¹ B``, ``C̃ = C Ṽ``).
"""

from __future__ import annotations

from typing import Any

from ssmix.layers.s4d import S4D
from ssmix.layers.s5 import S5

__all__ = ["S4PTD", "S5PTD"]


def _fixed(name: str, kwargs: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{name} fixes {key}={value!r}; got {key}={kwargs[key]!r}")
    return {**kwargs, **fixed}


def S4PTD(d_model: int, d_state: int = 64, **kwargs: Any) -> S4D:
    """S4-PTD: ``S4D(d_model, d_state, init="ptd", **kwargs)``; options as :class:`S4D`."""
    return S4D(d_model, d_state, **_fixed("S4PTD", kwargs, {"init": "ptd"}))


def S5PTD(d_model: int, d_state: int = 64, **kwargs: Any) -> S5:
    """S5-PTD: ``S5(d_model, d_state, init="ptd", conj_sym=False, **kwargs)``; options as
    :class:`S5` (``blocks`` splits ``d_state`` into PTD blocks of size ``d_state/blocks``)."""
    return S5(d_model, d_state, **_fixed("S5PTD", kwargs, {"init": "ptd", "conj_sym": False}))
