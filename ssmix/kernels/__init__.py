"""Pure, jit-friendly kernels over jax arrays; no Flax, no parameters.

Each module keeps a naive reference implementation next to its fast forms.
"""
