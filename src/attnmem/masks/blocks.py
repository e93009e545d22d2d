"""Block maps and tilings: which (query tile, key tile) pairs a mask touches.

The helpers here turn per-tile facts (empty? full?) into EMPTY/PARTIAL/FULL states and build
the -1 padded candidate tables that structured masks return; none of them holds N×N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Tile states. Only PARTIAL and FULL tiles appear in a block map.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockMap:
    """Which (query tile, key tile) pairs hold allowed pairs, in FlexAttention's layout.

    ``kv_indices[i, :kv_counts[i]]`` are the key tiles of query tile ``i`` (sorted ascending),
    ``kv_full[i, j]`` says whether that tile is fully allowed (no mask needs evaluating). The
    rest of each row is padding (index -1).
    """

    nq: int
    nk: int
    q_tile: int
    kv_tile: int
    kv_indices: Tensor  # (num_q_tiles, max_kv_tiles) int64
    kv_full: Tensor  # (num_q_tiles, max_kv_tiles) bool
    kv_counts: Tensor  # (num_q_tiles,) int64

    @property
    def num_q_tiles(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def num_kv_tiles(self) -> int:
        return math.ceil(self.nk / self.kv_tile) if self.nk else 0

    def density(self) -> float:
        """Fraction of all tiles that are computed (partial or full)."""
        total = self.num_q_tiles * self.num_kv_tiles
        return float(self.kv_counts.sum()) / total if total else 0.0

    def rows(self) -> list[list[tuple[int, bool]]]:
        """Per query tile, the list of ``(kv_tile, is_full)`` — one host transfer for all."""
        idx = self.kv_indices.tolist()
        full = self.kv_full.tolist()
        counts = self.kv_counts.tolist()
        return [list(zip(idx[i][: counts[i]], full[i][: counts[i]])) for i in range(len(counts))]

    def dense_states(self) -> Tensor:
        """(num_q_tiles, num_kv_tiles) int8 of EMPTY/PARTIAL/FULL — for tests and plots only."""
        states = torch.zeros(self.num_q_tiles, self.num_kv_tiles, dtype=torch.int8)
        for i, row in enumerate(self.rows()):
            for j, full in row:
                states[i, j] = FULL if full else PARTIAL
        return states


@dataclass(frozen=True)
class Grid:
    """The tiling a block map is built for: lengths, tile sizes, and the batch/head extent."""

    nq: int
    nk: int
    q_tile: int
    kv_tile: int
    batch: int = 1
    heads: int = 1

    @property
    def num_q_tiles(self) -> int:
        return math.ceil(self.nq / self.q_tile) if self.nq else 0

    @property
    def num_kv_tiles(self) -> int:
        return math.ceil(self.nk / self.kv_tile) if self.nk else 0

    def ranges(self, qi: Tensor, ki: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[qa, qb) × [ka, kb)`` position ranges of tile pairs; the last tile may be short."""
        qa, ka = qi * self.q_tile, ki * self.kv_tile
        return qa, torch.clamp(qa + self.q_tile, max=self.nq), ka, torch.clamp(ka + self.kv_tile, max=self.nk)



def states_from(empty: Tensor, full: Tensor) -> Tensor:
    out = torch.full(empty.shape, PARTIAL, dtype=torch.int8)
    out[full] = FULL
    out[empty] = EMPTY
    return out


def dense_tile_states(t: Tensor, q_tile: int, k_tile: int) -> Tensor:
    """(nqt, nkt) states of a (Bm, Hm, nq, nk) bool tensor, reduced over batch and heads."""
    bm, hm, nq, nk = t.shape
    pq, pk = (-nq) % q_tile, (-nk) % k_tile
    # Pad with -1, "no position": it counts neither as allowed nor as blocked.
    x = torch.nn.functional.pad(t.to(torch.int8), (0, pk, 0, pq), value=-1)
    x = x.reshape(bm, hm, (nq + pq) // q_tile, q_tile, (nk + pk) // k_tile, k_tile)
    x = x.permute(2, 4, 0, 1, 3, 5).flatten(2)  # (nqt, nkt, Bm·Hm·q_tile·k_tile)
    return states_from(~(x == 1).any(-1), ~(x == 0).any(-1))


def ranges_to_candidates(first: Tensor, last: Tensor, nkt: int) -> Tensor:
    """Rows of consecutive tile indices ``first[i]..last[i]`` (inclusive), -1 padded."""
    first = first.clamp(min=0)
    last = last.clamp(max=nkt - 1)
    count = (last - first + 1).clamp(min=0)
    width = int(count.max()) if count.numel() else 0
    idx = first[:, None] + torch.arange(width)[None, :]
    return idx.masked_fill(torch.arange(width)[None, :] >= count[:, None], -1)


def union_candidates(ca: Tensor, cb: Tensor) -> Tensor:
    """Row-wise sorted union of two -1 padded candidate tables."""
    big = torch.iinfo(torch.int64).max
    both = torch.cat([ca, cb], 1)
    srt = torch.sort(both.masked_fill(both < 0, big), dim=1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = torch.sort(srt.masked_fill(dup, big), dim=1).values
    width = int((srt != big).sum(1).max()) if srt.numel() else 0
    srt = srt[:, :width]
    return srt.masked_fill(srt == big, -1)


def prefix_counts(flags: Tensor) -> Tensor:
    """Prefix counts of a bool vector: ``out[i]`` flags among the first ``i`` (length n + 1)."""
    out = torch.zeros(flags.numel() + 1, dtype=torch.int64)
    out[1:] = flags.long().cumsum(0)
    return out
