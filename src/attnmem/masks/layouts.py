"""Block-level layouts: a (query blocks, key blocks) bool table, given or random."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Mask, PerDevice
from .blocks import states_from


class BlockSparse(Mask):
    """A block-level layout: ``layout[i, j]`` allows query block i to see key block j.

    Tile states come from 2-d prefix sums over the layout, so they cost O(blocks) whatever
    the tile size: a tile is empty when none of the blocks it touches is allowed and full
    when all are.
    """

    def __init__(self, layout: Tensor, block: int):
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool or layout.dim() != 2:
            raise TypeError("block_sparse: layout must be a 2-d bool tensor (query blocks, key blocks)")
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"block_sparse: block must be a positive int, got {block!r}")
        self.layout, self.block = layout.cpu(), block
        counts = torch.zeros(layout.shape[0] + 1, layout.shape[1] + 1, dtype=torch.int64)
        counts[1:, 1:] = self.layout.long().cumsum(0).cumsum(1)
        self._prefix = counts
        self.name = f"block_sparse(block={block}, density={self.layout.float().mean().item():.2f})"

    def check(self, batch, heads, nq, nk):
        need = (math.ceil(nq / self.block), math.ceil(nk / self.block))
        if tuple(self.layout.shape) != need:
            raise ValueError(
                f"block_sparse layout has shape {tuple(self.layout.shape)}, but Nq={nq}, Nk={nk} with "
                f"block={self.block} need {need}"
            )

    def mask_fn(self, nq, nk):
        held = PerDevice(self.layout)

        def mask_mod(b, h, q_idx, kv_idx):
            (layout,) = held.on(q_idx.device)
            return layout[q_idx // self.block, kv_idx // self.block]

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        r0, r1 = qa // self.block, (qb - 1) // self.block + 1
        c0, c1 = ka // self.block, (kb - 1) // self.block + 1
        p = self._prefix
        allowed = p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]
        return states_from(allowed == 0, allowed == (r1 - r0) * (c1 - c0))


def block_sparse(layout: Tensor, block: int) -> BlockSparse:
    """Mask from a (query blocks, key blocks) bool layout of ``block``-sized blocks."""
    return BlockSparse(layout, block)


def random_blocks(nq: int, nk: int, block: int, keep: float, seed: int = 0) -> BlockSparse:
    """A random block layout keeping about ``keep`` of the blocks, deterministic in ``seed``."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"random_blocks: keep must be in [0, 1], got {keep!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"random_blocks: block must be a positive int, got {block!r}")
    g = torch.Generator().manual_seed(seed)
    shape = (math.ceil(nq / block), math.ceil(nk / block))
    return BlockSparse(torch.rand(shape, generator=g) < keep, block)
