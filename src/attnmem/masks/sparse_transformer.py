"""The Sparse Transformer's two patterns, *strided* and *fixed*, each with both factors in one head."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_count
from .base import Mask
from .blocks import EMPTY, FULL, states_from
from .window import SlidingWindow


class Strided(Mask):
    """Sparse Transformer's *strided* pattern (both factors in one head): with
    ``rel = j - (i + nk - nq)``, query i sees key j iff ``|rel| < stride`` (the local factor)
    or ``rel % stride == 0`` (the strided factor). Add ``causal=True`` for the paper's form.

    The strided factor touches every key tile once ``stride <= kv_tile``, so its block map
    lists O(N²/tile²) tiles and its work is O(N²/stride · …) per tile row: memory stays O(N).
    """

    def __init__(self, stride: int):
        check_count("strided", "stride", stride, minimum=1)
        self.stride = stride
        self._local = SlidingWindow(stride - 1, stride - 1)
        self.name = f"strided({stride})"

    def mask_fn(self, nq, nk):
        offset, s = nk - nq, self.stride

        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            return (rel.abs() < s) | (rel % s == 0)

        return mask_mod

    def tile_states(self, g, qi, ki):
        local = self._local.tile_states(g, qi, ki)
        qa, qb, ka, kb = g.ranges(qi, ki)
        off, s = g.nk - g.nq, self.stride
        rel_min, rel_max = ka - (qb - 1 + off), (kb - 1) - (qa + off)
        has_multiple = torch.div(rel_max, s, rounding_mode="floor") * s >= rel_min
        empty = (local == EMPTY) & ~has_multiple
        full = (local == FULL) | ((rel_min == rel_max) & has_multiple)
        return states_from(empty, full)


def strided(stride: int) -> Strided:
    """Sparse Transformer strided pattern: the ``stride`` nearest keys plus every stride-th key."""
    return Strided(stride)


class Fixed(Mask):
    """Sparse Transformer's *fixed* pattern (both factors in one head): query i (aligned
    position ``p = i + nk - nq``) sees key j iff ``p // block == j // block`` (its own block)
    or ``j % block >= block - summary`` (the last ``summary`` keys of every block).
    """

    def __init__(self, block: int, summary: int = 1):
        check_count("fixed", "block", block, minimum=1)
        check_count("fixed", "summary", summary, minimum=1)
        if summary > block:
            raise ValueError(f"fixed: summary must be at most block={block}, got {summary}")
        self.block, self.summary = block, summary
        self.name = f"fixed(block={block}, summary={summary})"

    def mask_fn(self, nq, nk):
        offset, blk, first_summary = nk - nq, self.block, self.block - self.summary

        def mask_mod(b, h, q_idx, kv_idx):
            same = torch.div(q_idx + offset, blk, rounding_mode="floor") == kv_idx // blk
            return same | (kv_idx % blk >= first_summary)

        return mask_mod

    def _summaries_below(self, x: Tensor) -> Tensor:
        """How many summary keys lie in [0, x)."""
        return (x // self.block) * self.summary + (x % self.block - (self.block - self.summary)).clamp(min=0)

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        off, blk = g.nk - g.nq, self.block
        q0 = torch.div(qa + off, blk, rounding_mode="floor")
        q1 = torch.div(qb - 1 + off, blk, rounding_mode="floor")
        k0, k1 = ka // blk, (kb - 1) // blk
        n_summary = self._summaries_below(kb) - self._summaries_below(ka)
        empty = ((q1 < k0) | (k1 < q0)) & (n_summary == 0)
        full = ((q0 == q1) & (k0 == k1) & (q0 == k0)) | (n_summary == kb - ka)
        return states_from(empty, full)


def fixed(block: int, summary: int = 1) -> Fixed:
    """Sparse Transformer fixed pattern: own block plus the last ``summary`` keys of each block."""
    return Fixed(block, summary)
