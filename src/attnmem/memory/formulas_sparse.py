"""Closed forms of the sparse, selective and adaptive-span methods (see ``estimate.FORMULAS``).

Every method here runs a loop over query tiles that keeps a few O(N·D) buffers for the whole
call and, on top of them, a working set that lives for one tile. So each closed form is

    peak = the O(N·D) buffers alive at that point + the largest working set of one tile,

both read off the code. Symbols used in the docstrings, all in bytes unless counted:

* ``Q = B·Hq·N·D·s`` (one query-shaped tensor, ``s`` = itemsize), ``K = B·Hkv·N·D·s``;
  ``L = B·Hq·N·a`` one log-sum-exp per query row (``a`` = 4, 8 for float64);
* ``t = B·Hq·Tq·D·s`` one query tile of ``Tq`` rows, ``k1 = B·Hkv·D·s`` one key (of K or V);
* ``G = Hq / Hkv``; a mask tile of ``Tq`` rows and ``n`` keys has ``m = G·Tq·n`` elements
  (``Hq·Tq·n`` for a per-head pattern).

**Sparse patterns** (``sliding_window``, ``dilated``, ``longformer``, ``bigbird``, ``strided``,
``fixed``) run ``kernels.tiled`` over the block map of their pattern. Which key tiles a query tile
lists, and how they group into kernel calls (*segments*: merged runs of full tiles, gathered
partial tiles; at most 4096 gathered keys in the forward, 2048 keys per call in the backward),
is the pattern's structure: the formulas take the block-map rows of a few query tiles (the
first, a middle and the last ones: every interior tile of these patterns has the same row),
computed by the pattern's own ``tile_states`` for those tiles only, and group them with
``kernels.plan_segments``; cost O(N / kv_tile) per sampled tile, never a trace. The terms per
segment (``_tiled_fwd_work``, ``_tiled_bwd_work``) follow ``tiled_forward``/``tiled_backward``
line by line.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import masks as M
from .. import registry
from ..kernels import MAX_GATHER, MAX_SEGMENT, MIN_Q_TILE, Segment, plan_segments
from .estimate import OPS_PER_SEGMENT, Shape, _lse_bytes, formula

# Tiles sampled at each end and in the middle of a long sequence (all tiles when fewer).
_EDGE_TILES = 4
# Python-level operator calls per segment of one pass (fwd or bwd) of the tiled loop.
_OPS_PER_PASS = OPS_PER_SEGMENT // 2


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
    for r in states.tolist():
        rows.append([(j, st == M.FULL) for j, st in enumerate(r) if st != M.EMPTY])
    return rows


def _rest_rows(local: M.Mask, s: Shape, positions: torch.Tensor, q_tile: int, kv_tile: int
               ) -> list[list[tuple[int, bool]]]:
    """Block rows of ``sparse._rows_outside``: the global query rows at ``positions`` against
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
            rows.append([(j, bool(full[0, j])) for j in range(nkt) if not bool(empty[0, j])])
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


def _fused(s: Shape, opts) -> bool:
    """The segment kernel is PyTorch's fused CPU operator (the terms below are for it)."""
    if opts.kernel == "torch" or s.dtype not in ("float32", "float64"):
        return False  # plain kernel, or half inputs (float32 accumulators): traced
    return True


def _mask_rows(s: Shape, per_head: bool) -> int:
    """Rows of one stacked mask tile per query row: G (head-independent), Hq (per head)."""
    if per_head:
        return s.heads
    return s.heads // s.kv_heads


def _eval_bytes(mask: M.Mask, heads: int) -> int:
    """Bytes per (query, key) pair alive at the peak of evaluating ``mask``'s mask_mod on a tile,
    read off each mask_mod: int64 relative positions (8), int64 remainders (8), bools (1)."""
    if isinstance(mask, (M.And, M.Or)):
        # a's result (1) stays while b runs; then both and the combined result.
        return max(_eval_bytes(mask.a, heads), 1 + _eval_bytes(mask.b, heads), 3)
    if isinstance(mask, M.SlidingWindow):
        return 11  # rel, the running result, one comparison, the new result
    if isinstance(mask, M.Dilated):
        return 8 + 9 * heads if mask.per_head else 17  # rel, rel % d (per head: Hq of them), ==
    if isinstance(mask, (M.BigBird, M.Strided)):
        return 17  # rel (or kb - qb), its abs / remainder, one comparison
    return 2  # GlobalTokens, Fixed: gathers of per-position flags, a bool or two per pair


