"""Any attention-gym style ``mask_mod`` as a mask."""

from __future__ import annotations

from .base import Mask
from .blocks import MaskMod


class FromMod(Mask):
    """Any FlexAttention / attention-gym ``mask_mod(b, h, q_idx, kv_idx)``.

    Its block map evaluates the function one query tile at a time (O(N²) time, O(tile · N)
    memory); for long sequences prefer the structured masks, whose block maps cost O(tiles).
    """

    def __init__(self, mask_mod: MaskMod, name: str | None = None):
        if not callable(mask_mod):
            raise TypeError(f"from_mod: mask_mod must be callable, got {type(mask_mod).__name__}")
        self.fn = mask_mod
        self.name = name or getattr(mask_mod, "__name__", "mask_mod")

    def mask_fn(self, nq, nk):
        return self.fn


def from_mod(mask_mod: MaskMod, name: str | None = None) -> FromMod:
    """Wrap an attention-gym style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``."""
    return FromMod(mask_mod, name)
