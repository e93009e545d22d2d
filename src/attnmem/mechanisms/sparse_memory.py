"""The memory model of the sparse patterns (``sliding_window``, ``dilated``, ``longformer``,
``bigbird``, ``strided``): what ``kernels.tiled``'s loop over their block map keeps alive.

The loop over query tiles keeps a few O(N·D) buffers for the whole call and, on top of them,
a working set that lives for one tile. So the closed form is

    peak = the O(N·D) buffers alive at that point + the largest working set of one tile,

both read off the code. Symbols used in the docstrings, all in bytes unless counted:

* ``Q = B·Hq·N·D·s`` (one query-shaped tensor, ``s`` = itemsize), ``K = B·Hkv·N·D·s``;
  ``L = B·Hq·N·a`` one log-sum-exp per query row (``a`` = 4, 8 for float64);
* ``t = B·Hq·Tq·D·s`` one query tile of ``Tq`` rows, ``k1 = B·Hkv·D·s`` one key (of K or V);
* ``G = Hq / Hkv``; a mask tile of ``Tq`` rows and ``n`` keys has ``m = G·Tq·n`` elements
  (``Hq·Tq·n`` for a per-head pattern).

Which key tiles a query tile lists, and how they group into kernel calls (*segments*: merged
runs of full tiles, gathered partial tiles; at most 4096 gathered keys in the forward, 2048 keys
per call in the backward), is the pattern's structure: the model takes the block-map rows of a
few query tiles (the first, a middle and the last ones: every interior tile of these patterns
has the same row), computed by the pattern's own ``tile_states`` for those tiles only, and
groups them with ``kernels.plan_segments``; cost O(N / kv_tile) per sampled tile, never a trace.
The terms per segment follow ``tiled_forward``/``tiled_backward`` line by line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from .. import masks as M
from ..kernels import MAX_GATHER, MAX_SEGMENT, MIN_Q_TILE, Segment, plan_call, plan_segments
from ..kernels.mods import TileMods, dropout_keep_bytes
from ..kernels.tile import fused_bias_tile_bytes, softcap_tile_bytes, torch_tile_bytes
from ..kernels.tiled import BIAS_SEGMENT, ROW_BIAS_Q_TILE, ROW_BIAS_SEGMENT, SOFTCAP_SEGMENT
from ..memory.model import Footprint, Shape
from ..scores import ALiBi, RelativeBias

# Tiles sampled at each end and in the middle of a long sequence (all tiles when fewer).
_EDGE_TILES = 4
# The built-in additive biases whose memory per tile is known (``Shape.bias``).
_BIAS_BYTES = {"alibi": ALiBi.bias_bytes, "relative_bias": RelativeBias.bias_bytes}
# The tile kernels written in torch ops, modelled call by call (``_torch_work``).
TORCH_OPS_KERNELS = ("torch", "softcap")


# --- block-map rows of a few query tiles ---------------------------------------------------


def _sample_groups(nqt: int) -> list[list[int]]:
    """Runs of consecutive query tiles to look at: all of them when few, else the first, a middle
    and the last ``_EDGE_TILES`` (a run not starting at tile 0 starts one tile early: that tile
    only precedes the others, see ``_tiled_work``)."""
    if nqt <= 6 * _EDGE_TILES:
        return [list(range(nqt))]
    mid = nqt // 2
    return [list(range(_EDGE_TILES)), list(range(mid - 1, mid + _EDGE_TILES)),
            list(range(nqt - _EDGE_TILES - 1, nqt))]


def _tile_rows(mask: M.Mask, s: Shape, q_tile: int, kv_tile: int, tiles: list[int]) -> list[list[tuple[int, bool]]]:
    """``BlockMap.rows()`` of the query tiles ``tiles`` only: the pattern's ``tile_states``
    against every key tile, empties dropped."""
    g = M.Grid(s.seq_len, s.seq_len, q_tile, kv_tile, s.batch, s.heads)
    nkt = g.num_kv_tiles
    qi = torch.tensor(tiles, dtype=torch.int64)[:, None].expand(len(tiles), nkt)
    ki = torch.arange(nkt, dtype=torch.int64)[None, :].expand(len(tiles), nkt)
    states = mask.tile_states(g, qi, ki)  # (tiles, nkt)
    rows = []
    for r in states:
        listed = torch.nonzero(r != M.EMPTY).flatten()  # the key tiles this query tile computes
        rows.append(list(zip(listed.tolist(), (r[listed] == M.FULL).tolist())))
    return rows


def _rest_rows(local: M.Mask, s: Shape, positions: torch.Tensor, q_tile: int, kv_tile: int
               ) -> list[list[tuple[int, bool]]]:
    """Block rows of sparse.py's ``_rows_outside``: the global query rows at ``positions`` against
    the keys the call allows and ``local`` does not, per tile of ``q_tile`` global rows."""
    n, nkt = s.seq_len, math.ceil(s.seq_len / kv_tile)
    g1 = M.Grid(n, n, 1, kv_tile, s.batch, s.heads)  # one query per "tile": a state per row
    ki = torch.arange(nkt, dtype=torch.int64)
    ka, kb = ki * kv_tile, torch.clamp((ki + 1) * kv_tile, max=n)
    rows = []
    for a in range(0, len(positions), q_tile):
        pos = positions[a:a + q_tile]
        first, r = int(pos[0]), len(pos)
        if int(pos[-1]) - first == r - 1 and first % r == 0:
            # Consecutive, aligned rows (BigBird's global blocks): one tile of r rows.
            gr = M.Grid(n, n, r, kv_tile, s.batch, s.heads)
            local_st = local.tile_states(gr, torch.full((1, nkt), first // r, dtype=torch.int64), ki[None, :])
            pos = pos[-1:] if s.causal else pos[:1]
            if s.causal:  # the tile's call states: full below its first row, empty above its last
                lo = torch.where((kb - 1) <= first, M.FULL, torch.where(ka > int(pos[0]), M.EMPTY, M.PARTIAL))
                call_st = lo.to(torch.int8)[None, :]
            else:
                call_st = torch.full((1, nkt), M.FULL, dtype=torch.int8)
            empty = (call_st == M.EMPTY) | (local_st == M.FULL)
            full = (call_st == M.FULL) & (local_st == M.EMPTY)
            empty_j, full_j = empty[0].tolist(), full[0].tolist()  # Python lists: no per-element tensor indexing
            rows.append([(j, full_j[j]) for j in range(nkt) if not empty_j[j]])
            continue
        local_st = local.tile_states(g1, pos[:, None].expand(-1, nkt), ki[None, :].expand(len(pos), -1))
        if s.causal:
            call_st = torch.full(local_st.shape, M.PARTIAL, dtype=torch.int8)
            call_st[(kb - 1)[None, :] <= pos[:, None]] = M.FULL
            call_st[ka[None, :] > pos[:, None]] = M.EMPTY
        else:
            call_st = torch.full(local_st.shape, M.FULL, dtype=torch.int8)
        empty = (call_st == M.EMPTY) | (local_st == M.FULL)
        full = (call_st == M.FULL) & (local_st == M.EMPTY)
        all_empty, all_full = empty.all(0).tolist(), full.all(0).tolist()
        rows.append([(j, all_full[j]) for j in range(nkt) if not all_empty[j]])
    return rows


# --- the tiled kernel's working set ----------------------------------------------------------


def _mask_rows(s: Shape, per_head: bool) -> int:
    """Rows of one stacked mask tile per query row: G (head-independent), Hq (per head)."""
    if per_head:
        return s.heads
    return s.heads // s.kv_heads


def _eval_bytes(mask: M.Mask, heads: int) -> int:
    """Bytes per (query, key) pair alive at the peak of evaluating ``mask``'s mask_mod on a tile,
    read off each mask_mod: int64 relative positions (8), int64 remainders (8), bools (1)."""
    if isinstance(mask, M.Combined):
        # a's result (1) stays while b runs; then both and the combined result.
        return max(_eval_bytes(mask.a, heads), 1 + _eval_bytes(mask.b, heads), 3)
    if isinstance(mask, M.SlidingWindow):
        return 11  # rel, the running result, one comparison, the new result
    if isinstance(mask, M.Dilated):
        return 8 + 9 * heads if mask.per_head else 17  # rel, rel % d (per head: Hq of them), ==
    if isinstance(mask, (M.BigBird, M.Strided)):
        return 17  # rel (or kb - qb), its abs / remainder, one comparison
    return 2  # GlobalTokens, Fixed: gathers of per-position flags, a bool or two per pair


def _seg_terms(s: Shape, seg: Segment, tq: int, per_head: bool, evb: int = 0,
               backward: bool = False) -> tuple[int, int, int, int]:
    """(gathered K, V copies, mask bools + float bias, dK + dV, mask evaluation) bytes of one
    segment (the evaluation: ``evb`` bytes per pair, then the G-stacked copy of its bools).
    ``backward``: the backward's call, which runs half-precision segments in float32
    (``kernels.tile.fused_backward_acc``): its bias and its dK, dV are float32."""
    k1 = s.batch * s.kv_heads * s.head_dim * s.itemsize
    a = s.acc_itemsize if backward else s.itemsize
    copies = 0 if seg.contiguous else 2 * seg.size * k1
    m = _mask_rows(s, per_head) * tq * seg.size if seg.masked else 0
    pairs = tq * seg.size if seg.masked else 0
    ev = max(evb * pairs, pairs + (m if m != pairs else 0))
    return copies, m * (1 + a), 2 * seg.size * k1 * a // s.itemsize, ev


def _tiled_work(s: Shape, plan_rows, per_head: bool, evb: int) -> tuple[int, int, int]:
    """(forward, backward) working set of the tiled loop: the largest, over the sampled
    segments, of what one segment's kernel call keeps alive besides the O(N·D) buffers.

    ``plan_rows``: runs of ``(Tq, forward segments, backward segments, lead)`` of consecutive
    tiles; a ``lead`` tile only precedes the next (its own segments are not counted).

    Backward, at segment j of a tile, with p the segment before it (maybe of the tile before):
    the previous call's dK, dV (2·p keys) + dQ of the tile (dq_t: 0, 1 or 2 tiles for j = 0, 1,
    ≥ 2, plus the last dQ of the tile before when j = 0) + for G > 1 the stacked q, O tiles
    and their lse (2·t + lse tile) + gathered K, V (2·n keys, when not contiguous) + the mask
    (bools + float bias, m·(1 + a)) + the call's outputs dQ (t) and dK, dV (2·n keys). Half
    inputs run each call in float32 (``fused_backward_acc``): a = 4, and dQ, dK, dV, the bias
    and float32 copies of the q, dO, O tiles and the n keys of K, V (3·t + 2·n keys) are
    float32 (twice their half-precision bytes).
    Forward, at segment j: the running output (j ≥ 1: 1 tile, j ≥ 2: 2) or the last output of
    the tile before (j = 0) + for G > 1 the stacked q tile + gathered K, V + the mask (its
    negation too, while the bias is filled: m·(2 + s)) + the outputs O (t) and lse (two lse
    tiles); merging two segments holds 4 more tiles.
    Third: what the last tile's backward leaves bound to the loop's names when the loop ends
    (its dQ accumulator and last call's dQ, dK, dV, gathered K, V), alive while half-precision
    dK, dV are cast back.
    """
    acc = s.acc_itemsize
    qrow = s.batch * s.heads * s.head_dim * s.itemsize  # one query row of Q
    lrow = s.batch * s.heads * acc  # one row of lse
    g1 = s.heads == s.kv_heads
    fwd = bwd = tail = 0
    for run in plan_rows:
        prev_f = prev_b = None  # (tile rows, segment) of the call before
        for tq, fsegs, bsegs, lead, _ in run:
            t = qrow * tq
            ta = t * acc // s.itemsize  # one query tile in the accumulation dtype
            stack = 0 if g1 else 2 * t + lrow * tq  # dO is an expanded scalar: its tile is a view
            for j, seg in enumerate(bsegs):
                copies, mask, grads, ev = _seg_terms(s, seg, tq, per_head, evb, backward=True)
                # Half inputs: the float32 copies of the q, dO, O tiles and of the keys.
                casts = 3 * ta + grads if s.half else 0
                hold = 0
                if prev_b is not None:
                    hold = _seg_terms(s, prev_b[1], prev_b[0], per_head, backward=True)[2]
                    hold += qrow * prev_b[0] * acc // s.itemsize if j == 0 else 0
                # The tile's dQ so far and the last call's (one storage after the first call).
                hold += ta * min(j, 2)
                if not lead:
                    base = hold + stack + copies
                    bwd = max(bwd, base + casts + mask + ta + grads,
                              base + casts + mask * (2 + acc) // (1 + acc), base + ev)
                prev_b = (tq, seg)
                tail = (2 * ta if len(bsegs) > 1 else ta) + stack + copies + grads
            for j, seg in enumerate(fsegs):
                copies, mask, _, ev = _seg_terms(s, seg, tq, per_head, evb)
                # The running output and the last call's (half inputs: a float32 running output).
                run_out = (ta + t if s.half else t * min(j, 2)) if len(fsegs) > 1 else 0
                hold = run_out if j else (qrow * prev_f[0] + lrow * prev_f[0] if prev_f else 0)
                base = hold + (0 if g1 else t) + copies
                mbool = mask // (1 + s.itemsize)
                if not lead:
                    fwd = max(fwd, base + mask + mbool, base + mask + t + 2 * lrow * tq, base + ev)
                    if j:
                        fwd = max(fwd, hold + (0 if g1 else t) + 4 * ta)
                prev_f = (tq, seg)
    return fwd, bwd, tail


def _call_bytes(s: Shape, kernel: str, e: int, rows: int, keys: int, diagonal: bool, bools: int) -> tuple[int, int]:
    """(forward, backward) bytes of one call of the torch-ops tile kernel ``kernel`` ("torch",
    with dropout when ``s.dropout``, or "softcap"), beside its arguments."""
    kw = dict(batch_heads=e, rows=rows, keys=keys, head_dim=s.head_dim, itemsize=s.itemsize,
              causal_tile=diagonal, mask_bytes=bools)
    if kernel == "softcap":
        return softcap_tile_bytes(**kw)
    keep = dropout_keep_bytes(e * rows * keys, e * rows, s.acc_itemsize) if s.dropout else (0, 0)
    return torch_tile_bytes(**kw, keep=keep)


def _torch_work(s: Shape, plan_rows, per_head: bool, evb: int, pure_causal: bool,
                dout_view: bool = True, kernel: str = "torch") -> tuple[int, int, int]:
    """``_tiled_work`` for the torch-ops tile kernels (``kernel="torch"``, and float16 under
    "auto"; dropout; "softcap", whose segments merge up to ``SOFTCAP_SEGMENT`` keys): each
    segment is the same in both passes, and each call's own peak is
    ``kernels.tile.torch_tile_bytes`` (``softcap_tile_bytes``), plus the segment's
    ``TileMods`` indices with a score_mod or dropout. Around a call of n keys (M = G·Tq
    stacked rows, ta = B·Hkv·M·D·a one query tile in the accumulation dtype, tk the same for n
    keys, r one value per row):

    Backward, at segment j: the previous call's dK, dV (2·tk) and the tile's dQ so far (as in
    ``_tiled_work``: the last dQ of the tile before when j = 0, the running dQ when j = 1, it and
    the last call's when j ≥ 2) + for G > 1 the stacked q and O tiles and their lse (2·t + r;
    dO is an expanded scalar: a view, unless ``dout_view`` is False, as for the global rows'
    own pass, whose dO rows are picked) + the segment's mask bools (m, absent on a diagonal tile
    of plain causal, which the kernel builds itself) + the call.
    Forward, at segment j: the last output and lse of the tile before (j = 0), the running
    output (j = 1: the first call's), it and the last call's (j ≥ 2) + for G > 1 the stacked q
    tile + the mask bools + the call; merging holds both outputs, the two weighted ones and
    their sum (5·ta). Evaluating a mask holds its own temporaries (``_seg_terms``).
    Third: what the last tile's backward leaves bound at the loop's end, as ``_tiled_work``.
    """
    acc = s.acc_itemsize
    e = s.batch * s.kv_heads
    g = s.heads // s.kv_heads
    qrow = s.batch * s.heads * s.head_dim * s.itemsize  # one query row of Q
    lrow = s.batch * s.heads * acc  # one row of lse
    fwd = bwd = tail = 0
    seen = set()  # segments whose terms are already counted: a row lists thousands of like ones
    for run in plan_rows:
        prev = None  # (Tq, keys) of the call before
        for tq, segs, _, lead, qa in run:
            ta = qrow * tq * acc // s.itemsize
            stack_f = 0 if g == 1 else qrow * tq
            stack_b = 0 if g == 1 else (2 if dout_view else 3) * qrow * tq + lrow * tq
            for j, seg in enumerate(segs):
                n = seg.size
                tk = e * n * s.head_dim * acc
                tail = (2 * ta if len(segs) > 1 else ta) + stack_b + 2 * tk
                diagonal = pure_causal and seg.masked and seg.contiguous and seg.ranges[0] == (qa, qa + tq)
                key = (tq, n, seg.masked, diagonal, min(j, 2), prev, lead)
                prev = (tq, n)
                if key in seen:
                    continue
                seen.add(key)
                bools = _mask_rows(s, per_head) * tq * n if seg.masked and not diagonal else 0
                ev = 0 if diagonal else _seg_terms(s, seg, tq, per_head, evb)[3]
                call_f, call_b = _call_bytes(s, kernel, e, g * tq, n, diagonal, bools)
                if s.mods is not None:  # the segment's TileMods indices, alive through its call
                    idx = TileMods.index_bytes(s.batch, s.heads, tq, n)
                    call_f, call_b = call_f + idx, call_b + idx
                before = key[5]
                if before is None:
                    hold_f = hold_b = 0
                else:
                    p_ta = qrow * before[0] * acc // s.itemsize
                    p_tk = e * before[1] * s.head_dim * acc
                    hold_f = p_ta + lrow * before[0] if j == 0 else (ta + lrow * tq) * min(j, 2)
                    hold_b = 2 * p_tk + (p_ta if j == 0 else ta * min(j, 2))
                if not lead:
                    bwd = max(bwd, hold_b + stack_b + bools + call_b, hold_b + stack_b + ev)
                    fwd = max(fwd, hold_f + stack_f + bools + call_f, hold_f + stack_f + ev)
                    if j:
                        fwd = max(fwd, stack_f + 5 * ta + 6 * lrow * tq)
    return fwd, bwd, tail


def _bias_work(s: Shape, plan_rows, per_head: bool, evb: int, pure_causal: bool) -> tuple[int, int]:
    """``_tiled_work`` for the fused operator with a ``"bias"`` score_mod (float32 / float64):
    every segment, full or masked, builds its bias (``kernels.tile.fused_bias_tile_bytes``, with
    the score_mod's own ``bias_bytes``), in merged runs of at most ``BIAS_SEGMENT`` keys
    (``ROW_BIAS_SEGMENT``), the same in both passes. ALiBi's tiles whose keys lie on one side of
    every query's diagonal (no GQA) take the row path. Around each call the loop holds what
    ``_tiled_work`` counts (the previous call's dK, dV, the tile's dQ so far, the running
    output, the stacked rows of GQA, gathered keys), and a mask's bools and their evaluation."""
    acc = s.acc_itemsize
    qrow = s.batch * s.heads * s.head_dim * s.itemsize
    lrow = s.batch * s.heads * acc
    g = s.heads // s.kv_heads
    bias_bytes = _BIAS_BYTES[s.bias]
    fwd = bwd = 0
    for run in plan_rows:
        prev_f = prev_b = None
        for tq, fsegs, bsegs, lead, qa in run:
            t = qrow * tq
            stack = 0 if g == 1 else 2 * t + lrow * tq
            calls = {}
            for seg in {*fsegs, *bsegs}:
                # The diagonal tile of plain causal is the kernel's own is_causal: no bools.
                masked = seg.masked and not (pure_causal and seg.contiguous and seg.ranges[0] == (qa, qa + tq))
                first, last = min(a for a, _ in seg.ranges), max(b for _, b in seg.ranges) - 1
                row = (s.bias == "alibi" and g == 1 and not seg.masked
                       and (last <= qa or first >= qa + tq - 1))
                bools = _mask_rows(s, per_head) * tq * seg.size if masked else 0
                idx = TileMods.index_bytes(s.batch, s.heads, tq, seg.size)
                call = fused_bias_tile_bytes(batch_heads=s.batch * s.kv_heads, kv_heads=s.kv_heads, rows=g * tq,
                                             keys=seg.size, head_dim=s.head_dim, itemsize=s.itemsize,
                                             bias=bias_bytes(s.heads, tq, seg.size, s.itemsize), masked=masked,
                                             row=row)
                calls[seg] = (bools + idx + call[0], bools + idx + call[1])
            for j, seg in enumerate(bsegs):
                copies, _, _, ev = _seg_terms(s, seg, tq, per_head, evb, backward=True)
                hold = 0
                if prev_b is not None:
                    hold = _seg_terms(s, prev_b[1], prev_b[0], per_head, backward=True)[2]
                    hold += qrow * prev_b[0] if j == 0 else 0
                hold += t * min(j, 2)
                if not lead:
                    base = hold + stack + copies
                    bwd = max(bwd, base + calls[seg][1], base + ev)
                prev_b = (tq, seg)
            for j, seg in enumerate(fsegs):
                copies, _, _, ev = _seg_terms(s, seg, tq, per_head, evb)
                run_out = t * min(j, 2) if len(fsegs) > 1 else 0
                hold = run_out if j else (qrow * prev_f[0] + lrow * prev_f[0] if prev_f else 0)
                base = hold + (0 if g == 1 else t) + copies
                if not lead:
                    fwd = max(fwd, base + calls[seg][0], base + ev)
                    if j:
                        fwd = max(fwd, hold + (0 if g == 1 else t) + 4 * t)
                prev_f = (tq, seg)
    return fwd, bwd


def _like_tiles_dropped(row: list[tuple[int, bool]], n_k: int, kv_tile: int) -> list[tuple[int, bool]]:
    """A block row for one-key-tile segments without what ``_torch_work`` would count twice:
    past the second of a run of like tiles (same kind and size), a tile's call and what the loop
    holds around it repeat the second's once both sit at positions j ≥ 2 (the tile before them
    alike). The first three tiles and the last (the loop's end) stay, so every position class is
    kept: a kept tile at j ≥ 2 stays at a position ≥ 2."""
    out: list[tuple[int, bool]] = []
    last, run = None, 0
    for i, (j, full) in enumerate(row):
        kind = (full, min((j + 1) * kv_tile, n_k) - j * kv_tile)
        run = run + 1 if kind == last else 1
        last = kind
        if run <= 2 or i <= 2:
            out.append((j, full))
    if row and out[-1] != row[-1]:
        out.append(row[-1])
    return out


def _plan_rows(rows, tiles, n_q: int, n_k: int, q_tile: int, kv_tile: int, merge: bool = True,
               cap: int | None = None):
    """``(Tq, forward segments, backward segments, lead, first query row)`` per sampled tile,
    grouped as the code does (``merge``: the fused kernel's segments; ``cap``: merged runs of at
    most ``cap`` keys, the same in both passes, as ``TileContext`` plans a score modification;
    else one key tile each, the same in both passes)."""
    out = []
    for i, row in zip(tiles, rows):
        tq = min(q_tile, n_q - i * q_tile)
        if cap is not None:
            fwd = bwd = plan_segments([row], n_q, n_k, q_tile, kv_tile, merge=True, max_segment=cap)[0][2]
        elif merge:
            fwd = plan_segments([row], n_q, n_k, q_tile, kv_tile, merge=True, gather=MAX_GATHER)[0][2]
            bwd = plan_segments([row], n_q, n_k, q_tile, kv_tile, merge=True, max_segment=MAX_SEGMENT)[0][2]
        else:
            fwd = bwd = plan_segments([_like_tiles_dropped(row, n_k, kv_tile)], n_q, n_k, q_tile, kv_tile,
                                      merge=False)[0][2]
        out.append((tq, fwd, bwd, i == tiles[0] and i > 0, i * q_tile))
    return out


def _class_work(s: Shape, stride: int) -> tuple[int, int]:
    """(forward, backward) working set of ``_StridedSplit``'s loop over residue classes, besides
    out, lse (and dQ, dK, dV): with Lc = ⌈N/stride⌉ rows per class, c = B·Hq·Lc·D·s one class
    of Q (c_k of K), l = B·Hq·Lc·a one class of lse.

    Forward, at the merge of class r: the previous class's merged output and lse (c + l, still
    bound to the loop's names) + this class's output and lse (c + l) + the merge's
    new lse, its two weights, its finite flags (3l + B·Hq·Lc bools) and the two weighted outputs
    and their sum (3c); for G > 1 the G-stacked query rows (c: a copy unless stride divides N,
    when every head's rows line up as one view). Backward: lse with +inf for empty rows (L) +
    the previous and this class's dQ, dK, dV (2·(c + 2·c_k)); for G > 1 (copies unless stride
    divides N) the stacked q and O rows and their lse (2c + l; dO is an expanded scalar, its
    rows are a view)."""
    acc = 8 if s.itemsize == 8 else 4
    lc = math.ceil(s.seq_len / stride)
    c = s.batch * s.heads * lc * s.head_dim * s.itemsize
    ck = s.batch * s.kv_heads * lc * s.head_dim * s.itemsize
    lrow = s.batch * s.heads * lc
    l1 = lrow * acc
    stack = s.heads != s.kv_heads and s.seq_len % stride != 0
    fwd = 5 * c + 5 * l1 + lrow + (c if stack else 0)
    bwd = s.lse_bytes + 2 * (c + 2 * ck) + (2 * c + l1 if stack else 0)
    return fwd, bwd




def _sampled_plan(s: Shape, opts, local: M.Mask | None, rows: torch.Tensor | None, band: M.Mask | None):
    """The sampled plan of one call: (local runs, per-head?, rest runs or None, global rows,
    mask evaluation bytes per pair). ``band``: the pattern runs as band + residue classes."""
    if local is None:  # chunked: every key, or the causal ones
        mask = M.causal() if s.causal else None
    else:
        mask = M.causal() & local if s.causal else local
    if band is not None:
        local = mask = band
    plan = tile_plan(s, opts, mask)
    merge = plan.kernel == "fused"
    q_tile = max(opts.q_tile, MIN_Q_TILE)
    cap = SOFTCAP_SEGMENT if plan.kernel == "softcap" else None
    if merge and s.mods == "bias":
        # ``TileContext``: ALiBi's row path under no mask or plain causal takes larger tiles.
        if s.bias == "alibi" and s.heads == s.kv_heads and (mask is None or plan.pure_causal):
            q_tile, cap = max(q_tile, ROW_BIAS_Q_TILE), ROW_BIAS_SEGMENT
        else:
            cap = BIAS_SEGMENT
    nqt = math.ceil(s.seq_len / q_tile)
    runs = []
    for tiles in _sample_groups(nqt):
        if mask is None:
            rows_ = [[(j, True) for j in range(math.ceil(s.seq_len / opts.kv_tile))]] * len(tiles)
        else:
            rows_ = _tile_rows(mask, s, q_tile, opts.kv_tile, tiles)
        runs.append(_plan_rows(rows_, tiles, s.seq_len, s.seq_len, q_tile, opts.kv_tile, merge, cap))
    per_head = isinstance(local, M.Dilated) and local.per_head
    rest = None
    g = 0
    if rows is not None and rows.numel():
        g = rows.numel()
        rest_rows = _rest_rows(local, s, rows, q_tile, opts.kv_tile)
        rest = [_plan_rows(rest_rows, list(range(len(rest_rows))), g, s.seq_len, q_tile, opts.kv_tile, merge, cap)]
    return runs, per_head, rest, g, _eval_bytes(mask, s.heads) if mask is not None else 0


def tile_plan(s: Shape, opts, mask: M.Mask | None):
    """``kernels.plan_call`` of this call's tiled pass on CPU (``mask``: its effective mask;
    the score modifications' kind from ``s.mods``)."""
    return plan_call(opts.kernel, device="cpu", dtype=getattr(torch, s.dtype), mask=mask, batch=s.batch,
                     nq=s.seq_len, nk=s.seq_len, q_heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                     mods=s.mods)


def native_softcap_footprint(s: Shape) -> Footprint:
    """Softcap as one call of the native kernel (``kernels.native``, float32/float64, no mask, a
    window or key padding: ``kernels.tiled.native_window``; ``sparse_footprint`` takes it for
    chunked and sliding_window): forward only, O + lse; training, saved = O + lse, transient =
    the lse with +inf for empty rows (L) + dQ + dK + dV + two scalars. The kernel's own buffers are a few
    blocks per thread (threads · (3·64·256 + 4·64·D)·itemsize, 0.5 MiB at 2 threads, D = 64,
    float32), outside torch's allocator, as aten's flash kernel's are; it copies no input
    whole (an expanded dO is read a block of rows at a time). Read off traces (tests check
    formula == trace)."""
    if not s.training:
        return Footprint(0, s.q_bytes + s.lse_bytes)
    return Footprint(s.q_bytes + s.lse_bytes, s.lse_bytes + s.q_bytes + 2 * s.kv_bytes + 2 * s.itemsize)


def sparse_footprint(s: Shape, opts, local: M.Mask | None, rows: torch.Tensor | None,
                     band: M.Mask | None) -> Footprint:
    """The closed form shared by the sparse patterns (see the module docstring for symbols).

    ``local``, ``rows``: the pattern without its global query rows, and those rows
    (``_Sparse.split``); ``band``: the band ``0 < |rel| < stride`` when strided runs as band +
    residue classes (``StridedAttention.splits``), else None.

    saved = O + L (+ the g global row indices, int64, for longformer and bigbird);
    forward peak = Q + 2K + O + L + the forward working set of the widest segment;
    backward peak = Q + 2K + O + L (saved) + L (lse with +inf for empty rows) + dQ + dK + dV +
    the backward working set of the widest segment (``_tiled_work``). With g global query
    rows (computed apart, then merged): after the local pass, the rows' own pass holds
    g-row copies of q, dO, O (3·g rows), its dQ and lse, and a whole dK, dV (2K) besides the
    local pass's dQ + dK + dV; its keys are every key the local pattern leaves out, in 2048-key
    calls. Linear in N (O(N·(w + g)) allowed pairs, a tile at a time); fixed (and strided off
    its split path) lists every key tile, so its forward's partial segment reaches N keys: a
    Tq × N mask. Strided with ``band`` runs the tiled pass over the band only, and the peak is
    the larger of that pass's and of the residue-class loop's (``_class_work``: O(N/stride)
    rows per class). Half inputs (bfloat16 on the fused kernel) keep float32 accumulators: the
    running output of a tile, its dQ, and dK, dV for the whole call (cast back at the end, both
    alive then). The plain-PyTorch tile kernel (``kernels.plan_call``'s choice for kernel="torch"
    and float16) has the same O(N·D) terms around its own working set (``_torch_work``).
    ``local`` None: chunked's every key (or the causal ones). Domain: no user mask.
    """
    if band is None and (rows is None or not rows.numel()):
        whole = M.causal() if s.causal else None
        if local is not None:
            whole = local if whole is None else whole & local
        if tile_plan(s, opts, whole).kernel == "softcap_native":
            return native_softcap_footprint(s)
    # Its tensors have a few thousand elements: intra-op threads only cost synchronisation
    # (on a loaded 2-core machine, 100x the work itself).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs, per_head, rest, g, evb = _sampled_plan(s, opts, local, rows, band)
    finally:
        torch.set_num_threads(threads)
    lse = s.lse_bytes
    qrow = s.batch * s.heads * s.head_dim * s.itemsize
    lrow = lse // s.seq_len
    mask = M.causal() if s.causal else None
    if local is not None:
        mask = local if mask is None else mask & local
    plan = tile_plan(s, opts, mask if band is None else band)
    if plan.kernel in TORCH_OPS_KERNELS:
        fwd, bwd, tail = _torch_work(s, runs, per_head, evb, plan.pure_causal, kernel=plan.kernel)
    elif s.mods == "bias":
        (fwd, bwd), tail = _bias_work(s, runs, per_head, evb, plan.pure_causal), 0
    else:
        fwd, bwd, tail = _tiled_work(s, runs, per_head, evb)
    out_lse = s.q_bytes + lse
    rows_bytes = 8 * g
    peak_fwd = out_lse + fwd
    if rest is not None:
        if plan.kernel in TORCH_OPS_KERNELS:
            rest_fwd, rest_bwd, _ = _torch_work(s, rest, False, evb + 2, False, dout_view=False, kernel=plan.kernel)
        elif s.mods == "bias":
            rest_fwd, rest_bwd = _bias_work(s, rest, False, evb + 2, False)
        else:
            rest_fwd, rest_bwd, _ = _tiled_work(s, rest, False, evb + 2)
        # index_select of the g rows of q; the rows' own output and lse
        peak_fwd = max(peak_fwd, out_lse + rows_bytes + 2 * qrow * g + lrow * g + rest_fwd)
        # Their merge into the local pass's rows: the rows' output, the local rows picked in the
        # accumulation dtype, both weighted and their sum (4 such rows), and a few lse rows.
        wide = qrow * g * s.acc_itemsize // s.itemsize
        peak_fwd = max(peak_fwd, out_lse + rows_bytes + qrow * g + 4 * wide + 8 * lrow * g)
    # Half inputs: dQ, dK, dV accumulate in float32 and are cast back at the end (both kept then).
    r = s.acc_itemsize // s.itemsize
    kv_acc = 2 * s.kv_bytes * r
    grads = r * s.q_bytes + kv_acc
    casts = s.q_bytes + 2 * s.kv_bytes if s.half else 0
    peak_bwd = out_lse + rows_bytes + lse + grads + bwd
    if s.half and rest is None:
        peak_bwd = max(peak_bwd, out_lse + rows_bytes + lse + grads + casts + tail)
    if rest is not None:
        # The local pass's gradients stay in the accumulation dtype until the end.
        # The rows' pass: dO, q and O of the g rows picked, its dQ (in the accumulation dtype),
        # lse rows, a whole dK, dV, and its working set.
        peak_bwd = max(peak_bwd, out_lse + rows_bytes + grads + (3 + r) * qrow * g + 2 * lrow * g
                       + kv_acc + rest_bwd)
        if s.half:  # the casts back, with the rows' pass's dQ, dK, dV still bound
            peak_bwd = max(peak_bwd, out_lse + rows_bytes + grads + r * qrow * g + kv_acc + casts)
    if band is not None:
        cls_fwd, cls_bwd = _class_work(s, opts.stride)
        peak_fwd = max(peak_fwd, out_lse + cls_fwd)
        if s.training:
            peak_bwd = max(peak_bwd, out_lse + grads + cls_bwd)
    saved = out_lse + rows_bytes
    if not s.training:
        return Footprint(0, peak_fwd)
    return Footprint(saved, max(peak_fwd, peak_bwd) - saved)


# --- score modifications: which the closed forms hold for, and sinks around any schedule ----


def mods_domain_reasons(s: Shape, kernel: str) -> list[str]:
    """Why the tiled closed form does not hold for ``s``'s score modifications on ``kernel``
    (``kernels.plan_call``'s choice for them); empty where it does: sinks alone (around any
    schedule, ``with_sinks``), the softcap kernel, dropout alone on the plain-PyTorch kernel."""
    if s.mods is None:
        return []
    if s.score_mod and s.mods == "":
        return ["a generic score_mod (a Python function, one capturing a tensor that needs a gradient, or "
                "any score_mod with dropout) runs under autograd per tile, whose temporaries are the "
                "function's own: not modelled (traced)"]
    if s.mods != "" and kernel == "torch":
        return [f"a {s.mods} score_mod on the plain-PyTorch tile kernel (kernel='torch', or {s.dtype}) runs "
                "under autograd per tile: not modelled (traced)"]
    if s.mods == "bias" and s.bias is None:
        return ["an additive-bias score_mod other than the built-in alibi (offset 0) and relative_bias: "
                "its bias's own temporaries are not modelled (traced)"]
    if s.masked:
        return ["a user mask with a score_mod or dropout is not modelled (traced)"]
    return []


def with_sinks(s: Shape, footprint: Callable[[Shape], Footprint]) -> Footprint:
    """``footprint(s)`` (the schedule's own closed form) with sinks around it, read off
    ``kernels.tiled.apply_sinks`` and ``_ExactAttention`` (L = one lse, B·Hq·N·a bytes):

    * forward: after the schedule, beside its output and lse, ``apply_sinks`` makes the new lse,
      ``lse - new`` and its exponential (3·L; the weights' cast for half inputs comes after the
      difference is freed). The
      new lse replaces the old one as saved: ``saved`` does not change.
    * backward, only when the sinks require a gradient: D = rowsum(dO ∘ O) (L) first, a block of
      1024 rows at a time (the block's product, and for half inputs the float32 copies of dO
      and O: 3 blocks, and its rowsum); D stays alive through the schedule's backward (+ L on
      its peak); then, beside the finished dQ, dK, dV, exp(sink - lse') and its product with D
      (2·L)."""
    plain = footprint(s)
    if not s.sinks:
        return plain
    lse = s.lse_bytes
    out_lse = s.q_bytes + lse
    fwd = max(footprint(replace(s, training=False)).transient, out_lse + 3 * lse)
    if not s.training:
        return Footprint(0, fwd)
    saved, transient = plain
    peak = max(saved + transient, fwd)
    if s.sinks_grad:
        rows = min(s.seq_len, 1024)
        row_block = s.batch * s.heads * rows * s.acc_itemsize
        block = row_block * s.head_dim
        row_dot = saved + lse + (3 if s.half else 1) * block + row_block
        end = saved + 3 * lse + s.q_bytes + 2 * s.kv_bytes
        peak = max(peak + lse, row_dot, end)
    return Footprint(saved, peak - saved)
