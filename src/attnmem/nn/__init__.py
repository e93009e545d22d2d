"""Modules built on the registry: multi-head attention and a small pre-norm transformer."""

from .attention import MultiHeadAttention
from .cache import (
                    Int8KVCache,
    KVCache,
    LayerCache,
    LinearStateCache,
    ModelCache,
    SlidingWindowCache,
    cache_bytes,
    make_layer_cache,
)
from .scores import LearnedALiBi, RelativePositionBias
from .transformer import Transformer

__all__ = ["MultiHeadAttention", "Transformer", "LayerCache", "KVCache", "Int8KVCache", "SlidingWindowCache",
           "LinearStateCache", "ModelCache", "make_layer_cache", "cache_bytes", "RelativePositionBias",
           "LearnedALiBi"]
