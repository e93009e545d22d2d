"""Sparse and local attention: exact softmax attention under a structured mask, in O(N·w).

Every method here turns its options into an ``attnmem.masks`` mask, ANDs it with the call's
own mask (causal and the user's), and runs the tiled kernel of ``chunked`` over the block map
of the result: key tiles outside the pattern are never touched, in either pass, so time and
memory follow the number of allowed pairs (N·w) instead of N². ``reference`` with the same
dense mask is the oracle.

Equivalent PyTorch code (O(N²), what the tests compare against)::

    allowed = pattern.to_dense(Nq, Nk)                      # (1, 1 or H, Nq, Nk) bool
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -inf)
    out = softmax(scores, -1).nan_to_num(0) @ v             # rows with no key give zeros

On CUDA, when ``torch.nn.attention.flex_attention`` imports, the same ``mask_mod`` and block
map go to FlexAttention instead (``attnmem.kernels.flex``); the tiled path stays the CPU path
and the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import masks as M
from ..checks import check_positive_int
from ..kernels import (
    CAUSAL_TILE,
    KERNELS,
    MIN_Q_TILE,
    Run,
    TileContext,
    flex_attention,
    flex_available,
    flex_safe,
    fused_backward,
    fused_forward,
    make_mods,
    merge_partials,
    plan_call,
    resolve_kernel,
    run_exact,
    tiled_attention,
    tiled_backward,
    tiled_forward,
)
from ..memory.model import Footprint, Shape
from ..registry import Capabilities, Inputs, Method, Style, register
from .exact import fused_reasons, mods_kwargs
from .sparse_memory import mods_domain_reasons, sparse_footprint, tile_plan, with_sinks


def _check_window(window: object) -> tuple[int, int]:
    sides = window if isinstance(window, (tuple, list)) else (window, window)
    if len(sides) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in sides):
        unbounded = isinstance(sides, (tuple, list)) and None in sides
        hint = ("; a side without bound (None) is not a window: (None, 0) is causal attention, "
                "pass causal=True (or window=(N, 0))") if unbounded else ""
        raise ValueError(f"window must be a non-negative int or a (left, right) pair of them, got {window!r}{hint}")
    return int(sides[0]), int(sides[1])


@dataclass(frozen=True)
class TileOptions:
    """Tile sizes of the block map and the tile kernel, as in ``chunked``. 128 by default:
    a window of 256 each side then computes 640 keys per query instead of 768 with 256-tiles."""

    q_tile: int = 128
    kv_tile: int = 128
    kernel: str = "auto"

    def __post_init__(self):
        check_positive_int("q_tile", self.q_tile)
        check_positive_int("kv_tile", self.kv_tile)
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


@dataclass(frozen=True)
class SlidingWindowOptions(TileOptions):
    """window: keys each side (int) or ``(left, right)`` as FlashAttention's ``window_size``;
    ``(w, 0)`` is causal local attention. Default 256."""

    window: int | tuple[int, int] = 256

    def __post_init__(self):
        super().__post_init__()
        _check_window(self.window)


@dataclass(frozen=True)
class DilatedOptions(SlidingWindowOptions):
    """window: keys each side (or ``(left, right)``), ``dilation`` positions apart; dilation is
    a positive int or a tuple with one per query head. Defaults: window 256, dilation 2."""

    dilation: int | tuple[int, ...] = 2

    def __post_init__(self):
        super().__post_init__()
        dils = self.dilation if isinstance(self.dilation, (tuple, list)) else (self.dilation,)
        if not dils:
            raise ValueError("dilation must be a positive int or one per head, got ()")
        for d in dils:
            check_positive_int("dilation", d)


@dataclass(frozen=True)
class LongformerOptions(SlidingWindowOptions):
    """window as ``sliding_window``; global_tokens: positions that attend to and are attended
    by every token (default ``(0,)``, a CLS token)."""

    global_tokens: tuple[int, ...] = (0,)

    def __post_init__(self):
        super().__post_init__()
        M.global_tokens(self.global_tokens)  # raises on bad positions


@dataclass(frozen=True)
class BigBirdOptions(TileOptions):
    """block: positions per block (64); window_blocks: odd number of blocks around the
    diagonal (3); global_blocks: first ⌈g/2⌉ and last ⌊g/2⌋ blocks (2); random_blocks: per
    query block (3), drawn from ``seed``. Tiles must be multiples of ``block``; None (the
    default) means ``block``, which makes every computed tile full: no mask is evaluated."""

    q_tile: int | None = None
    kv_tile: int | None = None
    block: int = 64
    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self):
        M.bigbird(self.block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed)
        for name in ("q_tile", "kv_tile"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.block)
        super().__post_init__()
        for name in ("q_tile", "kv_tile"):
            if getattr(self, name) % self.block:
                raise ValueError(
                    f"{name} must be a multiple of block={self.block} (tiles align with blocks), "
                    f"got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class StridedOptions(TileOptions):
    """pattern: "strided" (the ``stride`` nearest keys and every stride-th key) or "fixed"
    (own block of ``stride`` keys and the last ``summary`` keys of every block). stride 128,
    summary 8. Add ``causal=True`` for the Sparse Transformer's autoregressive form."""

    pattern: str = "strided"
    stride: int = 128
    summary: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.pattern not in ("strided", "fixed"):
            raise ValueError(f"pattern must be 'strided' or 'fixed', got {self.pattern!r}")
        check_positive_int("stride", self.stride)
        if self.pattern == "fixed":
            M.fixed(self.stride, self.summary)


