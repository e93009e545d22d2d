"""BigBird's block pattern: window blocks, global blocks and seeded random blocks."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from ..checks import check_count
from .base import Mask
from .blocks import Grid, prefix_counts, ranges_to_candidates, states_from, union_candidates


class BigBird(Mask):
    """BigBird's block pattern, in blocks of ``block`` positions counted from 0 in each sequence.

    Query block i sees key block j iff ``|i - j| <= window_blocks // 2`` (window), or either
    block is global (the first ⌈g/2⌉ and the last ⌊g/2⌋ blocks, ``g = global_blocks``), or j
    is one of the ``random_blocks`` blocks drawn for i. Random blocks are distinct, outside
    i's window and the global blocks, and a function of (seed, block counts) only.
    """

    def __init__(self, block: int = 64, window_blocks: int = 3, global_blocks: int = 2,
                 random_blocks: int = 3, seed: int = 0, *, global_queries: bool = True):
        check_count("bigbird", "block", block, minimum=1)
        check_count("bigbird", "window_blocks", window_blocks, minimum=1)
        if window_blocks % 2 == 0:
            raise ValueError(f"bigbird: window_blocks must be odd (the block and as many each side), "
                             f"got {window_blocks}")
        check_count("bigbird", "global_blocks", global_blocks)
        check_count("bigbird", "random_blocks", random_blocks)
        check_count("bigbird", "seed", seed)
        self.block, self.radius = block, window_blocks // 2
        self.global_blocks, self.random_blocks, self.seed = global_blocks, random_blocks, seed
        # False leaves out the "global queries see everything" rows, for methods that compute
        # them apart (as GlobalTokens(queries=False)); the random draw does not change.
        self.global_queries = global_queries
        self._tables: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self.name = (f"bigbird(block={block}, window={window_blocks}, global={global_blocks}, "
                     f"random={random_blocks}, seed={seed})")

    def _global(self, nblocks: int) -> Tensor:
        flags = torch.zeros(nblocks, dtype=torch.bool)
        head = (self.global_blocks + 1) // 2
        flags[:head] = True
        tail = self.global_blocks // 2
        if tail:
            flags[max(nblocks - tail, 0):] = True
        return flags

    def tables(self, nq: int, nk: int) -> tuple[Tensor, Tensor, Tensor]:
        """(global query blocks, global key blocks, random key blocks (nqb, r) -1 padded)."""
        key = (nq, nk)
        if key not in self._tables:
            nqb, nkb = math.ceil(nq / self.block), math.ceil(nk / self.block)
            gq, gk = self._global(nqb), self._global(nkb)
            rnd = self._draw_random(gq, gk)
            if not self.global_queries:
                gq = torch.zeros_like(gq)
            self._tables[key] = (gq, gk, rnd)
        return self._tables[key]

    def global_query_rows(self, nq: int) -> Tensor:
        """Query positions in global blocks (int64, ascending)."""
        blocks = torch.nonzero(self._global(math.ceil(nq / self.block))).flatten()  # (g,) ascending
        # Positions from the few global blocks, not a flag per position (repeat_interleave
        # of N flags took seconds at N = 2**20).
        rows = (blocks[:, None] * self.block + torch.arange(self.block)).flatten()  # (g·block,)
        return rows[rows < nq]

    def _draw_random(self, gq: Tensor, gk: Tensor) -> Tensor:
        # Floyd's algorithm draws r distinct indices from the pool of allowed key blocks in
        # O(r) per query block, so the table costs O(N/block · r), never (N/block)². Only the
        # draws themselves run in Python (they share one generator, in order); the pool sizes
        # and the mapping of each draw to its key block are tensor operations over all query
        # blocks. ``rng.randint(0, top)`` is, in CPython's ``random``, rejection sampling of
        # ``getrandbits(k)`` with k = (top + 1).bit_length(), written out below without its three
        # wrapper calls: the same table (tests/masks check it against a randint loop), in a
        # fraction of the time at N = 2**20 (16k query blocks, 49k draws).
        bits = random.Random(self.seed).getrandbits
        nqb, nkb, r = len(gq), len(gk), self.random_blocks
        table = torch.full((nqb, r), -1, dtype=torch.int64)
        if not r or not nqb:
            return table
        i = torch.arange(nqb, dtype=torch.int64)
        lo, hi = (i - self.radius).clamp(min=0), (i + self.radius + 1).clamp(max=nkb)  # window [lo, hi)
        global_keys = torch.nonzero(gk).flatten()  # (g,)
        off_window = (global_keys[None, :] < lo[:, None]) | (global_keys[None, :] >= hi[:, None])  # (nqb, g)
        pool = nkb - (hi - lo).clamp(min=0) - off_window.sum(1)  # allowed key blocks per query block
        draw = ~gq & (pool > 0)
        picks = []
        for size in pool[draw].tolist():
            chosen: set[int] = set()
            for top in range(size - min(r, size), size):
                k = (top + 1).bit_length()
                t = bits(k)
                while t > top:
                    t = bits(k)
                chosen.add(top if t in chosen else t)
            picks.append(sorted(chosen) + [-1] * (r - len(chosen)))
        if not picks:
            return table
        t = torch.tensor(picks, dtype=torch.int64)  # (rows, r): indices into each row's pool, -1 padded
        # The t-th block of the pool: step over the excluded blocks (the window's and the global
        # ones off it) in ascending order, as many as lie at or below t.
        never = nkb + nqb + self.radius + 1  # above any index
        window = lo[:, None] + torch.arange(2 * self.radius + 1)  # (nqb, 2·radius + 1)
        window = window.masked_fill(window >= hi[:, None], never)
        glob = global_keys[None, :].expand(nqb, -1).masked_fill(~off_window, never)
        excluded = torch.cat([window, glob], 1)[draw].sort(1).values  # (rows, m)
        valid = t >= 0
        for c in range(excluded.shape[1]):
            t = t + ((excluded[:, c:c + 1] <= t) & valid)
        table[draw] = t
        return table

    def mask_fn(self, nq, nk):
        gq, gk, rnd = self.tables(nq, nk)
        block, radius = self.block, self.radius

        def mask_mod(b, h, q_idx, kv_idx):
            # Copied per call, not held in a masks.base.PerDevice: FlexAttention traces this
            # mask_mod and refuses one that writes to state outside it (its per-device dict).
            dev = q_idx.device
            fq, fk, table = gq.to(dev), gk.to(dev), rnd.to(dev)
            qb, kb = q_idx // block, kv_idx // block
            allowed = ((kb - qb).abs() <= radius) | fq[qb] | fk[kb]
            for c in range(table.shape[1]):
                allowed = allowed | (table[qb, c] == kb)
            return allowed

        return mask_mod

    def tile_states(self, g, qi, ki):
        gq, gk, rnd = self.tables(g.nq, g.nk)
        qa, qb, ka, kb = g.ranges(qi, ki)
        r0, r1 = qa // self.block, (qb - 1) // self.block  # inclusive block ranges
        c0, c1 = ka // self.block, (kb - 1) // self.block
        rad = self.radius
        win_empty = (c0 > r1 + rad) | (c1 < r0 - rad)
        win_full = (c1 - r0 <= rad) & (r1 - c0 <= rad)
        pq, pk = prefix_counts(gq), prefix_counts(gk)
        n_gq, n_gk = pq[r1 + 1] - pq[r0], pk[c1 + 1] - pk[c0]
        glob_full = (n_gq == r1 - r0 + 1) | (n_gk == c1 - c0 + 1)
        # Random hits: the random blocks of every query block in the tile, against its key blocks.
        rows = r0[..., None] + torch.arange(int((r1 - r0).max()) + 1 if r0.numel() else 1)
        in_tile = rows <= r1[..., None]
        picks = rnd[rows.clamp(max=len(gq) - 1)]  # (..., rows, r)
        hit = (picks >= c0[..., None, None]) & (picks <= c1[..., None, None]) & in_tile[..., None]
        rand_any = hit.flatten(-2).any(-1)
        empty = win_empty & (n_gq == 0) & (n_gk == 0) & ~rand_any
        return states_from(empty, win_full | glob_full)

    def kv_tile_candidates(self, g):
        gq, gk, rnd = self.tables(g.nq, g.nk)
        nqt, nkt, blk = g.num_q_tiles, g.num_kv_tiles, self.block
        qa = torch.arange(nqt, dtype=torch.int64) * g.q_tile
        qb = torch.clamp(qa + g.q_tile, max=g.nq)
        r0, r1 = qa // blk, (qb - 1) // blk
        first = ((r0 - self.radius).clamp(min=0) * blk) // g.kv_tile
        last = (((r1 + self.radius + 1) * blk).clamp(max=g.nk) - 1) // g.kv_tile
        cand = ranges_to_candidates(first, last, nkt)
        # Key tiles of the global key blocks, the same for every query tile.
        gk_tiles = self._key_tiles(torch.nonzero(gk).flatten()[None, :], g)
        cand = union_candidates(cand, gk_tiles.expand(nqt, -1))
        # Key tiles of the random blocks of every query block in the tile.
        rows = r0[:, None] + torch.arange(int((r1 - r0).max()) + 1 if nqt else 1)
        picks = rnd[rows.clamp(max=len(gq) - 1)].masked_fill(~(rows <= r1[:, None])[..., None], -1)
        cand = union_candidates(cand, self._key_tiles(picks.flatten(1), g))  # picks: (nqt, rows·r)
        # A query tile holding a global query block sees every key tile.
        pq = prefix_counts(gq)
        global_rows = (pq[r1 + 1] - pq[r0]) > 0
        if bool(global_rows.any()):
            every = torch.arange(nkt, dtype=torch.int64)[None, :].expand(nqt, nkt)
            cand = union_candidates(cand, every.masked_fill(~global_rows[:, None], -1))
        return cand


    def _key_tiles(self, blocks: Tensor, g: Grid) -> Tensor:
        """(R, n) key blocks (-1 = none) -> (R, n·span) key tiles they cover, -1 padded."""
        blk = self.block
        span = math.ceil(blk / g.kv_tile) + 1  # tiles one block can touch
        lo = (blocks * blk) // g.kv_tile
        hi = ((blocks * blk + blk).clamp(max=g.nk) - 1) // g.kv_tile
        tiles = lo[..., None] + torch.arange(span)  # (R, n, span)
        keep = (blocks[..., None] >= 0) & (tiles <= hi[..., None])
        return tiles.masked_fill(~keep, -1).flatten(-2)


def bigbird(block: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0, *, global_queries: bool = True) -> BigBird:
    """BigBird: block window + global blocks + random blocks, deterministic under ``seed``."""
    return BigBird(block, window_blocks, global_blocks, random_blocks, seed, global_queries=global_queries)
