"""Selective attention: each query attends to a few keys only (top-k, hard).

``topk`` keeps, per query row, the k highest-scoring allowed keys and takes the softmax over
those alone. The selection runs tile by tile over the block map of the mask with a running
merge, so no query tile ever holds more than ``q_tile × (kv_tile + k)`` scores::

    for each key tile j listed for query tile i:        # empty tiles are never visited
        s = q_i k_jᵀ · scale, masked where the tile is partial     # (M, Tk)
        best = topk(cat(best, s), k)                                # (M, k) scores + indices

The merge is exact but ranks far fewer than ``k + Tk`` scores (``_merge_topk``): blocks whose
maximum cannot beat a row's k-th best are skipped, and at most the k best blocks are ranked.

Only the chosen indices and their probabilities, (B, H, N, k) each, are kept for the backward,
which gathers the selected keys and values again: memory O(N·k), never N². Gradients flow to
the selected scores (q and the selected keys) and to the selected values; the choice itself is
piecewise constant and has no gradient. A row with fewer than k allowed keys uses those it
has; a row with none returns zeros.

Equivalent PyTorch code (one head, N×N, for reading only)::

    s = (q @ k.T * scale).masked_fill(~allowed, -inf)
    top, idx = s.topk(min(k, Nk), dim=-1)
    out = (softmax(top, -1)[..., None] * v[idx]).sum(-2)

``hard`` is one key per query. ``mode="deterministic"`` takes the argmax (``topk`` with k = 1):
the output is exactly the value row of the best key, and only ``v`` receives a gradient.
``mode="stochastic"`` samples the key from ``softmax(s)`` by the Gumbel-max trick (argmax of
``s + g``, ``g = -log(E)``, ``E ~ Exp(1)``) and trains with the *straight-through* estimator::

    out = v[j] + (softmax(s) V - stop_grad(softmax(s) V))      # forward value: v[j]

``v`` receives the gradient of the sampled row; q and k receive the gradient of the soft
attention ``softmax(s) V`` (computed in O(N) memory by the tiled exact kernel). For a loss that
is linear in the output this is unbiased: ``E[v[j]] = softmax(s) V``, so the soft gradient is
the gradient of the expected loss. For any other loss it is biased, because the upstream
gradient is evaluated at the sampled output ``v[j]`` rather than averaged over samples; the
bias grows with the curvature of the loss and the spread of ``softmax(s)`` (it vanishes as
attention becomes one-hot). It has no temperature to tune and no variance from the gradient
path itself; the forward pass is an exact sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..checks import check_positive_fields
from ..kernels import TileContext, acc_dtype, allowed_bool, tiled_attention
from ..memory.model import Footprint, Shape
from ..registry import Inputs, Method, Style, register

MODES = ("deterministic", "stochastic")


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x (B, Hkv, Nk, D) at idx (B, Hkv, M, k) -> (B, Hkv, M, k, D)."""
    B, Hkv, M, kk = idx.shape
    D = x.shape[-1]
    if x.is_contiguous():
        # One row copy per index: index_select on the flat (B·Hkv·Nk, D) view is ~3x faster
        # than gather, which reads an expanded index element by element.
        flat = _flat_rows(idx, x.shape[2])  # (B·Hkv·M·k,)
        return x.view(-1, D).index_select(0, flat).view(B, Hkv, M, kk, D)
    flat = idx.reshape(B, Hkv, M * kk, 1).expand(-1, -1, -1, D)
    return x.gather(2, flat).reshape(B, Hkv, M, kk, D)


def _scatter_rows(dst: Tensor, idx: Tensor, src: Tensor) -> None:
    """dst (B, Hkv, Nk, D)[idx] += src (B, Hkv, M, k, D), summing repeated indices.

    scatter_add_, not index_add_ on the flat view: index_add_ was 1.5x faster on one thread
    but 5-10x slower on two (measured under load, N = 4096 tiles)."""
    B, Hkv, M, kk, D = src.shape
    flat = idx.reshape(B, Hkv, M * kk, 1).expand(-1, -1, -1, D)
    dst.scatter_add_(2, flat, src.reshape(B, Hkv, M * kk, D))