def _seg_terms(s: Shape, seg: Segment, tq: int, per_head: bool, evb: int = 0) -> tuple[int, int, int, int]:
    """(gathered K, V copies, mask bools + float bias, dK + dV, mask evaluation) bytes of one
    segment (the evaluation: ``evb`` bytes per pair, then the G-stacked copy of its bools)."""
    k1 = s.batch * s.kv_heads * s.head_dim * s.itemsize
    copies = 0 if seg.contiguous else 2 * seg.size * k1
    m = _mask_rows(s, per_head) * tq * seg.size if seg.masked else 0
    pairs = tq * seg.size if seg.masked else 0
    ev = max(evb * pairs, pairs + (m if m != pairs else 0))
    return copies, m * (1 + s.itemsize), 2 * seg.size * k1, ev


def _tiled_work(s: Shape, plan_rows, per_head: bool, evb: int) -> tuple[int, int]:
    """(forward, backward) working set of the tiled loop: the largest, over the sampled
    segments, of what one segment's kernel call keeps alive besides the O(N·D) buffers.

    ``plan_rows``: runs of ``(Tq, forward segments, backward segments, lead)`` of consecutive
    tiles; a ``lead`` tile only precedes the next (its own segments are not counted).

    Backward, at segment j of a tile, with p the segment before it (maybe of the tile before):
    the previous call's dK, dV (2·p keys) + dQ of the tile (dq_t: 0, 1 or 2 tiles for j = 0, 1,
    ≥ 2, plus the last dQ of the tile before when j = 0) + for G > 1 the stacked q, O, dO tiles
    and their lse (3·t + lse tile) + gathered K, V (2·n keys, when not contiguous) + the mask
    (bools + float bias, m·(1 + s)) + the call's outputs dQ (t) and dK, dV (2·n keys).
    Forward, at segment j: the running output (j ≥ 1: 1 tile, j ≥ 2: 2) or the last output of
    the tile before (j = 0) + for G > 1 the stacked q tile + gathered K, V + the mask (its
    negation too, while the bias is filled: m·(2 + s)) + the outputs O (t) and lse (two lse
    tiles); merging two segments holds 4 more tiles.
    """
    acc = 8 if s.itemsize == 8 else 4
    qrow = s.batch * s.heads * s.head_dim * s.itemsize  # one query row of Q
    lrow = s.batch * s.heads * acc  # one row of lse
    g1 = s.heads == s.kv_heads
    fwd = bwd = 0
    for run in plan_rows:
        prev_f = prev_b = None  # (tile rows, segment) of the call before
        for tq, fsegs, bsegs, lead in run:
            t = qrow * tq
            stack = 0 if g1 else 2 * t + lrow * tq  # dO is an expanded scalar: its tile is a view
            for j, seg in enumerate(bsegs):
                copies, mask, grads, ev = _seg_terms(s, seg, tq, per_head, evb)
                hold = 0
                if prev_b is not None:
                    hold = _seg_terms(s, prev_b[1], prev_b[0], per_head)[2]
                    hold += qrow * prev_b[0] if j == 0 else 0
                hold += t * min(j, 2)
                if not lead:
                    base = hold + stack + copies
                    bwd = max(bwd, base + mask + t + grads, base + mask * (2 + s.itemsize) // (1 + s.itemsize),
                              base + ev)
                prev_b = (tq, seg)
            for j, seg in enumerate(fsegs):
                copies, mask, _, ev = _seg_terms(s, seg, tq, per_head, evb)
                hold = t * min(j, 2) if j else (qrow * prev_f[0] + lrow * prev_f[0] if prev_f else 0)
                base = hold + (0 if g1 else t) + copies
                mbool = mask // (1 + s.itemsize)
                if not lead:
                    fwd = max(fwd, base + mask + mbool, base + mask + t + 2 * lrow * tq, base + ev)
                    if j:
                        fwd = max(fwd, hold + (0 if g1 else t) + 4 * t)
                prev_f = (tq, seg)
    return fwd, bwd


