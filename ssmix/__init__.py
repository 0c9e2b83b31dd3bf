"""ssmix: structured sequence-mixing layers in JAX/Flax.

S4-family state space models, Hydra's quasiseparable mixer and Kronecker / higher-order
attention as tested, fast building blocks. See README.md for the table of layers and modes.
"""

from ssmix import blocks, hippo, kernels, layers, optim, testing
from ssmix._backend import BACKENDS, auto_backend

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "auto_backend",
    "blocks",
    "hippo",
    "kernels",
    "layers",
    "optim",
    "testing",
    "__version__",
]
