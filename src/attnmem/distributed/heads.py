"""Sequence shards <-> head shards: the all-to-alls of Ulysses, and the plan of one call.

``ulysses`` (whole heads or passes of heads) and ``query_blocks`` (a pass's queries a block of
positions at a time) both exchange through these; the hybrid's Ulysses level too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .comm import Rows, all_to_all

SCHEME = "ulysses_attention"


@dataclass(frozen=True)
class HeadPlan:
    """Which heads go to which rank, and every rank's sequence length, for one call."""

    rank: int
    world: int
    hq: int  # query heads per rank
    kv_heads: int  # Hkv of the inputs
    lengths: tuple[int, ...]
    # Global position of every rank's tokens, when the layout is not contiguous in rank order:
    # the exchanges then place them straight into sequence order (no reordering copies).
    positions: tuple[Tensor, ...] | None = None

    @property
    def kv_replicas(self) -> int:
        """Ranks reading each KV head (1 when KV heads are sharded)."""
        return 1 if self.kv_heads % self.world == 0 else self.world // self.kv_heads

    def kv_range(self, s: int) -> tuple[int, int]:
        """KV heads rank ``s`` attends with."""
        if self.kv_replicas == 1:
            per = self.kv_heads // self.world
            return s * per, (s + 1) * per
        return s // self.kv_replicas, s // self.kv_replicas + 1

    @property
    def hkv(self) -> int:
        a, b = self.kv_range(0)
        return b - a


@dataclass(frozen=True)
class HeadPass:
    """One pass: local query heads ``q`` = [a, b) of every rank and the local KV heads ``kv`` they read."""

    q: tuple[int, int]
    kv: tuple[int, int]


def head_passes(plan: HeadPlan, heads_per_pass: int, scheme: str = SCHEME) -> list[HeadPass]:
    """The passes of ``heads_per_pass`` local query heads; ValueError unless they split evenly
    and each pass reads whole KV heads (a multiple of the query heads per KV head, or a divisor)."""
    group = plan.hq // plan.hkv  # local query heads per local KV head
    if (not isinstance(heads_per_pass, int) or isinstance(heads_per_pass, bool) or heads_per_pass <= 0
            or plan.hq % heads_per_pass or (heads_per_pass % group and group % heads_per_pass)):
        raise ValueError(
            f"{scheme}: heads_per_pass must be a positive int dividing the {plan.hq} query heads of each rank and "
            f"a multiple or a divisor of the {group} query heads per key/value head; got {heads_per_pass!r}")
    passes = []
    for a in range(0, plan.hq, heads_per_pass):
        b = a + heads_per_pass
        passes.append(HeadPass((a, b), (a // group, (b - 1) // group + 1)))
    return passes


def check_heads(hq: int, hkv: int, world: int, scheme: str = SCHEME) -> None:
    """ValueError unless Hq and Hkv can be split over ``world`` ranks (module docstring)."""
    if hq % world:
        raise ValueError(
            f"{scheme} splits the query heads over the group: Hq={hq} is not a multiple of the group size "
            f"P={world}; use a group whose size divides {hq}, or ring attention (any number of heads)"
        )
    if hkv % world and world % hkv:
        raise ValueError(
            f"{scheme} shards key/value heads when Hkv is a multiple of the group size and replicates them when "
            f"the group size is a multiple of Hkv; got Hkv={hkv} and P={world}, neither"
        )


def head_starts(plan: HeadPlan, is_kv: bool) -> list[int]:
    """First global head of every rank's share of q (or of k/v)."""
    return [plan.kv_range(s)[0] if is_kv else s * plan.hq for s in range(plan.world)]


def to_heads(plan: HeadPlan, tensors: list[Tensor], kv: list[bool], group: Any) -> list[Tensor]:
    """Sequence shards (B, H, N_r, D) -> head shards (B, h, N, D), in sequence order when
    ``plan.positions`` is set, else in rank order.

    One all-to-all per tensor, so that the send and receive buffers of only one are alive.
    """
    return [one_to_heads(plan, t, (0, plan.hkv if is_kv else plan.hq), is_kv, group) for t, is_kv in zip(tensors, kv)]


def one_to_heads(plan: HeadPlan, t: Tensor, local: tuple[int, int], is_kv: bool, group: Any) -> Tensor:
    """Local heads ``local`` = [a, b) of every rank's share, over every position: (B, b-a, N, D)."""
    a, b = local
    parts = [t[:, st + a:st + b] for st in head_starts(plan, is_kv)]  # (B, b-a, N_r, D) for rank s
    shapes = [(t.shape[0], b - a, plan.lengths[s], t.shape[3]) for s in range(plan.world)]  # (B, b-a, N_s, D)
    pieces = all_to_all(parts, shapes, group, "exchanging sequence shards for head shards",
                        kind="ulysses", scheme=SCHEME)
    if plan.positions is None:
        return torch.cat(pieces, 2)  # (B, b-a, N, D)
    full = pieces[0].new_empty(t.shape[0], b - a, sum(plan.lengths), t.shape[3])  # (B, b-a, N, D)
    for pos, piece in zip(plan.positions, pieces):
        full.index_copy_(2, pos, piece)
    return full


def to_sequence(plan: HeadPlan, tensors: list[Tensor], kv: list[bool], full_heads: list[int],
                 group: Any) -> list[Tensor]:
    """The inverse: head shards (B, h, N, D) -> sequence shards (B, H, N_r, D); a KV head that
    was replicated comes back from every reader and is summed. One tensor at a time."""
    out = []
    for t, is_kv, heads in zip(tensors, kv, full_heads):
        seq = t.new_zeros(t.shape[0], heads, plan.lengths[plan.rank], t.shape[3])  # (B, H, N_r, D)
        add_to_sequence(plan, t, (0, t.shape[1]), is_kv, seq, group)
        out.append(seq)
    return out


def add_to_sequence(plan: HeadPlan, t: Tensor, local: tuple[int, int], is_kv: bool, seq: Tensor,
                     group: Any) -> None:
    """Add head shard ``t`` (B, b-a, N, D), local heads ``local`` of every rank, into this rank's
    sequence shard ``seq`` (B, H, N_r, D) in place."""
    a, b = local
    starts = [sum(plan.lengths[:s]) for s in range(plan.world)]
    n = plan.lengths[plan.rank]
    if plan.positions is None:
        parts = [t[:, :, starts[s]:starts[s] + plan.lengths[s]] for s in range(plan.world)]  # (B, b-a, N_s, D)
    else:
        parts = [Rows(t, 2, pos) for pos in plan.positions]  # (B, b-a, N_s, D), gathered into the buffer
    shapes = [(t.shape[0], b - a, n, t.shape[3])] * plan.world  # (B, b-a, N_r, D) from every rank
    pieces = all_to_all(parts, shapes, group, "returning head shards to sequence shards", kind="ulysses",
                        scheme=SCHEME)
    for st, piece in zip(head_starts(plan, is_kv), pieces):
        seq[:, st + a:st + b] += piece