def _plan_rows(rows, tiles, n_q: int, n_k: int, q_tile: int, kv_tile: int):
    """``(Tq, forward segments, backward segments)`` per sampled tile, grouped as the code does."""
    out = []
    for i, row in zip(tiles, rows):
        tq = min(q_tile, n_q - i * q_tile)
        fwd = plan_segments([row], n_q, n_k, q_tile, kv_tile, merge=True, gather=MAX_GATHER)[0][2]
        bwd = plan_segments([row], n_q, n_k, q_tile, kv_tile, merge=True, max_segment=MAX_SEGMENT)[0][2]
        out.append((tq, fwd, bwd, i == tiles[0] and i > 0))
    return out


@functools.lru_cache(maxsize=64)
def _sparse_plan(name: str, s: Shape, opts):
    """The sampled plan of a sparse method: (local runs, per-head?, rest runs or None, global
    rows, calls per pass over the whole sequence, mask evaluation bytes per pair)."""
    # Its tensors have a few thousand elements: intra-op threads only cost synchronisation
    # (on a loaded 2-core machine, 100x the work itself).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sparse_plan_1(name, s, opts)
    finally:
        torch.set_num_threads(threads)


def _strided_split(name: str, s: Shape, opts) -> bool:
    """``StridedAttention.forward`` runs the pattern as band + residue classes (``_StridedSplit``):
    pattern "strided", the fused CPU kernel in float32/float64, no user mask and, for causal, no
    GQA (estimates are square, Nq == Nk)."""
    return (name == "strided" and opts.pattern == "strided" and _fused(s, opts) and not s.masked
            and (not s.causal or s.heads == s.kv_heads))


def _strided_band(stride: int, causal: bool) -> M.Mask:
    """The band ``StridedAttention.forward`` tiles: ``0 < |rel| < stride`` (causal: the left side)."""
    left = M.Band(-(stride - 1), -1)
    return left if causal else M.Or(left, M.Band(1, stride - 1))


def _sparse_plan_1(name: str, s: Shape, opts):
    method = registry.get(name)
    local, rows = method.split(opts, s.seq_len)
    mask = M.causal() & local if s.causal else local
    if _strided_split(name, s, opts):
        local = mask = _strided_band(opts.stride, s.causal)
    q_tile = max(opts.q_tile, MIN_Q_TILE)
    nqt = math.ceil(s.seq_len / q_tile)
    runs, calls, sampled = [], 0, 0
    for tiles in _sample_groups(nqt):
        rows_ = _tile_rows(mask, s, q_tile, opts.kv_tile, tiles)
        planned = _plan_rows(rows_, tiles, s.seq_len, s.seq_len, q_tile, opts.kv_tile)
        runs.append(planned)
        calls += sum(len(f) + len(b) for _, f, b, _ in planned)
        sampled += len(tiles)
    calls = calls * nqt // max(sampled, 1)
    per_head = isinstance(local, M.Dilated) and local.per_head
    rest = None
    g = 0
    if rows is not None and rows.numel():
        g = rows.numel()
        rest_rows = _rest_rows(local, s, rows, q_tile, opts.kv_tile)
        tiles = list(range(len(rest_rows)))
        rest = [_plan_rows(rest_rows, tiles, g, s.seq_len, q_tile, opts.kv_tile)]
        calls += sum(len(f) + len(b) for _, f, b, _ in rest[0])
    return runs, per_head, rest, g, calls, _eval_bytes(mask, s.heads)


# Python-level operator calls per residue class of ``_StridedSplit`` (slices, the kernel call,
# the log-sum-exp merge, the stores; forward and backward).
_OPS_PER_CLASS = 40


