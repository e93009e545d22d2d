"""Modules built on the registry: multi-head attention and a small pre-norm transformer."""

from .attention import MultiHeadAttention
from .transformer import Transformer

__all__ = ["MultiHeadAttention", "Transformer"]