class _Sparse(Method):
    """Shared forward: the pattern AND the call's mask, over the tiled kernel or FlexAttention."""

    family = "sparse"
    exact = True
    caps = Capabilities(score_mod=True, sinks=True, dropout=True, return_lse=True)

    def pattern(self, opts) -> M.Mask:
        raise NotImplementedError

    def extra_reasons(self, inp, opts):
        try:
            self.pattern(opts).check(inp.batch, inp.q_heads, inp.nq, inp.nk)
        except ValueError as e:
            return [str(e)]
        return fused_reasons(inp, opts)

    def effective_mask(self, inp: Inputs, opts) -> M.Mask:
        return self.pattern(opts) if inp.mask is None else inp.mask & self.pattern(opts)

    def split(self, opts, nq: int) -> tuple[M.Mask, Tensor | None]:
        """(pattern without its global query rows, those rows); patterns with no global
        queries return (pattern, None)."""
        return self.pattern(opts), None

    def split_band(self, opts, s: Shape) -> M.Mask | None:
        """The band the tiled pass covers when the pattern runs split (strided), else None."""
        return None

    models_mods = True

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        # Both tile kernels are modelled (the fused one, and the plain-PyTorch one that
        # kernel="torch" and float16 run): ``sparse_footprint`` asks ``kernels.plan_call`` which.
        if s.masked:
            return ["a user mask besides the pattern is not modelled (traced)"]
        local, rows = self.split(opts, s.seq_len)
        if s.mods is not None and rows is not None and rows.numel():
            return ["a score_mod or dropout on the global rows' own pass is not modelled (traced)"]
        mods = mods_domain_reasons(s, tile_plan(s, opts, M.causal() & local if s.causal else local).kernel)
        if mods:
            return mods
        band = self._band(s, opts)
        if band is not None:
            return [f"sliding_window({band}, 0) without causal=True runs one fused call per query segment "
                    f"(kernels.banded), not modelled (traced)"]
        return []

    def _band(self, s: Shape, opts) -> int | None:
        """``left`` when the kernel runs this call as a causal band (``kernels.plan_call``), else None."""
        local, rows = self.split(opts, s.seq_len)
        if rows is not None and rows.numel():
            return None
        mask = M.causal() & local if s.causal else local
        return plan_call(opts.kernel, device="cpu", dtype=getattr(torch, s.dtype), mask=mask, batch=s.batch,
                         nq=s.seq_len, nk=s.seq_len, q_heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                         mods=s.mods).band

    def memory_model(self, s: Shape, opts) -> Footprint:
        local, rows = self.split(opts, s.seq_len)
        return with_sinks(s, lambda s: sparse_footprint(s, opts, local, rows, self.split_band(opts, s)))

    def forward(self, inp: Inputs, opts) -> Tensor:
        plain = inp.sinks is None and not inp.dropout_p and not inp.return_lse
        if inp.q.is_cuda and flex_available() and plain:  # pragma: no cover - needs CUDA
            mask = self.pattern(opts) if inp.mask is None else inp.mask & self.pattern(opts)
            if flex_safe(mask):
                return flex_attention(inp.q, inp.k, inp.v, mask=mask, scale=inp.scale, score_mod=inp.score_mod)
        local, rows = self.split(opts, inp.nq)
        mask = local if inp.mask is None else inp.mask & local
        if rows is None or not rows.numel():
            return tiled_attention(inp.q, inp.k, inp.v, mask=mask, scale=inp.scale,
                                   q_tile=opts.q_tile, kv_tile=opts.kv_tile, kernel=opts.kernel,
                                   **mods_kwargs(inp))
        # Global query rows see every key. The local pattern runs over all rows, and the keys
        # it leaves out of the global rows run apart and merge in by log-sum-exp; so the block
        # map of the local pass stays O(N·w/tile²) instead of listing every key tile for each
        # tile holding a global query, and no extra (B, H, N, D) tensor is made.
        rows = rows.to(inp.q.device)
        q_tile = max(opts.q_tile, MIN_Q_TILE)
        mods = make_mods(inp.score_mod, inp.dropout_p, inp.dropout_seed, inp.q)
        c_local = TileContext(inp.q, inp.k, mask, inp.scale, q_tile, opts.kv_tile, opts.kernel, mods)
        rest = _rows_outside(local, inp.mask, rows, inp.nq, inp.nk)
        q_rows = inp.q[:, :, :rows.numel()]  # only the shape matters to the context
        c_rest = TileContext(q_rows, inp.k, rest, inp.scale, q_tile, opts.kv_tile, opts.kernel, mods, q_pos=rows)
        return run_exact(_WithGlobalRows(c_local, c_rest, rows), inp.q, inp.k, inp.v, sinks=inp.sinks,
                         mods=mods, return_lse=inp.return_lse)