def _sparse_work(name: str):
    def work(s: Shape, opts) -> int:
        if s.masked or not _fused(s, opts):
            return 0
        classes = min(opts.stride, s.seq_len) if _strided_split(name, s, opts) else 0
        return _OPS_PER_PASS * _sparse_plan(name, s, opts)[4] + _OPS_PER_CLASS * classes
    return work


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
    bwd = _lse_bytes(s) + 2 * (c + 2 * ck) + (2 * c + l1 if stack else 0)
    return fwd, bwd


def _sparse(name: str, s: Shape, opts) -> tuple[int, int] | None:
    """The closed form shared by the sparse patterns (see the module docstring for symbols).

    saved = O + L (+ the g global row indices, int64, for longformer and bigbird);
    forward peak = Q + 2K + O + L + the forward working set of the widest segment;
    backward peak = Q + 2K + O + L (saved) + L (lse with +inf for empty rows) + dQ + dK + dV +
    the backward working set of the widest segment (``_tiled_work``). With g global query
    rows (computed apart, then merged): after the local pass, the rows' own pass holds
    g-row copies of q, dO, O (3·g rows), its dQ and lse, and a whole dK, dV (2K) besides the
    local pass's dQ + dK + dV; its keys are every key the local pattern leaves out, in 2048-key
    calls. Linear in N (O(N·(w + g)) allowed pairs, a tile at a time); fixed (and strided off
    its split path) lists every key tile, so its forward's partial segment reaches N keys: a
    Tq × N mask. Strided on the fused kernel in float32/float64 without a user mask (causal:
    without GQA) runs as ``_StridedSplit``: the tiled pass covers only the band
    ``0 < |rel| < stride`` (causal: its left side), and the peak is the larger of that pass's and
    of the residue-class loop's (``_class_work``: O(N/stride) rows per class).
    Half precision and the plain kernel have no closed form here (traced)."""
    if s.masked or not _fused(s, opts):
        return None
    runs, per_head, rest, g, _, evb = _sparse_plan(name, s, opts)
    lse = _lse_bytes(s)
    qrow = s.batch * s.heads * s.head_dim * s.itemsize
    lrow = lse // s.seq_len
    fwd, bwd = _tiled_work(s, runs, per_head, evb)
    out_lse = s.q_bytes + lse
    rows_bytes = 8 * g
    peak_fwd = out_lse + fwd
    if rest is not None:
        rest_fwd, rest_bwd = _tiled_work(s, rest, False, evb + 2)
        # index_select of the g rows of q; the rows' own output and lse
        peak_fwd = max(peak_fwd, out_lse + rows_bytes + 2 * qrow * g + lrow * g + rest_fwd)
    grads = s.q_bytes + 2 * s.kv_bytes
    peak_bwd = out_lse + rows_bytes + lse + grads + bwd
    if rest is not None:
        peak_bwd = max(peak_bwd, out_lse + rows_bytes + grads + 4 * qrow * g + 2 * lrow * g
                       + 2 * s.kv_bytes + rest_bwd)
    if _strided_split(name, s, opts):
        cls_fwd, cls_bwd = _class_work(s, opts.stride)
        peak_fwd = max(peak_fwd, out_lse + cls_fwd)
        if s.training:
            peak_bwd = max(peak_bwd, out_lse + grads + cls_bwd)
    saved = out_lse + rows_bytes
    if not s.training:
        return 0, peak_fwd
    return saved, max(peak_fwd, peak_bwd) - saved


def _register_sparse(name: str) -> None:
    def fn(s: Shape, opts) -> tuple[int, int] | None:
        return _sparse(name, s, opts)

    fn.__doc__ = _sparse.__doc__
    formula(name, trace_work=_sparse_work(name))(fn)


for _name in ("sliding_window", "dilated", "longformer", "bigbird", "strided"):
    _register_sparse(_name)


# --- selective: topk, hard -----------------------------------------------------------------


