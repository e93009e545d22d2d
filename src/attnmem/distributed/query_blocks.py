"""Query blocks inside a Ulysses head pass: the full-sequence k and v of the pass's heads, the
queries (and output, dout, dq) a block of positions at a time.

With ``heads_per_pass`` = c a Ulysses rank holds, per pass, the whole sequence of c heads for
q, k, v, out, dout and the gradients: 8 tensors of (B, c, N, D). Keys and values must be whole
(every query reads them), the query side need not. Split the N global positions into Q
contiguous blocks [a, b); for every block, one all-to-all brings each rank the queries of
positions [a, b) of its heads (from whichever ranks hold them), it attends them to the full k
and v (a key chunk at a time, the same Q boundaries), and the inverse all-to-all returns the
block's output (dq in the backward) to the ranks that own those positions::

    pass p:   k, v         (B, c_kv, N, D)      all-to-all once per pass
      block:  q[a:b]       (B, c, b-a, D)       all-to-all (the owners of a..b send)
              out[a:b]     (B, c, b-a, D)       attend to key chunks [ka, kb) of k, v; inverse all-to-all

The backward of a pass exchanges k, v again (zeroed dk, dv accumulate every block's share),
then per block q[a:b] and dout[a:b], recomputes the block's output and log-sum-exp (the row
statistics the backward needs), runs the tiled backward per key chunk and returns dq[a:b];
dk, dv go back at the end of the pass. Every element still crosses the wire once per exchange
of the passes path: the bytes sent are exactly those of ``heads_per_pass`` alone
(``traffic.ulysses_bytes``); only the number of messages grows.

A rank then holds per pass 4 full-sequence tensors (k, v, dk, dv) and one block's q, out,
dout, dq, plus one key chunk's dk/dv share: 4 + 6/Q instead of 8 tensors of (B, c, N, D).

Causal attention skips the key chunks after the block, and its diagonal chunk is the local
causal mask; any other mask (windows, documents, dense) is the global mask at the pair's
positions (``masking.AtPositions``), whose empty tiles the kernel skips. The local kernel is
attnmem's tiled exact one (``method="chunked"``); other methods are refused with query blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import masks as M
from ..kernels import acc_dtype, merge_partials, tiled_attention_lse, tiled_backward_lse
from .comm import Rows, all_to_all
from .heads import SCHEME, HeadPass, HeadPlan, add_to_sequence, head_passes, head_starts, one_to_heads
from .masking import AtPositions, heads_slice

# The local methods query blocks run: attnmem's exact tiled kernel, under the names that reach it.
BLOCK_METHODS = ("chunked", "auto")
BLOCK_OPTIONS = ("q_tile", "kv_tile", "kernel")


@dataclass(frozen=True)
class QueryBlock:
    """Global positions [start, stop) and who holds them: ``local[s]`` are rank s's local
    indices of its tokens in the block, ``rows[s]`` their rows in the block (position - start)."""

    start: int
    stop: int
    local: tuple[Tensor, ...]
    rows: tuple[Tensor, ...]


def query_blocks_of(plan: HeadPlan, blocks: int, device: torch.device) -> list[QueryBlock]:
    """The ``blocks`` contiguous blocks of the N positions (``tensor_split`` sizes)."""
    n = sum(plan.lengths)
    if plan.positions is None:
        starts = [sum(plan.lengths[:s]) for s in range(plan.world)]
        positions = [torch.arange(a, a + m, device=device) for a, m in zip(starts, plan.lengths)]
    else:
        positions = list(plan.positions)
    out = []
    for rng in torch.arange(n).tensor_split(blocks):
        a, b = int(rng[0]), int(rng[-1]) + 1
        local = tuple(((pos >= a) & (pos < b)).nonzero().flatten() for pos in positions)
        out.append(QueryBlock(start=a, stop=b, local=local, rows=tuple(pos[i] - a for pos, i in zip(positions, local))))
    return out


def resolve_query_blocks(query_blocks: Any, heads_per_pass: int | None, method: str, options: dict, world: int,
                         scheme: str = SCHEME) -> int:
    """The blocks a call runs: ``query_blocks``, or by default P (blocks of N/P queries) when
    the call runs passes (``heads_per_pass`` given) on the tiled kernel, else 1 (no blocks).

    ValueError unless it is a positive int and the local method can run blocks.
    """
    if query_blocks is None:
        tiled = method in BLOCK_METHODS and set(options) <= set(BLOCK_OPTIONS)
        return world if heads_per_pass is not None and tiled else 1
    if not isinstance(query_blocks, int) or isinstance(query_blocks, bool) or query_blocks < 1:
        raise ValueError(f"{scheme}: query_blocks must be a positive int or None, got {query_blocks!r}")
    if query_blocks > 1 and method not in BLOCK_METHODS:
        raise ValueError(f"{scheme}: query_blocks={query_blocks} runs the exact tiled kernel (method 'chunked' or "
                         f"'auto'), got method={method!r}; pass query_blocks=1 to run {method!r} on whole heads")
    extra = sorted(set(options) - set(BLOCK_OPTIONS))
    if query_blocks > 1 and extra:
        raise ValueError(f"{scheme}: query_blocks={query_blocks} takes only the options {', '.join(BLOCK_OPTIONS)} "
                         f"of the tiled kernel, got {', '.join(extra)}")
    return query_blocks


def check_block_count(query_blocks: int, n: int, scheme: str = SCHEME) -> None:
    """ValueError unless every block holds at least one position."""
    if query_blocks > n:
        raise ValueError(f"{scheme}: query_blocks must be at most the sequence length {n}, got {query_blocks}")


def _block_to_heads(plan: HeadPlan, t: Tensor, local: tuple[int, int], blk: QueryBlock, group: Any) -> Tensor:
    """Local heads ``local`` = [a, b) of every rank's share at positions [start, stop): (B, b-a, stop-start, D)."""
    a, b = local
    mine = blk.local[plan.rank]
    parts = [Rows(t[:, st + a:st + b], 2, mine) for st in head_starts(plan, False)]  # (B, b-a, my tokens, D)
    shapes = [(t.shape[0], b - a, i.numel(), t.shape[3]) for i in blk.local]  # (B, b-a, rank s's tokens, D)
    pieces = all_to_all(parts, shapes, group, "exchanging a query block for head shards", kind="ulysses",
                        scheme=SCHEME)
    full = t.new_empty(t.shape[0], b - a, blk.stop - blk.start, t.shape[3])  # (B, b-a, block, D)
    for rows, piece in zip(blk.rows, pieces):
        full.index_copy_(2, rows, piece)
    return full