@register
class SlidingWindowAttention(_Sparse):
    name = "sliding_window"
    check_options = {"window": (6, 2), "q_tile": 16, "kv_tile": 16}
    style = Style("#ff7f0e", "d")
    decode_cache = "sliding_window"
    memory = "O(B·H·N·D); O(N·w) scores, a tile at a time (w = left + right + 1)"
    summary = "local attention: each query sees `window` keys each side (FlashAttention window_size)"
    Options = SlidingWindowOptions

    def pattern(self, opts):
        return M.sliding_window(*_check_window(opts.window))


@register
class DilatedAttention(_Sparse):
    name = "dilated"
    check_options = {"window": 4, "dilation": 2, "q_tile": 16, "kv_tile": 16}
    style = Style("#ffbb78", "8")
    memory = "O(B·H·N·D); O(N·w·d) scores, a tile at a time (w keys spread over w·d)"
    summary = "Longformer's dilated window: `window` keys each side, `dilation` apart (per head optional)"
    Options = DilatedOptions

    def pattern(self, opts):
        dil = tuple(opts.dilation) if isinstance(opts.dilation, (tuple, list)) else opts.dilation
        return M.dilated(_check_window(opts.window), dil)


@register
class LongformerAttention(_Sparse):
    name = "longformer"
    check_options = {"window": 3, "global_tokens": (0, 20), "q_tile": 16, "kv_tile": 16}
    style = Style("#bcbd22", "x")
    memory = "O(B·H·N·D); O(N·(w + g)) scores, a tile at a time (g global tokens)"
    summary = "sliding window plus global tokens that see, and are seen by, every token"
    Options = LongformerOptions

    def pattern(self, opts):
        return M.longformer(_check_window(opts.window), list(opts.global_tokens))

    def split(self, opts, nq):
        left, right = _check_window(opts.window)
        local = M.sliding_window(left, right) | M.global_tokens(list(opts.global_tokens), queries=False)
        rows = M.global_tokens(list(opts.global_tokens)).positions
        return local, rows[rows < nq]


def _rows_outside(local: M.Mask, call_mask: M.Mask | None, rows: Tensor, nq: int, nk: int) -> M.Mask:
    """For query positions ``rows`` (renumbered 0..g-1): the keys the call's mask allows and
    ``local`` does not. Its block map evaluates g rows against all keys: O(g·N)."""
    local_fn = local.mask_fn(nq, nk)
    call_fn = call_mask.mask_fn(nq, nk) if call_mask is not None else None
    rows = rows.cpu()

    def mask_mod(b, h, q_idx, kv_idx):
        pos = rows.to(q_idx.device)[q_idx]
        allowed = ~local_fn(b, h, pos, kv_idx)
        return allowed if call_fn is None else allowed & call_fn(b, h, pos, kv_idx)

    return M.from_mod(mask_mod, name="global rows outside the local pattern")


