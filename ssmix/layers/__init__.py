"""Flax NNX sequence-mixing layers. Each layer exposes its kernel modes and a materialized form."""

__all__: list[str] = []