def _block_add_to_sequence(plan: HeadPlan, t: Tensor, local: tuple[int, int], blk: QueryBlock, seq: Tensor,
                           group: Any) -> None:
    """Add block ``t`` (B, b-a, block, D) of local heads ``local`` into this rank's sequence shard
    ``seq`` (B, H, N_r, D) at its positions in the block, in place."""
    a, b = local
    mine = blk.local[plan.rank]
    parts = [Rows(t, 2, rows) for rows in blk.rows]  # (B, b-a, rank s's tokens, D): rank s's rows
    shapes = [(t.shape[0], b - a, mine.numel(), t.shape[3])] * plan.world  # (B, b-a, my tokens, D) from each
    pieces = all_to_all(parts, shapes, group, "returning a query block to sequence shards", kind="ulysses",
                        scheme=SCHEME)
    for st, piece in zip(head_starts(plan, False), pieces):
        seq[:, st + a:st + b].index_add_(2, mine, piece.to(seq.dtype))


@dataclass(frozen=True)
class BlockedRun:
    """One call's query blocks: the head plan, passes, blocks and the local kernel's options."""

    plan: HeadPlan
    passes: list[HeadPass]
    blocks: list[QueryBlock]
    causal: bool
    mask: M.Mask | None  # of the whole sequence, all global query heads
    first_head: int  # this rank's first global query head
    scale: float
    tiles: dict

    @property
    def n(self) -> int:
        return sum(self.plan.lengths)

    def pairs(self, blk: QueryBlock, p: HeadPass) -> list[tuple[int, int, M.Mask | None]]:
        """(key start, key stop, mask) of the key chunks block ``blk`` attends to, for pass ``p``."""
        mask = heads_slice(self.mask, self.first_head + p.q[0], self.first_head + p.q[1])
        out = []
        for c in self.blocks:
            if self.causal and c.start >= blk.stop:
                break  # every key after every query of the block (chunks are in order)
            if mask is None:
                if not self.causal or c.stop - 1 <= blk.start:
                    out.append((c.start, c.stop, None))  # no mask, or every key at or before every query
                elif (c.start, c.stop) == (blk.start, blk.stop):
                    out.append((c.start, c.stop, M.causal()))
                else:
                    out.append((c.start, c.stop, self._at(M.causal(), blk, c)))
                continue
            out.append((c.start, c.stop, self._at(M.combine(self.causal, mask), blk, c)))
        return out

    def _at(self, mask: M.Mask, blk: QueryBlock, c: QueryBlock) -> M.Mask:
        dev = blk.rows[0].device
        q_pos, k_pos = torch.arange(blk.start, blk.stop, device=dev), torch.arange(c.start, c.stop, device=dev)
        return AtPositions(mask, q_pos, k_pos, self.n)

    def forward_block(self, q: Tensor, k: Tensor, v: Tensor, blk: QueryBlock, p: HeadPass) -> tuple[Tensor, Tensor]:
        """Output (B, c, block, D) in the accumulation dtype and lse (B, c, block) of the block's queries."""
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, c, block, D)
        lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)  # (B, c, block)
        for ka, kb, mask in self.pairs(blk, p):
            o, l_ = tiled_attention_lse(q, k[:, :, ka:kb], v[:, :, ka:kb], mask=mask, scale=self.scale, **self.tiles)
            merge_partials(out, lse, o, l_, inplace=True)
        return out, lse

    def backward_block(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       dk: Tensor, dv: Tensor, blk: QueryBlock, p: HeadPass) -> Tensor:
        """dq (B, c, block, D) of the block; adds its share into ``dk``, ``dv`` (B, c_kv, N, D)."""
        dq = torch.zeros(q.shape, dtype=dk.dtype, device=q.device)  # (B, c, block, D)
        for ka, kb, mask in self.pairs(blk, p):
            dq_p, dk_p, dv_p = tiled_backward_lse(dout, q, k[:, :, ka:kb], v[:, :, ka:kb], out, lse, mask=mask,
                                                  scale=self.scale, cast=False, **self.tiles)
            dq += dq_p
            dk[:, :, ka:kb] += dk_p
            dv[:, :, ka:kb] += dv_p
            del dq_p, dk_p, dv_p
        return dq


