"""Flax NNX sequence-mixing layers. Each layer exposes its kernel modes and a materialized form."""

from ssmix.layers.attention import Attention, KroneckerAttention, TensorAttention
from ssmix.layers.hydra import Hydra
from ssmix.layers.mamba2 import Mamba2
from ssmix.layers.mixers import MatrixMixer
from ssmix.layers.ptd import S4PTD, S5PTD
from ssmix.layers.s4 import S4
from ssmix.layers.s4d import S4D
from ssmix.layers.s5 import S5

__all__: list[str] = ["Attention", "KroneckerAttention", "TensorAttention"]
__all__ += ["S4", "S4D"]
__all__ += ["Hydra", "MatrixMixer"]
__all__ += ["S5", "S4PTD", "S5PTD"]
__all__ += ["Mamba2"]