class _WithGlobalRows(Run):
    """Local pattern over every row, plus the remaining keys of the global rows, merged.

    Both passes save nothing but the merged output and log-sum-exp: with the final lse each
    pass's backward recomputes the true probabilities of its own keys, so the two backwards
    add up to the gradient of the whole pattern (in the accumulation dtype, cast once).
    """

    def __init__(self, c_local: TileContext, c_rest: TileContext, rows: Tensor):
        self.c_local, self.c_rest, self.rows = c_local, c_rest, rows

    def forward(self, q, k, v):
        rows = self.rows
        out, lse = tiled_forward(self.c_local, q, k, v)  # (B, Hq, Nq, D), (B, Hq, Nq)
        out_r, lse_r = tiled_forward(self.c_rest, q.index_select(2, rows), k, v)  # (B, Hq, g, D), (B, Hq, g)
        o, lse_g = merge_partials(out.index_select(2, rows).to(lse.dtype), lse.index_select(2, rows), out_r, lse_r)
        out.index_copy_(2, rows, o.to(out.dtype))
        lse.index_copy_(2, rows, lse_g)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, delta):
        rows = self.rows
        pick = lambda t: None if t is None else t.index_select(2, rows)  # noqa: E731
        dq, dk, dv, *dc = tiled_backward(self.c_local, dout, q, k, v, out, lse, delta=delta, cast=False)
        dq_r, dk_r, dv_r, *dc_r = tiled_backward(self.c_rest, pick(dout), pick(q), k, v, pick(out), pick(lse),
                                                 delta=pick(delta), cast=False)
        dq.index_add_(2, rows, dq_r)
        dk.add_(dk_r)
        dv.add_(dv_r)
        captured = [a if b is None else (b if a is None else a + b)
                    for a, b in zip(dc[0], dc_r[0])] if dc else []
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), captured


@register
class BigBirdAttention(_Sparse):
    name = "bigbird"
    check_options = {"block": 4, "window_blocks": 3, "global_blocks": 2, "random_blocks": 2}
    style = Style("#dbdb8d", "1")
    memory = "O(B·H·N·D); O(N·b·(w + g + r)) scores over blocks of b, a tile at a time"
    summary = "BigBird: block window + global blocks + seeded random blocks"
    Options = BigBirdOptions

    def pattern(self, opts, global_queries: bool = True):
        return M.bigbird(opts.block, opts.window_blocks, opts.global_blocks, opts.random_blocks, opts.seed,
                         global_queries=global_queries)

    def split(self, opts, nq):
        local = self.pattern(opts, global_queries=False)
        return local, local.global_query_rows(nq)


class _StridedSplit(torch.autograd.Function):
    """The strided pattern as two disjoint passes merged by log-sum-exp.

    With ``rel = j - i`` (Nq == Nk, or no causal), the pattern is ``0 < |rel| < s`` (the band
    without its centre: tiled, O(N·s)) plus ``rel ≡ 0 (mod s)``. The second part falls apart into
    ``s`` residue classes: queries and keys at positions ``r, r + s, r + 2s, …`` (queries shifted
    by the offset) see each other all, or causally (top-left in class order when Nq == Nk). Each
    class is one dense call of the fused kernel on (N/s)-row views, so the strided factor costs
    its N²/s allowed pairs instead of every key tile. Like ``_WithGlobalRows``, both passes save
    only the merged output and lse, and each pass's backward recomputes its own probabilities.
    """

    @staticmethod
    def forward(ctx, q, k, v, c_band: TileContext, stride: int, causal: bool, scale: float):
        out, lse = tiled_forward(c_band, q, k, v)  # (B, Hq, Nq, D), (B, Hq, Nq)
        for qs, ks, lq in _classes(q, k, stride):
            q_c = _stack(q[:, :, qs], k.shape[1])  # (B, Hkv, G·Lq, D)
            o_c, l_c = fused_forward(q_c, k[:, :, ks], v[:, :, ks], CAUSAL_TILE if causal else None, scale)
            o_c, l_c = o_c.reshape(*q.shape[:2], lq, -1), l_c.reshape(*q.shape[:2], lq).to(lse.dtype)
            o, lse_c = merge_partials(out[:, :, qs].to(lse.dtype), lse[:, :, qs], o_c, l_c)
            out[:, :, qs] = o.to(out.dtype)
            lse[:, :, qs] = lse_c
        ctx.c = (c_band, stride, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        c_band, stride, causal, scale = ctx.c
        dq, dk, dv = tiled_backward(c_band, dout, q, k, v, out, lse)
        # A row with nothing allowed has lse -inf; +inf makes its recomputed P exactly 0.
        lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, torch.inf), lse).to(q.dtype)
        hkv = k.shape[1]
        for qs, ks, lq in _classes(q, k, stride):
            dq_c, dk_c, dv_c = fused_backward(_stack(dout[:, :, qs], hkv), _stack(q[:, :, qs], hkv), k[:, :, ks],
                                          v[:, :, ks], _stack(out[:, :, qs], hkv), _stack(lse_b[:, :, qs], hkv),
                                          CAUSAL_TILE if causal else None, scale)
            dq[:, :, qs] += dq_c.reshape(*q.shape[:2], lq, -1)
            dk[:, :, ks] += dk_c
            dv[:, :, ks] += dv_c
        return dq, dk, dv, None, None, None, None