class _BlockedPasses(torch.autograd.Function):
    """Ulysses passes with query blocks (module docstring), saving only the sequence shards."""

    @staticmethod
    def forward(ctx, q, k, v, run: BlockedRun, group):
        plan = run.plan
        out = q.new_zeros(q.shape)  # (B, Hq, N_r, D)
        for p in run.passes:
            kh, vh = (one_to_heads(plan, t, p.kv, True, group) for t in (k, v))  # (B, c_kv, N, D)
            for blk in run.blocks:
                qb = _block_to_heads(plan, q, p.q, blk, group)  # (B, c, block, D)
                ob, _ = run.forward_block(qb, kh, vh, blk, p)
                _block_add_to_sequence(plan, ob.to(q.dtype), p.q, blk, out, group)
                del qb, ob
            del kh, vh
        ctx.save_for_backward(q, k, v)
        ctx.run, ctx.group = run, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        run, group = ctx.run, ctx.group
        plan = run.plan
        grads = [torch.zeros_like(t) for t in (q, k, v)]  # (B, H, N_r, D), filled pass by pass
        acc = acc_dtype(q.dtype)
        for p in run.passes:
            kh, vh = (one_to_heads(plan, t, p.kv, True, group) for t in (k, v))  # (B, c_kv, N, D)
            dk, dv = (torch.zeros(kh.shape, dtype=acc, device=kh.device) for _ in range(2))  # (B, c_kv, N, D)
            for blk in run.blocks:
                qb = _block_to_heads(plan, q, p.q, blk, group)  # (B, c, block, D)
                dob = _block_to_heads(plan, dout, p.q, blk, group)  # (B, c, block, D)
                ob, lb = run.forward_block(qb, kh, vh, blk, p)
                dqb = run.backward_block(dob, qb, kh, vh, ob, lb, dk, dv, blk, p)
                del qb, dob, ob, lb
                _block_add_to_sequence(plan, dqb.to(q.dtype), p.q, blk, grads[0], group)
                del dqb
            del kh, vh
            # One at a time, and no name left holding this pass's dk or dv into the next pass.
            add_to_sequence(plan, dk.to(grads[1].dtype), p.kv, True, grads[1], group)
            del dk
            add_to_sequence(plan, dv.to(grads[2].dtype), p.kv, True, grads[2], group)
            del dv
        return (*grads, None, None)


def run_query_blocks(q: Tensor, k: Tensor, v: Tensor, *, plan: HeadPlan, heads_per_pass: int, query_blocks: int,
                     causal: bool, mask: M.Mask | None, scale: float, tiles: dict, group: Any,
                     scheme: str = SCHEME) -> Tensor:
    """Differentiable: Ulysses passes of ``heads_per_pass`` heads, ``query_blocks`` blocks of queries
    each, on the tiled exact kernel; sequence shards in and out (B, Hq, N_r, D)."""
    run = BlockedRun(plan=plan, passes=head_passes(plan, heads_per_pass, scheme),
                     blocks=query_blocks_of(plan, query_blocks, q.device), causal=causal, mask=mask,
                     first_head=plan.rank * plan.hq, scale=scale, tiles=tiles)
    return _BlockedPasses.apply(q, k, v, run, group)


__all__ = ["run_query_blocks", "resolve_query_blocks", "check_block_count", "query_blocks_of", "QueryBlock",
           "BLOCK_METHODS"]
