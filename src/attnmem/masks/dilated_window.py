"""Longformer's dilated sliding window, one dilation or one per head."""

from __future__ import annotations

import torch

from ..checks import check_count
from .base import Mask
from .blocks import PARTIAL
from .checks import window_sides
from .window import SlidingWindow


class Dilated(Mask):
    """Longformer's dilated window: ``left`` keys before and ``right`` after, ``d`` apart.

    With ``rel = j - (i + nk - nq)`` (bottom-right aligned like ``SlidingWindow``), query i
    sees key j iff ``rel % d == 0`` and ``-left·d <= rel <= right·d``. ``dilation`` is one int
    or one int per query head (then indexed by the ``h`` of ``mask_mod``). ``d = 1`` is
    ``SlidingWindow(left, right)``.
    """

    def __init__(self, left: int, right: int, dilation: int | tuple[int, ...] = 1):
        check_count("dilated", "left", left)
        check_count("dilated", "right", right)
        dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,)
        if not dil:
            raise ValueError("dilated: dilation must be a positive int or one per head, got ()")
        for d in dil:
            check_count("dilated", "dilation", d, minimum=1)
        self.left, self.right = left, right
        self.per_head = isinstance(dilation, (tuple, list))
        self.dilations = dil
        self.d_max = max(dil)
        self._span = SlidingWindow(left * self.d_max, right * self.d_max)
        self.name = f"dilated({left}, {right}, dilation={dilation})"

    def check(self, batch, heads, nq, nk):
        if self.per_head and len(self.dilations) != heads:
            raise ValueError(
                f"dilated: got {len(self.dilations)} per-head dilations for {heads} query heads"
            )

    def mask_fn(self, nq, nk):
        offset = nk - nq
        left, right = self.left, self.right
        table = torch.tensor(self.dilations, dtype=torch.int64)

        # No per-device cache in these mask_mods: FlexAttention traces them, and a cache is a
        # side effect it refuses. ``.to`` on the same device returns the tensor itself.
        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            if self.per_head:
                d = table.to(q_idx.device)[h]
            else:
                d = self.dilations[0]
            return (rel % d == 0) & (rel >= -left * d) & (rel <= right * d)

        return mask_mod

    def tile_states(self, g, qi, ki):
        states = self._span.tile_states(g, qi, ki)
        if self.d_max == 1:
            return states
        # Every key is d apart: a tile holding two neighbouring keys is never full.
        return torch.minimum(states, torch.full_like(states, PARTIAL))

    def kv_tile_candidates(self, g):
        return self._span.kv_tile_candidates(g)


def dilated(window: int | tuple[int, int], dilation: int | tuple[int, ...] = 1) -> Dilated:
    """Dilated window: ``window`` keys each side (or ``(left, right)``), ``dilation`` apart.

    ``dilation`` may be a tuple with one value per query head (Longformer uses different
    dilations on different heads).
    """
    left, right = window_sides("dilated", window)
    return Dilated(left, right, dilation)
