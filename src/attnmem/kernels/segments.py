"""Segment planning: which keys each query tile computes in one kernel call, from block rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import Mask

# Below this many queries a separate query tile costs more in Python than it saves.
MIN_Q_TILE = 16
# Most keys in one backward call. Each call's dK/dV are transient, so this bounds the
# backward's working memory at 2·B·Hkv·MAX_SEGMENT·D elements.
MAX_SEGMENT = 2048
# Most keys gathered (copied) from scattered tiles into one forward call.
MAX_GATHER = 4096


@dataclass(frozen=True)
class Segment:
    """Keys of one query tile computed in one kernel call: one or more ``[start, stop)``
    ranges (several ranges are gathered into one buffer); ``masked`` when the mask must be
    evaluated on them."""

    ranges: tuple[tuple[int, int], ...]
    masked: bool

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def contiguous(self) -> bool:
        return len(self.ranges) == 1

    def take(self, x: Tensor) -> Tensor:
        """The keys (or values) of this segment from (B, H, N, D): a view when contiguous."""
        if self.contiguous:
            a, b = self.ranges[0]
            return x[:, :, a:b]
        return torch.cat([x[:, :, a:b] for a, b in self.ranges], dim=2)  # (B, H, size, D)

    def add_into(self, dst: Tensor, grad: Tensor) -> None:
        """Scatter a (B, H, size, D) gradient back into the ranges of ``dst``."""
        offset = 0
        for a, b in self.ranges:
            dst[:, :, a:b] += grad[:, :, offset:offset + b - a]
            offset += b - a

    def positions(self, device: torch.device) -> Tensor:
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.ranges])


def block_rows(mask: Mask | None, nq: int, nk: int, q_tile: int, kv_tile: int,
               batch: int, heads: int) -> list[list[tuple[int, bool]]]:
    """Per query tile, ``(kv_tile, is_full)`` of every non-empty key tile (all when unmasked)."""
    if mask is None:
        return [[(j, True) for j in range(math.ceil(nk / kv_tile))]] * math.ceil(nq / q_tile)
    return mask.block_map(nq, nk, q_tile, kv_tile, batch=batch, heads=heads).rows()


def _pack(ranges: list[tuple[int, int]], masked: bool, max_keys: int | None, split: bool) -> list[Segment]:
    """Group ranges into segments of at most ``max_keys`` keys (one range may exceed it when
    not ``split``: a contiguous range costs no copy)."""
    if split and max_keys:
        pieces = []
        for a, b in ranges:
            pieces += [(x, min(x + max_keys, b)) for x in range(a, b, max_keys)]
        ranges = pieces
    segs: list[Segment] = []
    group: list[tuple[int, int]] = []
    size = 0
    for a, b in ranges:
        if group and max_keys is not None and size + (b - a) > max_keys:
            segs.append(Segment(tuple(group), masked))
            group, size = [], 0
        group.append((a, b))
        size += b - a
    if group:
        segs.append(Segment(tuple(group), masked))
    return segs


def plan_segments(rows: list[list[tuple[int, bool]]], nq: int, nk: int, q_tile: int, kv_tile: int,
                  merge: bool = True, max_segment: int | None = None,
                  gather: int | None = None) -> list[tuple[int, int, list[Segment]]]:
    """Per query tile ``(qa, qb, segments)`` from block rows; never from N×N.

    With ``merge``, tiles of one kind (full or partial) join into few segments for a kernel
    that tiles internally: neighbouring tiles become one range (a view, no copy), and ranges
    are gathered into one buffer of up to ``gather`` keys so that scattered tiles (block-sparse
    masks) cost few kernel calls. ``max_segment`` splits ranges too (the backward, whose
    per-segment dK/dV are transient). Without ``merge`` every segment is one key tile, so the
    kernel's working memory stays O(q_tile · kv_tile).
    """
    plan = []
    for i, row in enumerate(rows):
        qa = i * q_tile
        by_kind: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        segs: list[Segment] = []
        for j, full in row:
            ka, kb = j * kv_tile, min((j + 1) * kv_tile, nk)
            runs = by_kind[full]
            if not merge:
                segs.append(Segment(((ka, kb),), not full))
            elif runs and runs[-1][1] == ka:
                runs[-1] = (runs[-1][0], kb)
            else:
                runs.append((ka, kb))
        if merge:
            limit = max_segment if max_segment is not None else gather
            for full in (True, False):
                segs += _pack(by_kind[full], not full, limit, split=max_segment is not None)
        plan.append((qa, min(qa + q_tile, nq), segs))
    return plan
