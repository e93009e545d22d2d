"""DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-all from sequence shards to head shards.

Every rank of a group of P holds its slice of the sequence for all H heads. One all-to-all
gives every rank the WHOLE sequence for H/P heads; any attnmem method then runs locally (masks
are masks of the whole sequence, so they apply unchanged); a second all-to-all returns each
rank its slice of the output for all heads::

    rank r holds   (B, H, N_r, D)          sequence slice r, every head
      all-to-all   part s = heads [s·H/P, (s+1)·H/P) of my slice  -> rank s
    rank r holds   (B, H/P, N, D)          every position, heads of rank r
      attention    attnmem.attention(..., method=method, mask=mask)
      all-to-all   the inverse
    rank r holds   (B, H, N_r, D)

The backward runs the same two all-to-alls the other way (autograd Functions around the
exchanges; the local method's own backward in between). Per step (forward + backward) a
rank sends ``2·(P-1)/P · B·N_r·D·(2·Hq + 2·Hkv)`` elements (q, k, v and out; then dout, dq, dk,
dv) — see ``attnmem.distributed.traffic``.

Heads: Hq must be a multiple of P. Key/value heads are sharded when Hkv is a multiple of P;
when Hkv < P and P is a multiple of Hkv (GQA/MQA), each KV head is **replicated** to the
P/Hkv ranks whose query heads read it (sent P/Hkv times: more traffic, never wrong), and their
gradients are summed on the way back. Any other Hkv is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as M
from ..api import attention, validate
from . import layout as L
from .comm import all_to_all, check_initialised, gather_ints
from .masking import heads_slice

SCHEME = "ulysses_attention"


@dataclass(frozen=True)
class HeadPlan:
    """Which heads go to which rank, and every rank's sequence length, for one call."""

    rank: int
    world: int
    hq: int  # query heads per rank
    kv_heads: int  # Hkv of the inputs
    lengths: tuple[int, ...]

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


def _to_heads(plan: HeadPlan, tensors: list[Tensor], kv: list[bool], group: Any) -> list[Tensor]:
    """Sequence shards (B, H, N_r, D) -> head shards (B, h, N, D) in rank order of positions.

    One all-to-all per tensor, so that the send and receive buffers of only one are alive.
    """
    return [_one_to_heads(plan, t, is_kv, group) for t, is_kv in zip(tensors, kv)]


def _one_to_heads(plan: HeadPlan, t: Tensor, is_kv: bool, group: Any) -> Tensor:
    h = plan.hkv if is_kv else plan.hq
    ranges = [plan.kv_range(s) if is_kv else (s * plan.hq, (s + 1) * plan.hq) for s in range(plan.world)]
    shapes = [(t.shape[0], h, plan.lengths[s], t.shape[3]) for s in range(plan.world)]  # (B, h, N_s, D)
    pieces = all_to_all([t[:, a:b] for a, b in ranges], shapes, group, "exchanging sequence shards for head shards",
                        kind="ulysses", scheme=SCHEME)
    return torch.cat(pieces, 2)  # (B, h, N, D)


def _to_sequence(plan: HeadPlan, tensors: list[Tensor], kv: list[bool], full_heads: list[int],
                 group: Any) -> list[Tensor]:
    """The inverse: head shards (B, h, N, D) -> sequence shards (B, H, N_r, D); a KV head that
    was replicated comes back from every reader and is summed. One tensor at a time."""
    return [_one_to_sequence(plan, t, is_kv, heads, group) for t, is_kv, heads in zip(tensors, kv, full_heads)]