def _flat_rows(idx: Tensor, nk: int) -> Tensor:
    """Key indices (B, Hkv, M, k) as rows of the flat (B·Hkv·Nk, D) view: (B·Hkv·M·k,)."""
    B, Hkv = idx.shape[:2]
    head = torch.arange(B * Hkv, device=idx.device).view(B, Hkv, 1, 1) * nk  # first row of each head
    return (idx + head).reshape(-1)


# Keys per block of topk's block-maxima prefilter (``_merge_topk``). A tile's Tk scores reduce
# to Tk / BLOCK block maxima (cheap); only the best blocks' BLOCK·k scores are ranked by topk,
# which costs tens of ns per element on CPU (the tile's own matmul costs far less).
BLOCK = 8


def _merge_max(best_s: Tensor, best_i: Tensor, s: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """k = 1: the running best (B, Hkv, M, 1) merged with a score tile (B, Hkv, M, Tk).

    The tile's first best key replaces the running best only when strictly greater, so the
    result is the first argmax of the row (``hard_definition``). NaN ranks first, as in argmax,
    and stays once chosen."""
    tile_s, tile_pos = _first_max(s)  # (B, Hkv, M, 1)
    take = ~(tile_s <= best_s) & ~torch.isnan(best_s)
    return torch.where(take, tile_s, best_s), torch.where(take, tile_pos + start, best_i)


def _first_max(s: Tensor) -> tuple[Tensor, Tensor]:
    """``s.max(-1, keepdim=True)`` (the first index of the maximum; NaN ranks first) of a tile
    (B, Hkv, M, Tk), in fewer passes: max with its index costs ~10x a plain amax on CPU, so the
    tile's BLOCK contiguous segments take a plain amax, and the index search reads only the
    first segment that holds the row's maximum."""
    lead, tk = s.shape[:-1], s.shape[-1]
    seg = tk // BLOCK
    if seg < BLOCK or tk % BLOCK:
        return s.max(-1, keepdim=True)
    segments = s.view(*lead, BLOCK, seg)  # (B, Hkv, M, BLOCK, Tk / BLOCK): contiguous ranges of keys
    _, first = segments.amax(-1).max(-1, keepdim=True)  # (B, Hkv, M, 1): the first segment with the row's max
    inside = segments.gather(-2, first.unsqueeze(-1).expand(*lead, 1, seg)).squeeze(-2)  # (B, Hkv, M, Tk / BLOCK)
    val, pos = inside.max(-1, keepdim=True)
    return val, pos.add_(first * seg)


def _merge_topk(best_s: Tensor, best_i: Tensor, s: Tensor, start: int, kk: int,
                first: bool = False) -> tuple[Tensor, Tensor]:
    """The top-``kk`` of the running best (B, Hkv, M, kk) and a score tile (B, Hkv, M, Tk).

    Exact by block maxima: key j of the tile's first L = nb·BLOCK keys is in block j mod nb (a
    strided block, so the maxima are a vectorised max of BLOCK rows). Every element of a block
    whose maximum is at most the running kk-th best t cannot enter the top-kk (a tie with t
    leaves the selected scores unchanged), and the top-kk blocks by their maxima hold the
    tile's top-kk elements (an element outside them is <= the kk-th largest block maximum, and
    each chosen block holds an element >= it). So only the blocks above t, or the top-kk blocks
    when more are above t, with the running best and the L..Tk remainder, go into one topk.
    ``first``: the running best is still empty (t = -inf): the top-kk blocks, without counting.
    """
    lead, tk = s.shape[:-1], s.shape[-1]
    nb = tk // BLOCK
    if nb <= kk:
        # A tile too small for blocks to prune anything: rank it whole.
        tile_s, tile_pos = s.topk(min(kk, tk), dim=-1)  # (B, Hkv, M, min(kk, Tk))
        return _top_of(best_s, best_i, tile_s, tile_pos.add_(start), kk)
    length = nb * BLOCK
    grid = s[..., :length].view(*lead, BLOCK, nb)  # (B, Hkv, M, BLOCK, nb): grid[..., r, j] is key r·nb + j
    block_max = grid.amax(-2)  # (B, Hkv, M, nb)
    above = n_above = None
    most = kk
    if not first:
        # NaN counts as above t (topk ranks NaN first); so does every block while t = -inf.
        above = ~(block_max <= best_s.amin(-1, keepdim=True))  # (B, Hkv, M, nb)
        n_above = above.sum(-1, keepdim=True)  # (B, Hkv, M, 1)
        # A memory trace has no values: it takes the widest case, kk blocks per row.
        most = kk if is_fake(s) else min(int(n_above.max()), kk)
    if most == 0:  # no block of this tile beats any row's kk-th best: only the remainder may
        if length == tk:
            return best_s, best_i
        rest = s[..., length:]
        return _top_of(best_s, best_i, rest, torch.arange(start + length, start + tk, device=s.device).expand_as(rest),
                       kk)
    if most == kk:
        blocks = block_max.topk(kk, dim=-1, sorted=False).indices  # (B, Hkv, M, kk)
    else:
        blocks = _compact(above, most)  # (B, Hkv, M, most); slots past n_above are padding
    cand = grid.gather(-1, blocks.unsqueeze(-2).expand(*lead, BLOCK, most))  # (B, Hkv, M, BLOCK, most)
    if most < kk:
        cand.masked_fill_((torch.arange(most, device=s.device) >= n_above).unsqueeze(-2), -math.inf)
    pool = [best_s, cand.flatten(-2)]  # candidate c of the (BLOCK, most) grid: key (c // most)·nb + blocks[c % most]
    if length < tk:
        pool.append(s[..., length:])
    top_s, pos = torch.cat(pool, -1).topk(kk, dim=-1, sorted=False)  # (B, Hkv, M, kk)
    del pool, cand, block_max, above  # freed before the index arithmetic below
    # Key indices of the chosen kk only: from the running best, a candidate block, or the remainder.
    c = pos - kk  # (B, Hkv, M, kk): position among the candidates, < 0 for the running best
    top_i = blocks.gather(-1, c % most).add_(c.div(most, rounding_mode="floor").mul_(nb).add_(start))
    top_i = torch.where(c < 0, best_i.gather(-1, pos.clamp(max=kk - 1)), top_i)
    if length < tk:
        top_i = torch.where(c >= BLOCK * most, c + (start + length - BLOCK * most), top_i)
    return top_s, top_i


def _compact(above: Tensor, most: int) -> Tensor:
    """The indices of each row's True blocks, (B, Hkv, M, nb) -> (B, Hkv, M, most), in order,
    padded with 0 past the row's count (at most ``most``)."""
    slot = above.cumsum(-1).sub_(1)  # (B, Hkv, M, nb): where each True block goes
    slot.masked_fill_(~above, most)  # False blocks go to a spare slot, dropped below
    order = torch.arange(above.shape[-1], device=above.device).expand_as(slot)
    out = torch.zeros((*above.shape[:-1], most + 1), dtype=torch.int64, device=above.device)
    return out.scatter_(-1, slot, order)[..., :most]


def _top_of(best_s: Tensor, best_i: Tensor, new_s: Tensor, new_i: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """The top-``kk`` of the running best and new scores (B, Hkv, M, ·) with their key indices."""
    both_s = torch.cat([best_s, new_s], -1)
    both_i = torch.cat([best_i, new_i], -1)
    top_s, pos = both_s.topk(kk, dim=-1, sorted=False)
    return top_s, both_i.gather(-1, pos)


def select_topk(c: TileContext, q_t: Tensor, k: Tensor, qa: int, qb: int, segs, kk: int,
                generator: torch.Generator | None = None, gumbel: bool = False) -> tuple[Tensor, Tensor]:
    """Running top-``kk`` of one query tile over its key tiles.

    Args:
        q_t: the query tile as (B, Hkv, M, D), M = G·Tq.
        segs: the tile's segments from the block map (one key tile each).
        gumbel: add Gumbel noise to every allowed score (sampling instead of argmax).

    Returns:
        scores (B, Hkv, M, kk) in the accumulation dtype, in no particular order, -inf where a
        row has fewer than kk allowed keys, and their key indices (B, Hkv, M, kk) int64.
    """
    acc = acc_dtype(q_t.dtype)
    B, Hkv, M, _ = q_t.shape
    best_s = torch.full((B, Hkv, M, kk), -math.inf, dtype=acc, device=q_t.device)
    best_i = torch.zeros((B, Hkv, M, kk), dtype=torch.int64, device=q_t.device)
    qf = q_t.to(acc)
    for n, seg in enumerate(segs):
        # The "torch" kernel's plan has one key tile per segment: one contiguous range.
        start = seg.ranges[0][0]
        # The tile's scores live only inside the merge: none is held while the next is computed.
        if kk == 1:
            best_s, best_i = _merge_max(best_s, best_i, _tile_scores(c, qf, k, qa, qb, seg, generator, gumbel), start)
        else:
            best_s, best_i = _merge_topk(best_s, best_i, _tile_scores(c, qf, k, qa, qb, seg, generator, gumbel),
                                         start, kk, first=n == 0)
    return best_s, best_i


def _tile_scores(c: TileContext, qf: Tensor, k: Tensor, qa: int, qb: int, seg, generator: torch.Generator | None,
                 gumbel: bool) -> Tensor:
    """One key tile's scores (B, Hkv, M, Tk) in qf's dtype, -inf where masked, Gumbel noise added."""
    start, stop = seg.ranges[0]
    s = torch.matmul(qf, k[:, :, start:stop].to(qf.dtype).transpose(-1, -2)).mul_(c.scale)  # (B, Hkv, M, Tk)
    allowed = allowed_bool(c, qa, qb, seg)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    if gumbel:
        noise = torch.empty_like(s).exponential_(generator=generator).log_().neg_()  # Gumbel(0, 1)
        s.add_(noise)
    return s


def _softmax_or_zero(s: Tensor) -> Tensor:
    """Softmax over the last axis; rows that are all -inf give zeros."""
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = (s - row_max).exp_()
    return p.div_(p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny))


class _TopKAttention(torch.autograd.Function):
    """Forward: select, softmax over the selection, gather V. Saves indices and probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, c: TileContext, kk: int, generator, gumbel: bool):
        acc = acc_dtype(q.dtype)
        out = q.new_zeros(c.B, c.Hq, c.nq, c.D)  # (B, Hq, Nq, D)
        idx = torch.zeros((c.B, c.Hq, c.nq, kk), dtype=torch.int64, device=q.device)  # (B, Hq, Nq, k)
        prob = torch.zeros((c.B, c.Hq, c.nq, kk), dtype=acc, device=q.device)  # (B, Hq, Nq, k)
        for qa, qb, segs in c.plan:
            if not segs:
                continue  # nothing allowed: zeros
            q_t = c.q_view(q, qa, qb)  # (B, Hkv, G·Tq, D)
            s_t, i_t = select_topk(c, q_t, k, qa, qb, segs, kk, generator, gumbel)
            p_t = _softmax_or_zero(s_t)  # (B, Hkv, M, k)
            v_sel = _gather_rows(v, i_t).to(acc)  # (B, Hkv, M, k, D)
            o_t = torch.matmul(p_t.unsqueeze(-2), v_sel).squeeze(-2)  # (B, Hkv, M, D)
            c.q_store(out, qa, qb, o_t.to(q.dtype))
            c.q_store(idx, qa, qb, i_t)
            c.q_store(prob, qa, qb, p_t)
        ctx.c = c
        ctx.save_for_backward(q, k, v, idx, prob)
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, dout, _didx):
        q, k, v, idx, prob = ctx.saved_tensors
        c: TileContext = ctx.c
        acc = acc_dtype(q.dtype)
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qa, qb, segs in c.plan:
            if not segs:
                continue
            i_t, p_t = c.q_view(idx, qa, qb), c.q_view(prob, qa, qb)  # (B, Hkv, M, k)
            do_t = c.q_view(dout, qa, qb).to(acc)  # (B, Hkv, M, D)
            q_t = c.q_view(q, qa, qb).to(acc)
            k_sel = _gather_rows(k, i_t).to(acc)  # (B, Hkv, M, k, D)
            v_sel = _gather_rows(v, i_t).to(acc)
            dp = torch.matmul(v_sel, do_t.unsqueeze(-1)).squeeze(-1)  # (B, Hkv, M, k)
            ds = p_t * (dp - (p_t * dp).sum(-1, keepdim=True))
            dq_t = torch.matmul(ds.unsqueeze(-2), k_sel).squeeze(-2).mul_(c.scale)  # (B, Hkv, M, D)
            c.q_store(dq, qa, qb, dq_t.to(q.dtype))
            _scatter_rows(dk, i_t, (ds * c.scale).unsqueeze(-1) * q_t.unsqueeze(-2))
            _scatter_rows(dv, i_t, p_t.unsqueeze(-1) * do_t.unsqueeze(-2))
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def topk_attention(q: Tensor, k: Tensor, v: Tensor, *, topk: int, mask=None, scale: float,
                   q_tile: int = 256, kv_tile: int = 1024, generator: torch.Generator | None = None,
                   gumbel: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax over each query's ``topk`` best allowed keys.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), ``Hq % Hkv == 0``.
        topk: keys kept per query (at most Nk are used).
        mask: the effective ``attnmem.masks.Mask`` (causal included) or None.
        gumbel: perturb scores with Gumbel noise before selecting (sampling, used by ``hard``).

    Returns:
        out (B, Hq, Nq, D) and the selected key indices (B, Hq, Nq, min(topk, Nk)).
    """
    kk = max(min(topk, k.shape[2]), 1)
    c = TileContext(q, k, mask, scale, q_tile, kv_tile, "torch")
    return _TopKAttention.apply(q, k, v, c, kk, generator, gumbel)


def _dense_scores(q: Tensor, k: Tensor, mask, scale: float) -> Tensor:
    """(B, Hq, Nq, Nk) scores, -inf where ``mask`` forbids the pair."""
    s = q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1]).to(q.device),
                          -math.inf)
    return s


