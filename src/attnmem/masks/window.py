"""Sliding windows, causal masks (bottom-right aligned) and the effective mask of a call."""

from __future__ import annotations

import math

import torch

from .base import Mask
from .blocks import MaskMod, ranges_to_candidates, states_from


class SlidingWindow(Mask):
    """Query ``i`` sees key ``j`` iff ``-left <= j - (i + nk - nq) <= right``.

    ``None`` on a side means unbounded; ``SlidingWindow(None, 0)`` is causal.
    """

    def __init__(self, left: int | None, right: int | None, name: str | None = None):
        for arg, val in (("left", left), ("right", right)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"sliding_window: {arg} must be a non-negative int, got {val!r}")
        self.left, self.right = left, right
        self.name = name or f"sliding_window({left}, {right})"

    def _lo_hi(self) -> tuple[float, float]:
        lo = -math.inf if self.left is None else -self.left
        hi = math.inf if self.right is None else self.right
        return lo, hi

    def mask_fn(self, nq: int, nk: int) -> MaskMod:
        offset = nk - nq
        left, right = self.left, self.right

        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            allowed = torch.ones_like(rel, dtype=torch.bool)
            if left is not None:
                allowed = allowed & (rel >= -left)
            if right is not None:
                allowed = allowed & (rel <= right)
            return allowed

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        lo, hi = self._lo_hi()
        off = g.nk - g.nq
        # Query q sees keys [q + off + lo, q + off + hi]; both ends grow by one per query, so
        # the union over a query tile is the one interval from the first query's low end to
        # the last query's high end, and the intersection runs the other way round.
        first_q, last_q = (qa + off).double(), (qb - 1 + off).double()
        k_first, k_last = ka.double(), (kb - 1).double()
        empty = (last_q + hi < k_first) | (first_q + lo > k_last)
        full = (last_q + lo <= k_first) & (first_q + hi >= k_last)
        return states_from(empty, full)

    def kv_tile_candidates(self, g):
        lo, hi = self._lo_hi()
        if math.isinf(lo) and math.isinf(hi):
            return None
        qa = torch.arange(g.num_q_tiles, dtype=torch.int64) * g.q_tile
        qb = torch.clamp(qa + g.q_tile, max=g.nq)
        off = g.nk - g.nq
        first = ((qa + off).double() + lo).clamp(-1, g.nk)
        last = ((qb - 1 + off).double() + hi).clamp(-1, g.nk)
        first_t = torch.div(first, g.kv_tile, rounding_mode="floor").long()
        last_t = torch.div(last, g.kv_tile, rounding_mode="floor").long()
        return ranges_to_candidates(first_t, last_t, g.num_kv_tiles)


class Band(SlidingWindow):
    """Keys with ``lo <= j - (i + nk - nq) <= hi`` (bounds may be negative: one side of a
    window without its centre). Not a user-facing constructor: ``sliding_window`` keeps its
    strict non-negative checks; methods that split a window into pieces build these."""

    def __init__(self, lo: int, hi: int):
        self.left, self.right = -lo, hi
        self.name = f"band({lo}, {hi})"


def causal() -> SlidingWindow:
    """Causal mask, bottom-right aligned when ``nq != nk`` (see the module docstring)."""
    return SlidingWindow(None, 0, name="causal")


def sliding_window(left: int, right: int | None = None) -> SlidingWindow:
    """Keys at most ``left`` positions before and ``right`` after the (aligned) query.

    ``right`` defaults to ``left``; ``sliding_window(w, 0)`` is causal local attention.
    """
    if left is None:
        raise ValueError("sliding_window: left must be a non-negative int, got None")
    return SlidingWindow(left, left if right is None else right)



def combine(causal_flag: bool, mask: Mask | None) -> Mask | None:
    """The effective mask of an attention call: ``causal`` and ``mask`` together."""
    if causal_flag and mask is not None:
        return causal() & mask
    if causal_flag:
        return causal()
    return mask
