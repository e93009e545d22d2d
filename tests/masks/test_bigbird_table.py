"""BigBird's random-block table against its written-out definition: Floyd's algorithm with
``random.Random(seed).randint``, one query block after another (the loop the vectorised
``BigBird._draw_random`` replaced; the table decides which keys the kernel computes)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from attnmem import masks as M


def _reference_table(mask: M.BigBird, nq: int, nk: int) -> torch.Tensor:
    nqb, nkb, r = math.ceil(nq / mask.block), math.ceil(nk / mask.block), mask.random_blocks
    gq, gk = mask._global(nqb), mask._global(nkb)
    rng = random.Random(mask.seed)
    global_keys = torch.nonzero(gk).flatten().tolist()
    rows = []
    for i in range(nqb):
        excluded = sorted(set(range(max(i - mask.radius, 0), min(i + mask.radius + 1, nkb))) | set(global_keys))
        pool = nkb - len(excluded)
        picked = []
        if not gq[i] and pool > 0 and r > 0:
            chosen: set[int] = set()
            for top in range(pool - min(r, pool), pool):
                t = rng.randint(0, top)
                chosen.add(top if t in chosen else t)
            for t in sorted(chosen):
                for e in excluded:
                    if e <= t:
                        t += 1
                picked.append(t)
        rows.append(picked + [-1] * (r - len(picked)))
    return torch.tensor(rows, dtype=torch.int64).reshape(nqb, r)


@pytest.mark.parametrize("args, nq, nk", [
    ((64, 3, 2, 3, 0), 2**16, 2**16),
    ((4, 3, 2, 2, 1), 1000, 1000),
    ((8, 5, 3, 4, 7), 999, 999),
    ((16, 1, 0, 3, 2), 4096, 4096),
    ((2, 3, 1, 40, 3), 100, 100),  # more random blocks than the pool holds for some rows
    ((4, 3, 2, 3, 5), 200, 320),  # more keys than queries
    ((4, 7, 2, 2, 5), 320, 200),  # more queries than keys: the last blocks' windows are empty
    ((4, 3, 2, 0, 5), 64, 64),  # no random blocks
])
def test_random_table_is_the_randint_loop(args, nq, nk):
    mask = M.bigbird(*args)
    _, _, table = mask.tables(nq, nk)
    assert torch.equal(table, _reference_table(mask, nq, nk))


@pytest.mark.parametrize("n", [1, 50, 1000, 4097])
def test_global_query_rows_are_the_positions_of_global_blocks(n):
    mask = M.bigbird(block=16, global_blocks=3)
    flags = mask._global(math.ceil(n / 16)).repeat_interleave(16)[:n]
    assert torch.equal(mask.global_query_rows(n), torch.nonzero(flags).flatten())
