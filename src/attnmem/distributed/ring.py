"""Ring attention (Liu et al. 2023) on torch.distributed point-to-point operations.

Every rank of the group holds a slice of the sequence: its queries, keys and values. The key
and value blocks travel around the ring (rank r sends to r+1 and receives from r-1) while each
rank attends its queries to the block it holds; partial results merge by their log-sum-exp,
so the output is exact::

    step 0: rank r attends to block r        (its own; causal -> the diagonal)
    step t: rank r attends to block r - t    (sent on by rank r-1 during step t-1)

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The backward sends the blocks round again. ``dq`` accumulates on its own rank; the ``dk``/``dv``
of a block travel with it, each rank adding its share, and arrive back at their owner after P
steps. The sends of the next block are posted before the current block is computed, so
communication overlaps the compute. The local step is attnmem's tiled (``chunked``) kernel
with the global output and log-sum-exp, so a rank holds O(N/P) memory.

To bound the buffers in flight (the block being computed, the one arriving and, in the
backward, two travelling gradients), the ring runs once per group of ``heads_per_pass`` key/value
heads; in the backward they add about 11 · heads_per_pass / Hkv times the size of the local q
(for Hq = Hkv) to the local q, k, v, out, dq, dk, dv.

``kv_blocks`` = m cuts each rank's block into m pieces of positions and turns the ring once
per piece (in each head pass): the buffers in flight are a piece's, 1/m of the block's, and the
bytes sent are the same (``traffic``). The causal pairs below are cut to the piece: in the own
block, the queries before the piece skip it, those in it take the causal square, those after
take it whole.

Causal masks per (local queries, visiting keys) pair are full, empty (skipped) or the local
causal diagonal — see ``_Ring.pairs``. With the ``contiguous`` layout the last rank does P times
the work of the first; ``layout="zigzag"`` (see ``attnmem.distributed.layout``) balances it.

Any other mask (windows, documents, ...) is a mask of the whole sequence at global positions,
and any ``Partition`` of the sequence (``layout.balanced_documents``) works: every rank learns
every rank's global positions once per call, and each (my queries, visiting block) pair runs
with the global mask evaluated at those positions (``masking.AtPositions``); the tiles it
leaves empty are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as M
from ..api import validate
from ..kernels import LseAttention, acc_dtype, merge_partials, tiled_attention_lse, tiled_backward_lse
from . import layout as L
from .comm import SequenceParallelError, gather_ints, nbytes, peer_errors, record, wait_all
from .masking import AtPositions, heads_slice

_KV_TAG, _DKV_TAG = 1, 2
_ALL = slice(None)


class RingAttentionError(SequenceParallelError):
    """A peer failed, exited or timed out while this rank waited on the ring."""


@dataclass(frozen=True)
class _Ring:
    """One call's ring: group, peers, lengths of every rank's slice, and the kernel options."""

    group: Any
    rank: int
    world: int
    send_to: int  # global ranks
    recv_from: int
    lengths: tuple[int, ...]
    layout: str
    causal: bool
    scale: float
    heads_per_pass: int
    q_tile: int
    kv_tile: int
    kernel: str
    # The general path: the global mask (causal included) and every rank's global positions.
    mask: M.Mask | None = None
    positions: tuple[Tensor, ...] | None = None
    # Pieces every rank's key/value block travels in (one rotation of the ring per piece).
    kv_blocks: int = 1

    def piece(self, src: int, i: int) -> tuple[int, int]:
        """Local positions [a, b) of piece ``i`` of rank ``src``'s block (``tensor_split`` sizes)."""
        n, m = self.lengths[src], self.kv_blocks
        return i * (n // m) + min(i, n % m), (i + 1) * (n // m) + min(i + 1, n % m)

    def piece_len(self, step: int, i: int) -> int:
        """Length of piece ``i`` of the block this rank holds at ``step``."""
        a, b = self.piece((self.rank - step) % self.world, i)
        return b - a

    def piece_pairs(self, src: int, i: int, n_local: int, h0: int = 0,
                    h1: int = 0) -> list[tuple[slice, slice, M.Mask | None]]:
        """``pairs`` for piece ``i`` of the block from ``src``: key slices relative to the piece."""
        if self.kv_blocks == 1:
            return self.pairs(src, n_local, h0, h1)
        pa, pb = self.piece(src, i)
        if self.positions is not None:
            q_pos, k_pos = self.positions[self.rank], self.positions[src][pa:pb]
            if self.causal and int(k_pos.min()) > int(q_pos.max()):
                return []
            if self.mask is None:
                return [(_ALL, _ALL, None)]
            n = sum(p.numel() for p in self.positions)
            return [(_ALL, _ALL, AtPositions(heads_slice(self.mask, h0, h1), q_pos, k_pos, n))]
        out = []
        for qs, ks, mask in self.pairs(src, n_local):
            lo, hi = max(ks.start or 0, pa), min(self.lengths[src] if ks.stop is None else ks.stop, pb)
            if lo >= hi:
                continue
            rel = _ALL if (lo, hi) == (pa, pb) else slice(lo - pa, hi - pa)
            if mask is None:
                out.append((qs, rel, None))
                continue
            # The own block's causal diagonal (queries and keys are the same positions): queries
            # before the piece see none of it, those in it its causal square, those after all.
            out.append((slice(pa, pb), rel, M.causal()))
            if pb < n_local:
                out.append((slice(pb, None), rel, None))
        return out

    def pairs(self, src: int, n_local: int, h0: int = 0, h1: int = 0) -> list[tuple[slice, slice, M.Mask | None]]:
        """(query slice, key slice, mask) pieces of my queries × the block from rank ``src``.

        Positions are ordered by rank (contiguous) or by chunk (zigzag: rank r holds chunks r
        and 2P-1-r), so with a causal mask the own block is the local causal diagonal and
        every other piece is full or empty::

            contiguous   src < me: all × all      src > me: nothing
            zigzag       src < me: all × first half of the keys (their early chunk)
                         src > me: second half of the queries (my late chunk) × all
        """
        if self.positions is not None:
            return self.general_pairs(src, h0, h1)
        if not self.causal:
            return [(_ALL, _ALL, None)]
        if src == self.rank:
            return [(_ALL, _ALL, M.causal())]
        if self.layout == "contiguous":
            return [(_ALL, _ALL, None)] if src < self.rank else []
        half = n_local // 2
        if src < self.rank:
            return [(_ALL, slice(0, half), None)]
        return [(slice(half, None), _ALL, None)]

    def general_pairs(self, src: int, h0: int, h1: int) -> list[tuple[slice, slice, M.Mask | None]]:
        """The global mask at (my positions, ``src``'s positions) for query heads h0:h1."""
        q_pos, k_pos = self.positions[self.rank], self.positions[src]
        if self.causal and int(k_pos.min()) > int(q_pos.max()):
            return []  # every key after every query
        if self.mask is None:
            return [(_ALL, _ALL, None)]
        mask = heads_slice(self.mask, h0, h1)
        n = sum(p.numel() for p in self.positions)
        return [(_ALL, _ALL, AtPositions(mask, q_pos, k_pos, n))]

    def exchange(self, tensors: list[Tensor], recv_len: int, tag: int, what: str) -> tuple[list[Tensor], list]:
        """Post sends of ``tensors`` to the next rank and receives of the same shapes (with
        ``recv_len`` positions) from the previous one; return the receive buffers and works."""
        recvs = []
        for t in tensors:
            shape = list(t.shape)
            shape[2] = recv_len
            recvs.append(t.new_empty(shape))
        # The fused backward may return dk/dv in a transposed layout; sends need contiguous
        # memory, and the list of works keeps the sent tensors alive until they are waited on.
        sends = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group, tag) for t in sends]
        ops += [dist.P2POp(dist.irecv, r, self.recv_from, self.group, tag) for r in recvs]
        with _peer_errors(self.rank, self.world, f"sending / receiving {what}"):
            works = dist.batch_isend_irecv(ops)
        record("ring " + ("k/v" if tag == _KV_TAG else "dk/dv"), sum(nbytes(t) for t in sends))
        return recvs, [*works, *sends]

    def wait(self, works: list, what: str) -> None:
        _wait(works, self.rank, self.world, what)

    def kernel_opts(self) -> dict[str, Any]:
        return dict(scale=self.scale, q_tile=self.q_tile, kv_tile=self.kv_tile, kernel=self.kernel)