def _topk_terms(s: Shape, q_tile: int, kv_tile: int, kk: int) -> tuple[int, int, int, int, int]:
    """(BIG, S, M, Tk, number of key tiles of the widest query tile) of ``_TopKAttention``."""
    acc = 8 if s.itemsize == 8 else 4
    tq, tk = min(q_tile, s.seq_len), min(kv_tile, s.seq_len)
    m = (s.heads // s.kv_heads) * tq  # stacked query rows per KV head
    big = s.batch * s.kv_heads * m * kk * s.head_dim * acc  # gathered K or V rows of one tile
    score = s.batch * s.kv_heads * m * tk * acc  # one score tile
    return big, score, m, tk, math.ceil(s.seq_len / tk)


def _topk_bytes(s: Shape, q_tile: int, kv_tile: int, topk: int, noise: bool = False) -> tuple[int, int] | None:
    """Selective attention (``selective._TopKAttention``), k = min(topk, N) keys per query,
    M = G·Tq stacked rows per query tile, Tk = min(kv_tile, N), a = accumulation itemsize:
    BIG = B·Hkv·M·k·D·a (the gathered keys or values of one tile), S = B·Hkv·M·Tk·a (one score
    tile).

    saved = O + the chosen indices (B·Hq·N·k int64) + their probabilities (B·Hq·N·k·a);
    forward: O + indices + probabilities + the previous tile's gathered V (BIG) + the larger of
    two score tiles and the previous tile's M·Tk mask bools while the next one is computed (one
    tile when a row has a single key tile; ``noise``: the Gumbel noise of ``hard``'s sampling,
    one more), one score tile with the evaluation of a causal key tile's mask (int64
    relative positions and bools, 11 bytes per pair, and the M·Tk stacked bools), and the
    tile's own gathered V (BIG) with its output;
    backward: the forward's saved + the zero gradient autograd makes for the index output
    (B·Hq·N·k int64) + dQ + dK + dV (in a) + 3·BIG (the gathered K and V of a
    tile and one per-key gradient being scattered into dK or dV) + the tile's dQ and a few
    M·k buffers. Linear in N (O(N·k)), never N²."""
    if s.masked:
        return None
    acc = 8 if s.itemsize == 8 else 4
    kk = max(min(topk, s.seq_len), 1)
    big, score, m, tk, nkt = _topk_terms(s, q_tile, kv_tile, kk)
    rows = s.batch * s.heads * s.seq_len
    sel = rows * kk * (8 + acc)  # indices and probabilities
    saved = s.q_bytes + sel
    small = s.batch * s.kv_heads * m * kk * (8 + acc)  # one tile's running best scores and indices
    tile_o = s.batch * s.kv_heads * m * s.head_dim * acc
    scores = (2 if nkt > 1 else 1) + (1 if noise else 0)
    mask = 0
    if s.causal:
        tq = min(q_tile, s.seq_len)
        mask = tq * tk * 11 + m * tk  # the evaluation (int64 positions and bools), the stacked bools
    # The previous tile's gathered V lives on only when there is a previous tile.
    prev_v = big if s.seq_len > q_tile else 0
    # At a score matmul the previous tile's scores (and noise) and bools are still alive; the
    # mask is evaluated next to one score tile.
    fwd = saved + prev_v + 2 * small + max(scores * score + m * tk, score + mask, big + tile_o)
    if not s.training:
        return 0, fwd
    grads = s.q_bytes + 2 * s.kv_bytes * acc // s.itemsize
    stack = 0 if s.heads == s.kv_heads else small + tile_o  # stacked index/probability and q tiles
    # Autograd materialises a zero gradient for the int64 index output (materialize_grads).
    bwd = saved + rows * kk * 8 + grads + 3 * big + tile_o + 3 * s.batch * s.kv_heads * m * kk * acc + stack
    return saved, max(fwd, bwd) - saved


def _topk_work(s: Shape, opts) -> int:
    """Forward: ~12 operator calls per (query tile, key tile) pair; backward ~20 per query tile."""
    nqt = math.ceil(s.seq_len / opts.q_tile)
    nkt = math.ceil(s.seq_len / opts.kv_tile)
    pairs = nqt * nkt // (2 if s.causal else 1)
    return 12 * pairs + 20 * nqt


def _topk(s: Shape, opts) -> tuple[int, int] | None:
    return _topk_bytes(s, opts.q_tile, opts.kv_tile, opts.topk)


# The documented formula is the docstring at registration: set it first.
_topk.__doc__ = _topk_bytes.__doc__
formula("topk", trace_work=_topk_work)(_topk)


@formula("hard", trace_work=_topk_work)
def _hard(s: Shape, opts) -> tuple[int, int] | None:
    """``topk``'s closed form with k = 1 (deterministic: the argmax). The stochastic mode adds
    the Gumbel noise (one score tile) and, when training, the tiled soft attention of the
    straight-through gradient: it has no closed form here (traced)."""
    if opts.mode == "stochastic" and s.training:
        return None
    return _topk_bytes(s, opts.q_tile, opts.kv_tile, 1, noise=opts.mode == "stochastic")


# --- adaptive span: adaptive_span (learned spans), adaptive_span_fixed ---------------------


def _span_width(s: Shape, z: float, ramp: int) -> int:
    """``adaptive_span_attention``'s band width W from the largest span z (as its dtype holds it)."""
    return max(min(math.ceil(z) + ramp + (1 if ramp == 0 else 0), s.seq_len), 1)


def _span_tiles(n: int, width: int, q_tile: int) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    """The distinct (previous tile, tile) pairs of ``(Tq, Tk)`` of ``adaptive_span._Band``
    (square: query tile [qa, qb) sees keys [max(qa − W + 1, 0), qb)); the first tile's previous
    one is (0, 0). O(N / q_tile) integer steps, no tensors."""
    pairs, prev = set(), (0, 0)
    for qa in range(0, n, q_tile):
        qb = min(qa + q_tile, n)
        cur = (qb - qa, qb - max(qa - (width - 1), 0))
        pairs.add((prev, cur))
        prev = cur
    return pairs


def _span_bytes(s: Shape, width: int, q_tile: int, graph: bool) -> tuple[int, int] | None:
    """Adaptive-span attention (``adaptive_span._BandAttention``): query tiles of Tq ≤ q_tile rows,
    each against its band of Tk = min(Tq + W − 1, qb) keys, W = ⌈max span⌉ + R (+1 when R = 0),
    at most N. Per tile, with p = Tq·Tk pairs, a = itemsize (float32/float64): the bias
    b = Hq·p·a (per head, batch-independent), built from int64 distances (8p) and two bools per
    pair: its peak is max(17p, 10p + 2b) (the table lookup and its masked copy);
    S = B·Hq·p·a one score tile, t = B·Hq·Tq·D·a one query tile, k_t = B·Hkv·Tk·D·a.

    saved = O + L + the (Hq, W) table (``graph``: learned spans with a ramp also keep the table's
    autograd graph, 3 more (Hq, W) floats and one of bools).
    Fused (fixed spans, or no gradient for the spans): the forward peaks while a tile's bias is
    built, with the previous tile's bias, output and lse still bound (b' + t' + lse tile);
    the backward at the same point holds L (lse with +inf) + dQ + dK + dV + the previous tile's
    bias, dQ, dK, dV (b' + t' + 2k_t'); at a kernel call, for G > 1, the G-stacked q, O, lse
    tiles (copies).
    Learned spans (the PyTorch loop, which also returns the table's gradient, (Hq, W)): the
    forward holds the previous tile's scores and output (S' + t') besides the new scores and
    bias; the backward, at the next tile's bias (or its dP), the previous tile's bias,
    distances, dS, dP and per-head bias gradient (b' + 8p' + 2S' + b'), or this tile's bias,
    distances, S, dP and the previous tile's dS, dP, per-head gradient.
    O(N·W) work, O(N·D + Tq·(Tq + W)) memory. Half precision and user masks: traced."""
    if s.masked or not s.causal or s.itemsize not in (4, 8):
        return None
    a = s.itemsize
    stack = s.heads != s.kv_heads
    base = s.q_bytes + _lse_bytes(s) + s.heads * width * a  # out, lse, table
    if graph:
        base += 3 * s.heads * width * a + s.heads * width
    fwd = bwd = 0
    for (tq0, tk0), (tq, tk) in _span_tiles(s.seq_len, width, q_tile):
        p0, p = tq0 * tk0, tq * tk
        b0, b = s.heads * p0 * a, s.heads * p * a
        S0, S = s.batch * b0, s.batch * b  # one score tile: B·Hq·p·a
        t0, t = (s.batch * s.heads * x * s.head_dim * a for x in (tq0, tq))
        k0, k = (s.batch * s.kv_heads * x * s.head_dim * a for x in (tk0, tk))
        lr0, lr = s.batch * s.heads * tq0 * a, s.batch * s.heads * tq * a
        build = max(17 * p, 10 * p + 2 * b)
        if not graph:
            fwd = max(fwd, b0 + t0 + lr0 + build, t0 + lr0 + b + (t if stack else 0) + t + lr)
            bwd = max(bwd, b0 + t0 + 2 * k0 + build,
                      t0 + 2 * k0 + b + (2 * t + lr if stack else 0) + t + 2 * k)
        else:
            fwd = max(fwd, S0 + t0 + (t if stack else 0) + S + build)
            copies = 2 * t + lr if stack else 0  # stacked q, O tiles and their lse
            bwd = max(bwd, b0 + 8 * p0 + 2 * S0 + b0 + copies + build,
                      b + 8 * p + S + S0 + S0 + b0 + S + copies)
    if not s.training:
        return 0, base + fwd
    grads = s.q_bytes + 2 * s.kv_bytes + (s.heads * width * a if graph else 0)  # + the table's gradient
    peak = max(base + fwd, base + _lse_bytes(s) + grads + bwd)
    return base, peak - base


def _span_work(s: Shape, opts) -> int:
    """~40 operator calls per query tile (forward and backward), but a tile's int64 distances
    and bools (Tq × Tk, under ``SMALL_NUMEL``) stay real and are computed: a trace took
    ≈ 0.2-0.3 s per tile here (N = 2048-8192, default options, loaded 2-core CPU), the time of
    ≈ 1000 fake calls."""
    return 1000 * math.ceil(s.seq_len / max(opts.q_tile, 1))


def _adaptive_span_fixed(s: Shape, opts) -> tuple[int, int] | None:
    spans = opts.spans if isinstance(opts.spans, tuple) else (opts.spans,)
    # The width comes from the spans as the call's accumulation dtype holds them.
    z = torch.tensor([float(x) for x in spans], dtype=torch.float64 if s.itemsize == 8 else torch.float32)
    return _span_bytes(s, _span_width(s, float(z.max()), opts.ramp), max(opts.q_tile, 1), graph=False)


def _adaptive_span(s: Shape, opts) -> tuple[int, int] | None:
    """The learned module's spans start at ``init_span`` (default ``max_span``): z =
    max_span · clamp(init / max_span, 0, 1) in float32, as ``AdaptiveSpanAttention`` holds it.
    Training with a ramp, the spans get gradients: the PyTorch loop (``graph``); otherwise the
    fused kernel, as ``adaptive_span_fixed``."""
    init = opts.max_span if opts.init_span is None else opts.init_span
    frac = torch.full((1,), init / opts.max_span)  # the module's parameter (float32)
    z = float((opts.max_span * frac.clamp(0.0, 1.0)).max())
    graph = s.training and opts.ramp > 0
    return _span_bytes(s, _span_width(s, z, opts.ramp), max(opts.q_tile, 1), graph=graph)


# The documented formula is the docstring at registration: set it first.
_adaptive_span_fixed.__doc__ = _span_bytes.__doc__
_adaptive_span.__doc__ = (_adaptive_span.__doc__ or "") + "\n\n" + (_span_bytes.__doc__ or "")
formula("adaptive_span_fixed", trace_work=_span_work)(_adaptive_span_fixed)
formula("adaptive_span", trace_work=_span_work)(_adaptive_span)