def topk_definition(q: Tensor, k: Tensor, v: Tensor, *, topk: int, mask, scale: float) -> Tensor:
    """Softmax over each row's ``topk`` best allowed scores, on the full score matrix; rows with
    no allowed key give zeros."""
    vv = v.repeat_interleave(q.shape[1] // k.shape[1], 1)  # (B, Hq, Nk, D)
    top, idx = _dense_scores(q, k, mask, scale).topk(min(topk, k.shape[2]), dim=-1)  # (B, Hq, Nq, k)
    empty = torch.isneginf(top).all(-1, keepdim=True)
    p = torch.softmax(top.masked_fill(empty, 0.0), -1).masked_fill(torch.isneginf(top), 0.0)
    picked = torch.gather(vv.unsqueeze(2).expand(-1, -1, q.shape[2], -1, -1), 3,
                          idx.unsqueeze(-1).expand(-1, -1, -1, -1, v.shape[-1]))  # (B, Hq, Nq, k, D)
    return (p.unsqueeze(-1) * picked).sum(-2)


def hard_definition(q: Tensor, k: Tensor, v: Tensor, *, mask, scale: float) -> Tensor:
    """Deterministic hard attention: the value row of each query's best allowed key; rows with
    no allowed key give zeros."""
    s = _dense_scores(q, k, mask, scale)  # (B, Hq, Nq, Nk)
    vv = v.repeat_interleave(q.shape[1] // k.shape[1], 1)  # (B, Hq, Nk, D)
    picked = torch.gather(vv, 2, s.argmax(-1, keepdim=True).expand(-1, -1, -1, v.shape[-1]))  # (B, Hq, Nq, D)
    return picked.masked_fill(torch.isneginf(s).all(-1, keepdim=True), 0.0)


@dataclass(frozen=True)
class TopKOptions:
    """topk: keys per query (positive int, default 32). q_tile, kv_tile: tile sizes of the
    running selection (default 256 and 1024; working memory O(q_tile · kv_tile))."""

    topk: int = 32
    q_tile: int = 256
    kv_tile: int = 1024

    def __post_init__(self):
        check_positive_fields(self, ("topk", "q_tile", "kv_tile"))


@register
class TopK(Method):
    name = "topk"
    style = Style("#9467bd", "P")
    family = "selective"
    exact = False
    memory = "O(B·H·N·k) indices and probabilities; O(q_tile·kv_tile) scores at a time"
    summary = "softmax over each query's k best keys, found by a tiled running top-k merge"
    Options = TopKOptions

    check_options = {"topk": 5, "q_tile": 16, "kv_tile": 16}

    def forward(self, inp: Inputs, opts: TopKOptions) -> Tensor:
        out, _ = topk_attention(inp.q, inp.k, inp.v, topk=opts.topk, mask=inp.mask, scale=inp.scale,
                                q_tile=opts.q_tile, kv_tile=opts.kv_tile)
        return out

    def definition(self, inp: Inputs, opts: TopKOptions) -> Tensor:
        return topk_definition(inp.q, inp.k, inp.v, topk=opts.topk, mask=inp.mask, scale=inp.scale)

    def memory_domain_reasons(self, s: Shape, opts: TopKOptions) -> list[str]:
        return ["a user mask is not modelled (traced)"] if s.masked else []

    def memory_model(self, s: Shape, opts: TopKOptions) -> Footprint:
        return topk_footprint(s, opts.q_tile, opts.kv_tile, opts.topk)


@dataclass(frozen=True)
class HardOptions:
    """mode: "deterministic" (argmax) or "stochastic" (Gumbel-max sample, straight-through
    gradient). seed: int or None, seeds the stochastic mode's noise. q_tile, kv_tile as ``topk``."""

    mode: str = "deterministic"
    seed: int | None = None
    q_tile: int = 256
    kv_tile: int = 1024

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        check_positive_fields(self, ("q_tile", "kv_tile"))


@register
class Hard(Method):
    name = "hard"
    style = Style("#c5b0d5", "+")
    family = "selective"
    exact = False
    memory = "O(B·H·N) indices; stochastic training adds the O(N) tiled soft attention"
    summary = "one key per query: argmax, or a Gumbel-max sample with a straight-through gradient"
    Options = HardOptions

    check_options = {"q_tile": 16, "kv_tile": 16}

    def definition(self, inp: Inputs, opts: HardOptions) -> Tensor | None:
        # The stochastic mode samples: no formula gives its output, only its distribution.
        if opts.mode == "stochastic":
            return None
        return hard_definition(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale)

    def forward(self, inp: Inputs, opts: HardOptions) -> Tensor:
        stochastic = opts.mode == "stochastic"
        gen = None
        if stochastic and opts.seed is not None:
            gen = torch.Generator(device=inp.q.device).manual_seed(opts.seed)
        hard, _ = topk_attention(inp.q, inp.k, inp.v, topk=1, mask=inp.mask, scale=inp.scale,
                                 q_tile=opts.q_tile, kv_tile=opts.kv_tile, generator=gen, gumbel=stochastic)
        if not stochastic or not (torch.is_grad_enabled() and (inp.q.requires_grad or inp.k.requires_grad)):
            return hard
        # Straight-through: the value is the sample, q and k get the soft attention's gradient.
        soft = tiled_attention(inp.q, inp.k, inp.v.detach(), mask=inp.mask, scale=inp.scale)
        return hard + (soft - soft.detach())

    def memory_domain_reasons(self, s: Shape, opts: HardOptions) -> list[str]:
        reasons = ["a user mask is not modelled (traced)"] if s.masked else []
        if opts.mode == "stochastic" and s.training:
            reasons.append("the stochastic mode's straight-through soft attention is not modelled (traced)")
        return reasons

    def memory_model(self, s: Shape, opts: HardOptions) -> Footprint:
        """``topk``'s closed form with k = 1 (deterministic: the argmax). The stochastic mode adds
        the Gumbel noise (one score tile); training, it also runs the tiled soft attention of the
        straight-through gradient, outside this model's domain."""
        return topk_footprint(s, opts.q_tile, opts.kv_tile, 1, noise=opts.mode == "stochastic")


# --- memory model -----------------------------------------------------------------------------


def _topk_terms(s: Shape, q_tile: int, kv_tile: int, kk: int) -> tuple[int, int, int, int, int]:
    """(BIG, S, M, Tk, number of key tiles of the widest query tile) of ``_TopKAttention``."""
    acc = 8 if s.itemsize == 8 else 4
    tq, tk = min(q_tile, s.seq_len), min(kv_tile, s.seq_len)
    m = (s.heads // s.kv_heads) * tq  # stacked query rows per KV head
    big = s.batch * s.kv_heads * m * kk * s.head_dim * acc  # gathered K or V rows of one tile
    score = s.batch * s.kv_heads * m * tk * acc  # one score tile
    return big, score, m, tk, math.ceil(s.seq_len / tk)


def _merge_bytes(rows: int, tk: int, kk: int, acc: int) -> int:
    """What one merge (``_merge_max`` / ``_merge_topk``) holds beside its score tile, at its
    widest (a trace's case: kk candidate blocks per row), for ``rows`` stacked query rows."""
    if kk == 1:
        pair = rows * 2 * (acc + 8)  # the tile's max and its index, and the merged pair
        seg = tk // BLOCK
        if seg < BLOCK or tk % BLOCK:
            return pair
        return pair + rows * (BLOCK + seg) * acc  # ``_first_max``: segment maxima, the segment searched
    nb = tk // BLOCK
    if nb <= kk:
        width = min(kk, tk)
        # The tile's top, both tops, the merged top and its gathered indices.
        return rows * ((width + (kk + width) + kk) * (acc + 8) + kk * 8)
    rest = tk - nb * BLOCK
    pool = kk + BLOCK * kk + rest  # the running best, the candidate blocks' scores, the remainder
    # Block maxima, the "above t" bools, the counts, the chosen blocks, their scores, the pool
    # ranked by one topk and its result.
    return rows * (nb * acc + nb + 8 + kk * 8 + BLOCK * kk * acc + pool * acc + kk * (acc + 8))


def topk_footprint(s: Shape, q_tile: int, kv_tile: int, topk: int, noise: bool = False) -> Footprint:
    """Selective attention (``selective._TopKAttention``), k = min(topk, N) keys per query,
    M = G·Tq stacked rows per query tile, Tk = min(kv_tile, N), a = accumulation itemsize:
    BIG = B·Hkv·M·k·D·a (the gathered keys or values of one tile), S = B·Hkv·M·Tk·a (one score
    tile).

    saved = O + the chosen indices (B·Hq·N·k int64) + their probabilities (B·Hq·N·k·a);
    forward: O + indices + probabilities + the previous tile's gathered V (BIG) + the largest of
    one score tile (``noise``: with the Gumbel noise of ``hard``'s sampling, one more), one score
    tile with its merge's working set (``_merge_bytes``: block maxima, candidate blocks, the
    pool one topk ranks), one score tile with the evaluation of a causal key tile's mask (int64
    relative positions and bools, 11 bytes per pair, and the M·Tk stacked bools), and the
    tile's own gathered V (BIG) with its output;
    backward: the forward's saved + the zero gradient autograd makes for the index output
    (B·Hq·N·k int64) + dQ + dK + dV (in a) + 3·BIG (the gathered K and V of a
    tile and one per-key gradient being scattered into dK or dV) + the tile's dQ and a few
    M·k buffers. Linear in N (O(N·k)), never N²."""
    acc = 8 if s.itemsize == 8 else 4
    kk = max(min(topk, s.seq_len), 1)
    big, score, m, tk, nkt = _topk_terms(s, q_tile, kv_tile, kk)
    rows = s.batch * s.heads * s.seq_len
    sel = rows * kk * (8 + acc)  # indices and probabilities
    saved = s.q_bytes + sel
    small = s.batch * s.kv_heads * m * kk * (8 + acc)  # one tile's running best scores and indices
    tile_o = s.batch * s.kv_heads * m * s.head_dim * acc
    mask = 0
    if s.causal:
        tq = min(q_tile, s.seq_len)
        mask = tq * tk * 11 + m * tk  # the evaluation (int64 positions and bools), the stacked bools
    # The previous tile's gathered V lives on only when there is a previous tile.
    prev_v = big if s.seq_len > q_tile else 0
    # A tile's scores live only inside its merge: at a score matmul no other score tile is alive.
    # The Gumbel noise of ``hard``'s sampling is one more tile while it is added.
    scores = score * (2 if noise else 1)
    # Half inputs: the gathered rows are copied in the input dtype, then cast to float32.
    gather = big * s.itemsize // acc if s.half else 0
    # Half inputs: the float32 copies of the query tile and of the key tile being scored.
    q_cast = s.batch * s.kv_heads * m * s.head_dim * acc if s.half else 0
    k_cast = s.batch * s.kv_heads * tk * s.head_dim * acc if s.half else 0
    merge = score + _merge_bytes(s.batch * s.kv_heads * m, tk, kk, acc)
    fwd = saved + prev_v + 2 * small + max(scores + q_cast + k_cast, merge + q_cast, score + mask + q_cast,
                                           big + tile_o + gather)
    if not s.training:
        return Footprint(0, fwd)
    grads = s.q_bytes + 2 * s.kv_bytes * acc // s.itemsize
    stack = 0 if s.heads == s.kv_heads else small + tile_o  # stacked index/probability and q tiles
    # Autograd materialises a zero gradient for the int64 index output (materialize_grads).
    bwd = saved + rows * kk * 8 + grads + 3 * big + gather + tile_o + 3 * s.batch * s.kv_heads * m * kk * acc + stack
    return Footprint(saved, max(fwd, bwd) - saved)
