"""Flax NNX sequence-mixing layers. Each layer exposes its kernel modes and a materialized form."""

from ssmix.layers.attention import Attention, KroneckerAttention, TensorAttention

__all__: list[str] = ["Attention", "KroneckerAttention", "TensorAttention"]
