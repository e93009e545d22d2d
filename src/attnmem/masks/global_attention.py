"""Global tokens (Longformer): listed positions see, and are seen by, every position."""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_count
from .base import Mask
from .blocks import prefix_counts, states_from
from .checks import window_sides
from .window import SlidingWindow, causal


class GlobalTokens(Mask):
    """Global tokens: a query at a listed position sees every key, a key at a listed position
    is seen by every query (Longformer). Positions index queries and keys alike, from 0.

    Block map: query tiles holding a global query list every key tile; the others list only
    the key tiles holding a global key. In the padded ``BlockMap`` layout one global query
    makes every row num_kv_tiles wide, so ``queries=False`` (global keys only) exists for
    methods that compute the few global query rows apart (``longformer`` does): its block map
    is O(N/tile · g).
    """

    def __init__(self, positions, *, queries: bool = True, keys: bool = True):
        pos = torch.as_tensor(positions)
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.dim() > 1:
            raise TypeError(f"global_tokens: positions must be a sequence of ints, got {positions!r}")
        pos = pos.reshape(-1).long()
        if pos.numel() and int(pos.min()) < 0:
            raise ValueError(f"global_tokens: positions must be non-negative, got {pos.tolist()}")
        self.positions = torch.unique(pos)
        # One side alone serves methods that compute the global query rows separately.
        self.queries, self.keys = queries, keys
        self.name = f"global_tokens({len(self.positions)})"

    def check(self, batch, heads, nq, nk):
        if self.positions.numel() and int(self.positions.max()) >= max(nq, nk):
            raise ValueError(
                f"global_tokens: position {int(self.positions.max())} is outside the sequences "
                f"(Nq={nq}, Nk={nk})"
            )

    def _flags(self, n: int, side: bool = True) -> Tensor:
        flags = torch.zeros(n, dtype=torch.bool)
        if side:
            flags[self.positions[self.positions < n]] = True
        return flags

    def mask_fn(self, nq, nk):
        gq, gk = self._flags(nq, self.queries), self._flags(nk, self.keys)

        def mask_mod(b, h, q_idx, kv_idx):
            return gq.to(q_idx.device)[q_idx] | gk.to(q_idx.device)[kv_idx]

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        cq = prefix_counts(self._flags(g.nq, self.queries))
        ck = prefix_counts(self._flags(g.nk, self.keys))
        nq_glob, nk_glob = cq[qb] - cq[qa], ck[kb] - ck[ka]
        return states_from((nq_glob == 0) & (nk_glob == 0), (nq_glob == qb - qa) | (nk_glob == kb - ka))

    def kv_tile_candidates(self, g):
        nqt, nkt = g.num_q_tiles, g.num_kv_tiles
        key_tiles = torch.unique(self.positions[self.positions < g.nk] // g.kv_tile)
        if not self.keys:
            key_tiles = key_tiles[:0]
        q_rows = torch.zeros(nqt, dtype=torch.bool)
        if self.queries:
            q_rows[torch.unique(self.positions[self.positions < g.nq] // g.q_tile)] = True
        if not bool(q_rows.any()):
            return key_tiles[None, :].expand(nqt, -1)
        all_tiles = torch.arange(nkt, dtype=torch.int64)[None, :].expand(nqt, nkt)
        some = torch.full((nqt, nkt), -1, dtype=torch.int64)
        some[:, : len(key_tiles)] = key_tiles
        return torch.where(q_rows[:, None], all_tiles, some)



def global_tokens(positions, *, queries: bool = True, keys: bool = True) -> GlobalTokens:
    """Tokens at ``positions`` attend to everything (``queries``) and are attended by
    everything (``keys``)."""
    return GlobalTokens(positions, queries=queries, keys=keys)


def streaming(window: int, sinks: int = 4) -> Mask:
    """StreamingLLM's attention-sink window (Xiao et al., 2024): each query sees itself, the
    ``window`` keys before it and the first ``sinks`` keys (the sink tokens), causally.

    ``allowed(i, j) = j <= i' and (i' - j <= window or j < sinks)`` with ``i' = i + Nk - Nq``
    (bottom-right alignment): ``(sliding_window(window, 0) | global_tokens(range(sinks),
    queries=False)) & causal()``, so its block map lists O(N·(window + sinks)/tile²) tiles.
    Composes with ``&``/``|`` like any mask.
    """
    window = check_count("streaming", "window", window)
    sinks = check_count("streaming", "sinks", sinks)
    local = SlidingWindow(window, 0)
    if not sinks:
        return local
    return (local | GlobalTokens(list(range(sinks)), queries=False)) & causal()


def longformer(window: int | tuple[int, int], positions) -> Mask:
    """Longformer: a sliding window plus global tokens at ``positions``."""
    left, right = window_sides("longformer", window)
    return SlidingWindow(left, right) | GlobalTokens(positions)
