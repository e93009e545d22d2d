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
    make_model_cache,
)
from .cache_evict import HeavyHitterCache, SinkWindowCache, SnapKVCache
from .cache_lowbit import Int2KVCache, Int4KVCache
from .cache_paged import BlockTable, PagedKVCache, PagedModelCache
from .scores import LearnedALiBi, RelativePositionBias
from .transformer import Transformer

__all__ = ["MultiHeadAttention", "Transformer", "LayerCache", "KVCache", "Int8KVCache", "SlidingWindowCache",
           "LinearStateCache", "SinkWindowCache", "HeavyHitterCache", "SnapKVCache", "Int4KVCache", "Int2KVCache",
           "PagedKVCache", "PagedModelCache", "BlockTable", "ModelCache", "make_layer_cache", "make_model_cache",
           "cache_bytes", "RelativePositionBias", "LearnedALiBi"]