def _one_to_sequence(plan: HeadPlan, t: Tensor, is_kv: bool, heads: int, group: Any) -> Tensor:
    starts = [sum(plan.lengths[:s]) for s in range(plan.world)]
    n = plan.lengths[plan.rank]
    parts = [t[:, :, starts[s]:starts[s] + plan.lengths[s]] for s in range(plan.world)]  # (B, h, N_s, D)
    shapes = [(t.shape[0], t.shape[1], n, t.shape[3])] * plan.world  # (B, h, N_r, D) from every rank
    pieces = all_to_all(parts, shapes, group, "returning head shards to sequence shards", kind="ulysses",
                        scheme=SCHEME)
    out = t.new_zeros(t.shape[0], heads, n, t.shape[3])  # (B, H, N_r, D)
    for s, piece in enumerate(pieces):
        a, b = plan.kv_range(s) if is_kv else (s * plan.hq, (s + 1) * plan.hq)
        out[:, a:b] += piece
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: HeadPlan, group):
        ctx.plan, ctx.group, ctx.heads = plan, group, (q.shape[1], k.shape[1], v.shape[1])
        return tuple(_to_heads(plan, [q, k, v], [False, True, True], group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = _to_sequence(ctx.plan, [dq.contiguous(), dk.contiguous(), dv.contiguous()],
                             [False, True, True], list(ctx.heads), ctx.group)
        return (*grads, None, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, plan: HeadPlan, group, heads: int):
        ctx.plan, ctx.group = plan, group
        return _to_sequence(plan, [out.contiguous()], [False], [heads], group)[0]

    @staticmethod
    def backward(ctx, dout):
        return _to_heads(ctx.plan, [dout.contiguous()], [False], ctx.group)[0], None, None, None


def heads_plan(q: Tensor, k: Tensor, causal: bool, layout: Any, masked: bool, scale: float, group: Any,
               scheme: str = SCHEME) -> HeadPlan:
    """Handshake: every rank's shapes must agree (the same ValueError on every rank if not)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hq, n, D = q.shape
    code = (*L.PARTITIONS, "partition").index(layout if isinstance(layout, str) else "partition")
    table = gather_ints([B, Hq, k.shape[1], D, int(causal), code, int(masked), int(round(scale * 2**40)), n],
                        group, q, "exchanging shapes with the other ranks", scheme=scheme)
    for i, name in enumerate(["B", "Hq", "Hkv", "D", "causal", "layout", "mask", "scale"]):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{scheme}: every rank must pass the same {name}, got {values} (by rank)")
    check_heads(Hq, k.shape[1], world, scheme)
    lengths = tuple(row[-1] for row in table)
    if min(lengths) < 1:
        raise ValueError(f"{scheme}: every rank must hold at least one token, got lengths {list(lengths)}")
    return HeadPlan(rank=rank, world=world, hq=Hq // world, kv_heads=k.shape[1], lengths=lengths)


def seq_to_heads(q: Tensor, k: Tensor, v: Tensor, plan: HeadPlan, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable: (B, H, N_r, D) slices -> (B, H/P, N, D) with positions in rank order."""
    return _SeqToHeads.apply(q, k, v, plan, group)


def heads_to_seq(out: Tensor, plan: HeadPlan, group: Any, heads: int) -> Tensor:
    """Differentiable inverse of ``seq_to_heads`` for the output (B, H/P, N, D) -> (B, H, N_r, D)."""
    return _HeadsToSeq.apply(out, plan, group, heads)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Any = None,
                      method: str = "auto", group: Any = None, layout: str | L.Partition = "contiguous",
                      scale: float | None = None, **options: Any) -> Tensor:
    """Exact (or the method's own) attention over a sequence split across ``group``, by heads.

    Every rank of the group calls this with its slice of the one sequence.

    Args:
        q: this rank's queries (B, Hq, N_local, D); Hq a multiple of the group size P.
        k, v: this rank's keys and values (B, Hkv, N_local, D), the same tokens; Hkv a multiple
            of P (sharded) or a divisor of P (replicated, see the module docstring).
        causal: causal attention over the global positions.
        mask: a mask of the WHOLE sequence (global positions, all Hq heads): an
            ``attnmem.masks.Mask`` or a bool tensor broadcastable to (B, Hq, N, N). Every rank
            passes the same one; each applies it to its heads of the full sequence.
        method: any attnmem method (``attnmem.methods()``), run on the full sequence of H/P heads.
        group: the process group (default: the world).
        layout: how the sequence was split: "contiguous" (slices may differ in length),
            "zigzag", or a ``Partition`` (e.g. ``balanced_documents``); the full sequence is put
            back in order before the local call.
        scale: multiplier of QKᵀ; default ``1/sqrt(D)``.
        **options: the method's own options (``window=``, ``q_tile=``, ...).

    Returns:
        This rank's output (B, Hq, N_local, D); differentiable.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: heads that do not split over the group, bad shapes, ranks that disagree
            (raised on every rank alike), or what the method refuses.
        SequenceParallelError: a peer failed, exited or timed out.
    """
    check_initialised(SCHEME)
    inp = validate(q, k, v, causal=causal, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{SCHEME} is self-attention over one split sequence: q has N_local={q.shape[2]}, "
                         f"k has {k.shape[2]}")
    if not isinstance(layout, L.Partition):
        L.check_layout(layout)
    user_mask = None if mask is None else M.as_mask(mask, "mask")
    plan = heads_plan(q, k, causal, layout, user_mask is not None, inp.scale, group)
    n = sum(plan.lengths)
    if user_mask is not None:
        user_mask.check(q.shape[0], q.shape[1], n, n)
    qh, kh, vh = seq_to_heads(q, k, v, plan, group)  # (B, Hq/P, N, D), positions in rank order
    order = _rank_order(layout, plan)
    if order is not None:
        inverse = torch.argsort(order).to(q.device)
        qh, kh, vh = (t.index_select(2, inverse) for t in (qh, kh, vh))  # (B, h, N, D) in sequence order
    local_mask = heads_slice(user_mask, plan.rank * plan.hq, (plan.rank + 1) * plan.hq)
    out = attention(qh, kh, vh, method=method, causal=causal, mask=local_mask, scale=inp.scale, **options)
    if order is not None:
        out = out.index_select(2, order.to(q.device))  # (B, h, N, D) back in rank order
    return heads_to_seq(out, plan, group, q.shape[1])


def _rank_order(layout: str | L.Partition, plan: HeadPlan) -> Tensor | None:
    """Global position of each token of the rank-ordered sequence; None when that is 0..N-1."""
    if isinstance(layout, L.Partition):
        if layout.lengths != list(plan.lengths):
            raise ValueError(f"{SCHEME}: the partition gives the ranks {layout.lengths} tokens, but they hold "
                             f"{list(plan.lengths)}")
        return layout.permutation
    if layout == "contiguous":
        return None
    n = sum(plan.lengths)
    if len(set(plan.lengths)) > 1 or plan.lengths[0] % 2:
        raise ValueError(f"{SCHEME}: layout='zigzag' needs one even local length on every rank, got "
                         f"{list(plan.lengths)}")
    return L.partition("zigzag", n, plan.world).permutation


__all__ = ["ulysses_attention", "check_heads", "HeadPlan"]
