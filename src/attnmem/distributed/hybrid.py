"""Hybrid sequence parallelism (USP, Fang & Zhao 2024): Ulysses inside groups, a ring across them.

U·R ranks form a grid: rank ``g = j·U + u`` sits in Ulysses group ``j`` (ranks jU … jU+U-1,
typically the GPUs of one node) and ring group ``u`` (ranks u, U+u, 2U+u, …)::

    U = 2, R = 2         ring group 0   ring group 1
    Ulysses group 0      rank 0         rank 1
    Ulysses group 1      rank 2         rank 3

The sequence is cut at two levels: the ring level gives ring index ``j`` its part of the
sequence (contiguous, zigzag or balanced documents over R), and the Ulysses level splits that
part into U contiguous slices, one per rank of group ``j`` (``hybrid_partition``). A call runs
the Ulysses all-to-all inside each group (now every rank holds ring part ``j`` for H/U heads),
ring attention over the R ranks of its ring group with those heads, and the inverse
all-to-all. U = 1 is ring attention; R = 1 is Ulysses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

from .. import masks as M
from ..api import validate
from ..checks import check_positive_int
from . import layout as L
from .comm import check_initialised
from .masking import heads_slice
from .ring import ring_attention
from .ulysses import HeadPass, check_heads, heads_plan, heads_to_seq, run_in_passes, seq_to_heads

SCHEME = "sequence_parallel_attention"


@dataclass(frozen=True)
class ProcessGrid:
    """The Ulysses and ring sub-groups of a U × R grid over ``group`` (see the module docstring)."""

    ulysses: int
    ring: int
    group: Any
    ulysses_group: Any  # this rank's
    ring_group: Any

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def ring_index(self) -> int:
        return self.rank // self.ulysses

    @property
    def ulysses_index(self) -> int:
        return self.rank % self.ulysses


_GRIDS: dict[tuple[int, int, int], ProcessGrid] = {}


def process_grid(*, ulysses: int, ring: int, group: Any = None) -> ProcessGrid:
    """The U × R grid over ``group`` (default the world), made once and cached.

    ``new_group`` is collective: every rank of ``group`` must ask for the same grids in the
    same order (``sequence_parallel_attention`` does, on its first call).

    Raises:
        ValueError: U·R is not the group's size, or U, R are not positive ints.
    """
    for name, val in (("ulysses", ulysses), ("ring", ring)):
        check_positive_int(name, val)
    check_initialised(SCHEME)
    world = dist.get_world_size(group)
    if ulysses * ring != world:
        raise ValueError(f"{SCHEME}: ulysses × ring must equal the group size {world}, got ulysses={ulysses}, "
                         f"ring={ring} ({ulysses * ring} ranks)")
    key = (ulysses, ring, id(group))
    if key in _GRIDS:
        return _GRIDS[key]
    members = list(range(world)) if group is None else dist.get_process_group_ranks(group)
    rank = dist.get_rank(group)
    mine_u = mine_r = None
    for j in range(ring):  # every rank creates every group, in one order
        g = dist.new_group([members[j * ulysses + u] for u in range(ulysses)])
        if rank // ulysses == j:
            mine_u = g
    for u in range(ulysses):
        g = dist.new_group([members[j * ulysses + u] for j in range(ring)])
        if rank % ulysses == u:
            mine_r = g
    grid = ProcessGrid(ulysses, ring, group, mine_u, mine_r)
    _GRIDS[key] = grid
    return grid


def ring_partition(layout: str, n: int, ring: int, documents: Any = None) -> L.Partition:
    """The ring level of the hybrid layout: ``layout`` over R parts."""
    if layout not in L.PARTITIONS:
        raise ValueError(f"layout must be one of {', '.join(L.PARTITIONS)}, got {layout!r}")
    return L.partition(layout, n, ring, documents=documents)


def hybrid_partition(layout: str, n: int, *, ulysses: int, ring: int, documents: Any = None) -> L.Partition:
    """Where every one of the U·R ranks' tokens lies: ring part ``j`` (``layout`` over R)
    split into U contiguous slices (``tensor_split`` sizes), rank ``j·U + u`` holding slice u.

    Shard with ``hybrid_partition(...).shard(x, rank)``; ``documents`` (N,) for "documents".
    """
    top = ring_partition(layout, n, ring, documents)
    return L.Partition(tuple(piece for pos in top.positions for piece in pos.tensor_split(ulysses)),
                       name=f"{layout} (ulysses {ulysses} × ring {ring})")


def sequence_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, ulysses: int, ring: int,
                                layout: str = "contiguous", causal: bool = False, mask: Any = None,
                                documents: Tensor | None = None, group: Any = None, scale: float | None = None,
                                heads_per_pass: int | None = None, ulysses_heads_per_pass: int | None = None,
                                q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto",
                                kv_blocks: int | None = None) -> Tensor:
    """Exact attention over a U × R grid of ranks (module docstring); every rank calls it.

    Args:
        q: this rank's queries (B, Hq, N_local, D), its slice of ``hybrid_partition``.
        k, v: its keys and values (B, Hkv, N_local, D). Hq must be a multiple of U; Hkv a
            multiple or a divisor of U (KV heads replicated, as in ``ulysses_attention``).
        ulysses, ring: the grid; ``ulysses · ring`` = the group's size.
        layout: the ring level: "contiguous", "zigzag" (N a multiple of 2R) or "documents"
            (balanced causal work; needs ``documents``).
        causal, mask: as in ``ring_attention`` (a mask of the whole sequence, global positions).
        documents: (N,) document id of every token, for ``layout="documents"``. It only places
            tokens; pass ``mask=attnmem.masks.document(ids)`` for document attention.
        group: the process group of all U·R ranks (default: the world).
        scale, heads_per_pass, q_tile, kv_tile, kernel: as in ``ring_attention``.
        ulysses_heads_per_pass: as ``heads_per_pass`` of ``ulysses_attention``: None (default)
            rings all Hq/U heads of a rank at once; an int c rings them c at a time, saving only
            the inputs and recomputing each pass's ring forward in the backward (per-rank memory
            of one pass's heads; one more ring forward; more q, k, v traffic).
        kv_blocks: ``ring_attention``'s: pieces every ring rank's key/value block travels in
            (same bytes, more messages; the ring's buffers in flight shrink by that factor).
            With passes those buffers are most of what a pass holds (about 12 of its ~17
            tensors of the ring part; the queries' side is about 5), so they, not the queries,
            are what is cut. None (default): 2 with ``ulysses_heads_per_pass``, else 1.

    Returns:
        This rank's output (B, Hq, N_local, D); differentiable.

    Raises:
        ValueError: a grid that does not match the group, heads that do not split over U,
            an unknown layout, or ranks that disagree.
        SequenceParallelError / RingAttentionError: a peer failed, exited or timed out.
    """
    grid = process_grid(ulysses=ulysses, ring=ring, group=group)
    inp = validate(q, k, v, causal=causal, scale=scale)
    check_heads(q.shape[1], k.shape[1], ulysses, SCHEME)
    if layout not in L.PARTITIONS:
        raise ValueError(f"layout must be one of {', '.join(L.PARTITIONS)}, got {layout!r}")
    user_mask = None if mask is None else M.as_mask(mask, "mask")
    plan = heads_plan(q, k, causal, layout, user_mask is not None, inp.scale, grid.ulysses_group, SCHEME,
                      heads_per_pass=ulysses_heads_per_pass)
    ring_layout: str | L.Partition = layout
    if layout == "documents":
        if documents is None:
            raise ValueError("layout='documents' needs documents=, the (N,) document id of every token")
        ring_layout = ring_partition("documents", int(L.check_ids(documents).numel()), ring, documents)
    first = plan.rank * plan.hq  # my first global query head
    pieces = kv_blocks if kv_blocks is not None else (1 if ulysses_heads_per_pass is None else 2)

    def run(qh: Tensor, kh: Tensor, vh: Tensor, p: HeadPass) -> Tensor:
        """Ring attention over my ring group on one pass's heads of ring part j: (B, h, N_ring, D)."""
        return ring_attention(qh, kh, vh, causal=causal, mask=heads_slice(user_mask, first + p.q[0], first + p.q[1]),
                              group=grid.ring_group, layout=ring_layout, scale=inp.scale,
                              heads_per_pass=heads_per_pass, q_tile=q_tile, kv_tile=kv_tile, kernel=kernel,
                              kv_blocks=pieces)

    if ulysses_heads_per_pass is not None:
        return run_in_passes(q, k, v, run, plan, ulysses_heads_per_pass, grid.ulysses_group, SCHEME)
    qh, kh, vh = seq_to_heads(q, k, v, plan, grid.ulysses_group)  # (B, Hq/U, N_ring, D): ring part j
    out = run(qh, kh, vh, HeadPass((0, plan.hq), (0, plan.hkv)))
    return heads_to_seq(out, plan, grid.ulysses_group, q.shape[1])


__all__ = ["sequence_parallel_attention", "process_grid", "ProcessGrid", "hybrid_partition"]