def _classes(q: Tensor, k: Tensor, stride: int):
    """(query slice, key slice, query count) per residue class r: keys j ≡ r, queries with
    i + Nk − Nq ≡ r (mod stride); classes with no query or no key are left out."""
    nq, nk = q.shape[2], k.shape[2]
    off = nk - nq
    for r in range(min(stride, nk)):
        qa = (r - off) % stride
        if qa < nq:
            yield slice(qa, None, stride), slice(r, None, stride), len(range(qa, nq, stride))


def _stack(x: Tensor, hkv: int) -> Tensor:
    """(B, Hq, L, ...) -> (B, Hkv, G·L, ...), the query layout of the tile kernels (a copy)."""
    return x.reshape(x.shape[0], hkv, -1, *x.shape[3:])


@register
class StridedAttention(_Sparse):
    name = "strided"
    check_options = {"stride": 5, "q_tile": 16, "kv_tile": 16}
    style = Style("#9edae5", "2")
    memory = "O(B·H·N·D); O(N·(s + N/s)) allowed pairs (fused CPU kernel: per residue class)"
    summary = "Sparse Transformer patterns: 'strided' (local + every s-th key) or 'fixed' (block + summaries)"
    Options = StridedOptions

    def pattern(self, opts):
        if opts.pattern == "fixed":
            return M.fixed(opts.stride, opts.summary)
        return M.strided(opts.stride)

    def splits(self, opts, *, device, dtype: torch.dtype, call_mask: M.Mask | None, nq: int, nk: int,
               q_heads: int, kv_heads: int) -> bool:
        """Whether the call runs as band + residue classes (``_StridedSplit``): pattern
        "strided", the fused CPU kernel in float32/float64 (its gradients are added in place), no
        user mask, and for causal a square problem without GQA (the kernel's is_causal is
        top-left aligned over unstacked rows). The forward and the memory model both ask this."""
        causal = _plain_causal(call_mask)
        return (opts.pattern == "strided" and resolve_kernel(opts.kernel, device, dtype) == "fused"
                and dtype in (torch.float32, torch.float64)
                and (call_mask is None or (causal and nq == nk and q_heads == kv_heads)))

    def forward(self, inp: Inputs, opts) -> Tensor:
        # The residue-class split (``splits``) runs no score modification: those calls tile
        # the whole pattern.
        plain = inp.score_mod is None and inp.sinks is None and not inp.dropout_p and not inp.return_lse
        if not plain or not self.splits(opts, device=inp.q.device, dtype=inp.q.dtype, call_mask=inp.mask,
                                        nq=inp.nq, nk=inp.nk, q_heads=inp.q_heads, kv_heads=inp.kv_heads):
            return super().forward(inp, opts)
        causal = _plain_causal(inp.mask)
        band = strided_band(opts.stride, causal)
        c_band = TileContext(inp.q, inp.k, band, inp.scale, max(opts.q_tile, MIN_Q_TILE), opts.kv_tile, opts.kernel)
        return _StridedSplit.apply(inp.q, inp.k, inp.v, c_band, opts.stride, causal, inp.scale)

    def split_band(self, opts, s: Shape) -> M.Mask | None:
        if s.mods is not None or s.sinks:
            return None  # as ``forward``: score modifications tile the whole pattern
        call_mask = _USER_MASK if s.masked else (M.causal() if s.causal else None)
        if self.splits(opts, device="cpu", dtype=getattr(torch, s.dtype), call_mask=call_mask, nq=s.seq_len,
                       nk=s.seq_len, q_heads=s.heads, kv_heads=s.kv_heads):
            return strided_band(opts.stride, s.causal)
        return None


# Stands for any user mask in the split decision (which asks only whether a mask is causal).
_USER_MASK = M.from_mod(lambda b, h, q_idx, kv_idx: q_idx >= 0, name="a user mask")


def _plain_causal(mask: M.Mask | None) -> bool:
    return isinstance(mask, M.SlidingWindow) and mask.left is None and mask.right == 0


def strided_band(stride: int, causal: bool) -> M.Mask:
    """The band ``StridedAttention`` tiles when split: ``0 < |rel| < stride`` (causal: its left side)."""
    left = M.Band(-(stride - 1), -1)
    return left if causal else M.Or(left, M.Band(1, stride - 1))
