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

With ``heads_per_pass`` (passes of c heads, recomputed in the backward) a rank holds one
pass's full-sequence heads at a time; with ``query_blocks`` as well (by default P blocks when
passes run on the tiled kernel) only the pass's k and v are full-sequence, and its queries,
output and their gradients go a block of positions at a time (``query_blocks``).

Heads: Hq must be a multiple of P. Key/value heads are sharded when Hkv is a multiple of P;
when Hkv < P and P is a multiple of Hkv (GQA/MQA), each KV head is **replicated** to the
P/Hkv ranks whose query heads read it (sent P/Hkv times: more traffic, never wrong), and their
gradients are summed on the way back. Any other Hkv is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as M
from ..api import attention, validate
from . import layout as L
from .comm import check_initialised, gather_ints
from .heads import (
    SCHEME,
    HeadPass,
    HeadPlan,
    add_to_sequence,
    check_heads,
    head_passes,
    one_to_heads,
    to_heads,
    to_sequence,
)
from .masking import heads_slice
from .query_blocks import check_block_count, resolve_query_blocks, run_query_blocks


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: HeadPlan, group):
        ctx.plan, ctx.group, ctx.heads = plan, group, (q.shape[1], k.shape[1], v.shape[1])
        return tuple(to_heads(plan, [q, k, v], [False, True, True], group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = to_sequence(ctx.plan, [dq, dk, dv],
                             [False, True, True], list(ctx.heads), ctx.group)
        return (*grads, None, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, plan: HeadPlan, group, heads: int):
        ctx.plan, ctx.group = plan, group
        return to_sequence(plan, [out], [False], [heads], group)[0]

    @staticmethod
    def backward(ctx, dout):
        return to_heads(ctx.plan, [dout], [False], ctx.group)[0], None, None, None


# A pass's local attention: (q, k, v) head shards of the pass -> its output (B, b-a, N, D).
LocalRun = Callable[[Tensor, Tensor, Tensor, HeadPass], Tensor]


def _pass_inputs(plan: HeadPlan, q: Tensor, k: Tensor, v: Tensor, p: HeadPass, group: Any) -> list[Tensor]:
    """The pass's head shards of q (B, b-a, N, D), k and v (B, kv_b-kv_a, N, D), one all-to-all each."""
    return [one_to_heads(plan, t, rng, is_kv, group) for t, rng, is_kv in ((q, p.q, False), (k, p.kv, True),
                                                                           (v, p.kv, True))]


class _Passes(torch.autograd.Function):
    """Exchange, local attention and inverse exchange, one pass of heads at a time, saving only
    the sequence shards: the backward exchanges each pass's q, k, v again and recomputes its
    local forward before its backward, so one pass's head shards are alive at a time."""

    @staticmethod
    def forward(ctx, q, k, v, run: LocalRun, plan: HeadPlan, passes: list[HeadPass], group):
        out = q.new_zeros(q.shape)  # (B, Hq, N_r, D)
        for p in passes:
            add_to_sequence(plan, run(*_pass_inputs(plan, q, k, v, p, group), p), p.q, False, out, group)
        ctx.save_for_backward(q, k, v)
        ctx.run, ctx.plan, ctx.passes, ctx.group = run, plan, passes, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        plan, group = ctx.plan, ctx.group
        grads = [torch.zeros_like(t) for t in (q, k, v)]  # (B, H, N_r, D), filled pass by pass
        for p in ctx.passes:
            heads = [t.requires_grad_() for t in _pass_inputs(plan, q, k, v, p, group)]
            dout_heads = one_to_heads(plan, dout, p.q, False, group)  # (B, b-a, N, D)
            with torch.enable_grad():
                out_heads = ctx.run(*heads, p)
            local = list(torch.autograd.grad(out_heads, heads, dout_heads))
            del heads, dout_heads, out_heads
            for grad, rng, is_kv in zip(grads, (p.q, p.kv, p.kv), (False, True, True)):
                add_to_sequence(plan, local.pop(0), rng, is_kv, grad, group)
        return (*grads, None, None, None, None)


def run_in_passes(q: Tensor, k: Tensor, v: Tensor, run: LocalRun, plan: HeadPlan, heads_per_pass: int,
                  group: Any, scheme: str = SCHEME) -> Tensor:
    """Differentiable: sequence shards in, ``run`` on every pass of ``heads_per_pass`` heads, sequence
    shards of the output back (B, Hq, N_r, D); per-rank memory of one pass's head shards."""
    return _Passes.apply(q, k, v, run, plan, head_passes(plan, heads_per_pass, scheme), group)


def heads_plan(q: Tensor, k: Tensor, causal: bool, layout: Any, masked: bool, scale: float, group: Any,
               scheme: str = SCHEME, heads_per_pass: int | None = None, query_blocks: int = 1) -> HeadPlan:
    """Handshake: every rank's shapes (and passes) must agree (the same ValueError on every rank if not)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hq, n, D = q.shape
    code = (*L.PARTITIONS, "partition").index(layout if isinstance(layout, str) else "partition")
    # Passes decide how many exchanges a call makes: ranks that disagree would wait on each other.
    passes = heads_per_pass if isinstance(heads_per_pass, int) and not isinstance(heads_per_pass, bool) else -1
    table = gather_ints([B, Hq, k.shape[1], D, int(causal), code, int(masked), int(round(scale * 2**40)),
                         0 if heads_per_pass is None else passes, query_blocks, n],
                        group, q, "exchanging shapes with the other ranks", scheme=scheme)
    for i, name in enumerate(["B", "Hq", "Hkv", "D", "causal", "layout", "mask", "scale", "heads_per_pass",
                              "query_blocks"]):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{scheme}: every rank must pass the same {name}, got {values} (by rank)")
    check_heads(Hq, k.shape[1], world, scheme)
    lengths = tuple(row[-1] for row in table)
    if min(lengths) < 1:
        raise ValueError(f"{scheme}: every rank must hold at least one token, got lengths {list(lengths)}")
    return HeadPlan(rank=rank, world=world, hq=Hq // world, kv_heads=k.shape[1], lengths=lengths)


def seq_to_heads(q: Tensor, k: Tensor, v: Tensor, plan: HeadPlan, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable: (B, H, N_r, D) slices -> (B, H/P, N, D) (in sequence order when
    ``plan.positions`` is set, else in rank order)."""
    return _SeqToHeads.apply(q, k, v, plan, group)


def heads_to_seq(out: Tensor, plan: HeadPlan, group: Any, heads: int) -> Tensor:
    """Differentiable inverse of ``seq_to_heads`` for the output (B, H/P, N, D) -> (B, H, N_r, D)."""
    return _HeadsToSeq.apply(out, plan, group, heads)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Any = None,
                      method: str = "auto", group: Any = None, layout: str | L.Partition = "contiguous",
                      scale: float | None = None, heads_per_pass: int | None = None, query_blocks: int | None = None,
                      **options: Any) -> Tensor:
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
        heads_per_pass: None (default) runs all Hq/P heads of a rank at once and keeps what the
            method saves for the backward. An int c runs them c at a time, saving nothing but
            the inputs: the backward exchanges each pass's q, k, v again and recomputes its
            forward. Per-rank memory then holds one pass's full-sequence heads instead of all
            Hq/P, for one more local forward and ``(P-1)/P`` more q, k, v traffic
            (``attnmem.distributed.traffic``). c must divide Hq/P and be a multiple or a
            divisor of Hq/Hkv.
        query_blocks: Q > 1 splits every pass's queries into Q contiguous blocks of positions
            (``attnmem.distributed.query_blocks``): the full-sequence k, v of the pass stay, the
            queries, output and their gradients are exchanged and attended a block at a time
            (the tiled exact kernel, so ``method`` "chunked" or "auto"; the same bytes sent,
            more messages). Per pass a rank then holds about 4 + 6/Q full-sequence tensors of
            the pass's heads instead of 8. None (default): P when ``heads_per_pass`` is given
            and the method is "chunked" or "auto" with at most the tile options, else 1. With
            ``heads_per_pass=None`` and Q > 1 one pass holds all Hq/P heads.
        **options: the method's own options (``window=``, ``q_tile=``, ...).

    Returns:
        This rank's output (B, Hq, N_local, D); differentiable.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: heads that do not split over the group, bad shapes, ranks that disagree
            (raised on every rank alike), a ``heads_per_pass`` that does not split the heads,
            ``query_blocks`` not a positive int at most N or with a method other than the tiled
            kernel, or what the method refuses.
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
    blocks = resolve_query_blocks(query_blocks, heads_per_pass, method, options, dist.get_world_size(group))
    plan = heads_plan(q, k, causal, layout, user_mask is not None, inp.scale, group, heads_per_pass=heads_per_pass,
                      query_blocks=blocks)
    n = sum(plan.lengths)
    check_block_count(blocks, n)
    if user_mask is not None:
        user_mask.check(q.shape[0], q.shape[1], n, n)
    order = _rank_order(layout, plan)
    if order is not None:
        plan = replace(plan, positions=tuple(order.to(q.device).split(list(plan.lengths))))
    first = plan.rank * plan.hq  # my first global query head

    def run(qh: Tensor, kh: Tensor, vh: Tensor, p: HeadPass) -> Tensor:
        """Local attention on the full sequence of one pass's heads, (B, h, N, D) in sequence order."""
        local_mask = heads_slice(user_mask, first + p.q[0], first + p.q[1])
        return attention(qh, kh, vh, method=method, causal=causal, mask=local_mask, scale=inp.scale, **options)

    if blocks > 1:
        return run_query_blocks(q, k, v, plan=plan, heads_per_pass=heads_per_pass or plan.hq, query_blocks=blocks,
                                causal=causal, mask=user_mask, scale=inp.scale, tiles=options, group=group)
    if heads_per_pass is not None:
        return run_in_passes(q, k, v, run, plan, heads_per_pass, group)
    qh, kh, vh = seq_to_heads(q, k, v, plan, group)  # (B, Hq/P, N, D) in sequence order
    return heads_to_seq(run(qh, kh, vh, HeadPass((0, plan.hq), (0, plan.hkv))), plan, group, q.shape[1])


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


__all__ = ["ulysses_attention", "check_heads", "HeadPlan", "HeadPass", "head_passes", "run_in_passes"]