def _peer_errors(rank: int, world: int, what: str):
    """Turn a backend error (peer gone, timeout) into one RingAttentionError naming the step."""
    return peer_errors(rank, world, what, "ring_attention", RingAttentionError)


def _wait(works: list, rank: int, world: int, what: str) -> None:
    wait_all(works, rank, world, what, "ring_attention", RingAttentionError)


def _head_passes(hkv: int, per_pass: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_pass, hkv)) for a in range(0, hkv, per_pass)]


def _ring_forward(r: _Ring, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, Hq, n, D = q.shape
    G = Hq // k.shape[1]
    acc = acc_dtype(q.dtype)
    out = q.new_zeros(B, Hq, n, D)  # (B, Hq, N_local, D)
    lse = torch.full((B, Hq, n), -math.inf, dtype=acc, device=q.device)  # (B, Hq, N_local)
    for ha, hb in _head_passes(k.shape[1], r.heads_per_pass):
        q_h = q[:, ha * G:hb * G]  # (B, G·h, N_local, D): the query heads of these kv heads
        # Accumulate straight into the output unless its dtype is narrower than the merge's.
        direct = out.dtype == acc
        out_h = out[:, ha * G:hb * G] if direct else torch.zeros(q_h.shape, dtype=acc, device=q.device)
        lse_h = lse[:, ha * G:hb * G]
        for i in range(r.kv_blocks):
            pa, pb = r.piece(r.rank, i)
            kv = [k[:, ha:hb, pa:pb].contiguous(), v[:, ha:hb, pa:pb].contiguous()]  # (B, h, N_piece, D)
            for step in range(r.world):
                if step < r.world - 1:
                    nxt, works = r.exchange(kv, r.piece_len(step + 1, i), _KV_TAG, "key/value blocks (forward)")
                for qs, ks, mask in r.piece_pairs((r.rank - step) % r.world, i, n, ha * G, hb * G):
                    o, l_ = tiled_attention_lse(q_h[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], mask=mask,
                                                **r.kernel_opts())
                    merge_partials(out_h[:, :, qs], lse_h[:, :, qs], o, l_, inplace=True)
                if step < r.world - 1:
                    r.wait(works, f"receiving key/value block {step + 1} of {r.world - 1} (forward)")
                    kv = nxt
        if not direct:
            out[:, ha * G:hb * G] = out_h.to(q.dtype)
    return out, lse


def _ring_backward(r: _Ring, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    B, Hq, n, D = q.shape
    G = Hq // k.shape[1]
    acc = acc_dtype(q.dtype)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for ha, hb in _head_passes(k.shape[1], r.heads_per_pass):
        qh = slice(ha * G, hb * G)
        q_h, do_h, o_h, l_h = q[:, qh], dout[:, qh], out[:, qh], lse[:, qh]
        direct = dq.dtype == acc
        dq_h = dq[:, qh] if direct else torch.zeros(q_h.shape, dtype=acc, device=q.device)
        for i in range(r.kv_blocks):
            pa, pb = r.piece(r.rank, i)
            kv = [k[:, ha:hb, pa:pb].contiguous(), v[:, ha:hb, pa:pb].contiguous()]  # (B, h, N_piece, D)
            dkv: list[Tensor] = []
            dkv_recv: list[Tensor] = []
            dkv_works: list = []
            for step in range(r.world):
                last = step == r.world - 1
                if not last:
                    nxt, kv_works = r.exchange(kv, r.piece_len(step + 1, i), _KV_TAG, "key/value blocks (backward)")
                # Gradients of the visiting block from my queries (None where nothing is attended).
                share: list[Tensor] | None = None
                for qs, ks, mask in r.piece_pairs((r.rank - step) % r.world, i, n, ha * G, hb * G):
                    dq_p, dk_p, dv_p = tiled_backward_lse(
                        do_h[:, :, qs], q_h[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], o_h[:, :, qs],
                        l_h[:, :, qs], mask=mask, **r.kernel_opts())
                    dq_h[:, :, qs] += dq_p
                    if ks == _ALL and share is None:
                        share = [dk_p, dv_p]
                    else:
                        share = share or [torch.zeros_like(kv[0]), torch.zeros_like(kv[1])]
                        share[0][:, :, ks] += dk_p
                        share[1][:, :, ks] += dv_p
                    del dq_p, dk_p, dv_p
                if step == 0:
                    dkv = share or [torch.zeros_like(kv[0]), torch.zeros_like(kv[1])]
                else:
                    r.wait(dkv_works, f"receiving the key/value gradients of step {step} (backward)")
                    dkv = dkv_recv
                    if share is not None:
                        dkv[0] += share[0]
                        dkv[1] += share[1]
                del share
                if r.world > 1:
                    # Pass the block's gradients on; after the last step they reach their owner.
                    dkv_recv, dkv_works = r.exchange(dkv, r.piece_len(step + 1, i), _DKV_TAG,
                                                     "key/value gradients (backward)")
                if not last:
                    r.wait(kv_works, f"receiving key/value block {step + 1} of {r.world - 1} (backward)")
                    kv = nxt
            if r.world > 1:
                r.wait(dkv_works, "receiving the gradients of its own key/value block (backward)")
                dkv = dkv_recv
            dk[:, ha:hb, pa:pb] = dkv[0]
            dv[:, ha:hb, pa:pb] = dkv[1]
        if not direct:
            dq[:, qh] = dq_h.to(dq.dtype)
    return dq, dk, dv


_LAYOUT_CODES = (*L.LAYOUTS, "partition")


def _check_across_ranks(q: Tensor, k: Tensor, causal: bool, layout: str | L.Partition, masked: bool, scale: float,
                        heads_per_pass: int, group, kv_blocks: int = 1) -> tuple[list[int], int]:
    """All-gather each rank's configuration; the same ValueError on every rank if they differ.

    Returns every rank's local sequence length and the heads per pass all ranks use (the
    smallest asked for: every rank must send the same blocks).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hq, n, D = q.shape
    code = _LAYOUT_CODES.index("partition" if isinstance(layout, L.Partition) else layout)
    with _peer_errors(rank, world, "exchanging shapes with the other ranks"):
        table = gather_ints([B, Hq, k.shape[1], D, int(causal), code, int(masked), int(round(scale * 2**40)),
                             kv_blocks, heads_per_pass, n], group, q, "exchanging shapes with the other ranks",
                            scheme="ring_attention", error=RingAttentionError)
    names = ["B", "Hq", "Hkv", "D", "causal", "layout", "mask", "scale", "kv_blocks"]
    for i, name in enumerate(names):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            shown = [bool(x) for x in values] if name in ("causal", "mask") else (
                [_LAYOUT_CODES[x] for x in values] if name == "layout" else (
                    [x / 2**40 for x in values] if name == "scale" else values))
            raise ValueError(f"ring_attention: every rank must pass the same {name}, got {shown} (by rank)")
    lengths = [row[-1] for row in table]
    if min(lengths) < 1:
        raise ValueError(f"ring_attention: every rank must hold at least one token, got lengths {lengths}")
    if kv_blocks > min(lengths):
        raise ValueError(f"ring_attention: kv_blocks must be at most the shortest local length {min(lengths)}, "
                         f"got {kv_blocks}")
    if layout == "zigzag" and (len(set(lengths)) > 1 or lengths[0] % 2):
        raise ValueError(
            f"ring_attention: layout='zigzag' needs one even local length on every rank (two equal chunks "
            f"each), got {lengths}; shard with attnmem.distributed.shard(x, world, rank, layout='zigzag')"
        )
    if isinstance(layout, L.Partition) and layout.lengths != lengths:
        raise ValueError(f"ring_attention: the partition gives the ranks {layout.lengths} tokens, but they hold "
                         f"{lengths}; shard with partition.shard(x, rank)")
    return lengths, min(row[-2] for row in table)


def _global_positions(layout: str | L.Partition, lengths: list[int], device) -> tuple[Tensor, ...]:
    """Every rank's global positions, for the general (masked / any partition) path."""
    if isinstance(layout, L.Partition):
        return tuple(p.to(device) for p in layout.positions)
    n, world = sum(lengths), len(lengths)
    if layout == "zigzag":
        return tuple(L.positions(n, world, r, layout="zigzag", device=device) for r in range(world))
    starts = [sum(lengths[:r]) for r in range(world)]
    return tuple(torch.arange(a, a + m, device=device) for a, m in zip(starts, lengths))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Any = None, group: Any = None,
                   layout: str | L.Partition = "contiguous", scale: float | None = None,
                   heads_per_pass: int | None = None, q_tile: int = 256, kv_tile: int = 256,
                   kernel: str = "auto", kv_blocks: int = 1) -> Tensor:
    """Exact attention over a sequence split across the ranks of ``group``.

    Every rank of the group calls this with its own slice of the one sequence.

    Args:
        q: this rank's queries (B, Hq, N_local, D).
        k, v: this rank's keys and values (B, Hkv, N_local, D) — the same tokens as ``q``;
            ``Hq % Hkv == 0`` (GQA, never expanded).
        causal: causal self-attention over the global positions.
        mask: a mask of the WHOLE sequence (N = Σ N_local, global positions, all heads): an
            ``attnmem.masks.Mask`` or a bool tensor broadcastable to (B, Hq, N, N); every rank
            passes the same one. Combined with ``causal``.
        group: the process group (default: the world). ``torch.distributed`` must be
            initialised (``torchrun`` + ``dist.init_process_group``); gloo on CPU, NCCL on CUDA.
        layout: how the sequence was split: ``"contiguous"`` (rank r holds the r-th slice;
            slices may differ in length, e.g. ``torch.tensor_split``), ``"zigzag"`` (see
            ``attnmem.distributed.layout``; balanced causal work), or a ``Partition`` (any
            permutation, e.g. ``balanced_documents``). Use ``shard``/``unshard``.
        scale: multiplier of QKᵀ; default ``1/sqrt(D)``.
        heads_per_pass: key/value heads sent round the ring together; fewer means smaller
            buffers in flight, more means fewer, larger messages. Default (None): on CPU the
            fewest that give each of torch's threads a (batch, head) pair — PyTorch's fused
            backward parallelises over B·H, and with 2 threads and B·H = 1 it ran ~13x slower
            (N=2048: 9.4 s for 1 head, 0.74 s for 2); all heads on other devices. Ranks that
            ask for different values use the smallest.
        q_tile, kv_tile, kernel: options of the local ``chunked`` kernel.
        kv_blocks: pieces every rank's key/value block travels in: the ring turns once per piece
            (in each head pass), so the buffers in flight (the block, the next, the travelling
            dk/dv and this rank's share) are 1/kv_blocks as large, for the same bytes sent in
            kv_blocks times as many messages. At most the shortest local length.

    Returns:
        This rank's output (B, Hq, N_local, D); differentiable (dq, dk, dv for this rank's slice).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: bad shapes or options, or ranks that disagree on B, heads, D, causal,
            layout, mask or scale (raised on every rank alike).
        RingAttentionError: a peer failed, exited or timed out during the ring.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ring_attention needs torch.distributed initialised: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first"
        )
    inp = validate(q, k, v, causal=causal, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"ring_attention is self-attention over one split sequence: q and k must hold the same "
            f"tokens, got N_local={q.shape[2]} for q and {k.shape[2]} for k"
        )
    if not isinstance(layout, L.Partition):
        L.check_layout(layout)
    if heads_per_pass is None:
        heads_per_pass = k.shape[1]
        if q.device.type == "cpu":
            heads_per_pass = min(k.shape[1], max(1, math.ceil(torch.get_num_threads() / q.shape[0])))
    elif not isinstance(heads_per_pass, int) or isinstance(heads_per_pass, bool) or heads_per_pass <= 0:
        raise ValueError(f"heads_per_pass must be a positive int or None, got {heads_per_pass!r}")
    if not isinstance(kv_blocks, int) or isinstance(kv_blocks, bool) or kv_blocks <= 0:
        raise ValueError(f"ring_attention: kv_blocks must be a positive int, got {kv_blocks!r}")
    user_mask = None if mask is None else M.as_mask(mask, "mask")
    lengths, heads_per_pass = _check_across_ranks(q, k, causal, layout, user_mask is not None, inp.scale,
                                                  heads_per_pass, group, kv_blocks)
    general = user_mask is not None or isinstance(layout, L.Partition)
    global_mask = positions = None
    if general:
        n = sum(lengths)
        if user_mask is not None:
            user_mask.check(q.shape[0], q.shape[1], n, n)
        global_mask = M.combine(causal, user_mask)
        positions = _global_positions(layout, lengths, q.device)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ring = _Ring(
        group=group, rank=rank, world=world,
        send_to=dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world,
        recv_from=dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world,
        lengths=tuple(lengths), layout=layout if isinstance(layout, str) else "partition", causal=causal,
        scale=inp.scale, heads_per_pass=heads_per_pass, q_tile=q_tile, kv_tile=kv_tile, kernel=kernel,
        mask=global_mask, positions=positions, kv_blocks=kv_blocks,
    )
    return LseAttention.apply(q, k, v, ring, _ring_forward, _ring_backward)
