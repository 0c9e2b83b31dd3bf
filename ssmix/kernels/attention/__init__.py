"""Softmax attention, Kronecker attention (KAO) and tensor / 2-simplicial attention kernels.

Pure functions over jax arrays (Kronecker attention, Gao & Ji 2020; tensor attention,
Alman & Song 2023; 2-simplicial attention, Clift et al. 2019), one module per family,
each fast form with its reference beside it:

- :mod:`~ssmix.kernels.attention.softmax`: :func:`softmax_attention`, the materialized
  reference (``block_size=None``) and a blocked online-softmax form whose forward and backward
  passes keep memory O(L·(d + block_size)) beyond the inputs; :func:`softmax_attention_weights`;
  :func:`softmax_block_size`, the per-backend default block (dense on CPU, blocked at long
  lengths on GPU/TPU). Both softmax functions take ``segment_ids (B, L)`` (packed sequences:
  a query attends only to keys of its own segment, in every form).
- :mod:`~ssmix.kernels.attention.kronecker`: :func:`kao`, Kronecker attention on 2-D
  ``(B, h, w, c)`` and 3-D ``(B, t, h, w, c)`` grids; :func:`kao_mixing_matrix` builds the same
  operator as an explicit ``N × N`` matrix.
- :mod:`~ssmix.kernels.attention.tensor`: :func:`tensor_attention`, triple-wise attention with
  one softmax over all n² key pairs: ``"naive"`` (ordinary attention over the n² pair keys),
  ``"blocked"`` (exact, online softmax over pair blocks, hand-written backward),
  ``"simplicial"`` (causal windows, online softmax over the k2 window) and ``"approx"``
  (truncated Taylor features, near-linear in n). :func:`tensor_attention_weights`
  materializes the ``n × n²`` weight tensor and :func:`tensor_attention_error_bound`
  evaluates the approximation's documented error bound.

Masks are boolean, True at valid positions. A query with no valid key (or key pair) gets a
zero output and zero gradients, never NaN. Inputs of lower precision (bfloat16, float16) are
computed in float32 and the result is cast back to the input dtype.
"""

from ssmix.kernels.attention.kronecker import KAO_VARIANTS, kao, kao_mixing_matrix
from ssmix.kernels.attention.softmax import (
    softmax_attention,
    softmax_attention_weights,
    softmax_block_size,
)
from ssmix.kernels.attention.tensor import (
    TENSOR_METHODS,
    tensor_attention,
    tensor_attention_error_bound,
    tensor_attention_weights,
)

__all__ = [
    "softmax_attention",
    "softmax_attention_weights",
    "softmax_block_size",
    "kao",
    "kao_mixing_matrix",
    "tensor_attention",
    "tensor_attention_weights",
    "tensor_attention_error_bound",
    "TENSOR_METHODS",
    "KAO_VARIANTS",
]
