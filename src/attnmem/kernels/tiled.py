"""Exact attention in O(N) memory: the FlashAttention algorithm scheduled over block maps.

For each query tile, the key tiles the block map lists are grouped into *segments*: runs of
consecutive full tiles (no mask evaluated) and runs of partial tiles (the mask is evaluated on
that tile only). Each segment yields a partial output and its log-sum-exp; segments merge by
the online-softmax rule::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Only the output and the per-row log-sum-exp (B, H, N) are kept for the backward, which
recomputes each segment's probabilities from them: ``P = exp(S - lse)``, ``D = rowsum(dO ∘ O)``,
``dS = P ∘ (dP - D)``. Empty tiles are never touched, in either pass.

Two tile kernels (``tile.py``) compute a segment: ``fused`` calls PyTorch's own CPU flash-attention operator
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which accept an
external log-sum-exp), and ``torch`` is plain matmul/exp code that runs on any device and dtype.
Both are tested against the float64 reference.

GQA/MQA never copies K/V to Hq heads: the G query heads that share one KV head are stacked
along the sequence axis, ``(B, Hq, Tq, D) -> (B, Hkv, G·Tq, D)``, so one KV head serves them all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masks import And, KeyPadding, Mask, SlidingWindow, eval_mask
from .merge import merge_partials
from .segments import MAX_GATHER, MAX_SEGMENT, MIN_Q_TILE, Segment, block_rows, plan_segments
from .tile import CAUSAL_TILE, TILE_KERNELS, acc_dtype, resolve_kernel

# --- the autograd function ------------------------------------------------------------------


class TileContext:
    """Everything about one tiled call that both passes need, computed once: the resolved
    kernel, the segment plans of the forward and the backward, and the bound ``mask_mod``."""

    def __init__(self, q, k, mask, scale, q_tile, kv_tile, kernel):
        self.B, self.Hq, self.nq, self.D = q.shape
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.scale = scale
        self.kernel = resolve_kernel(kernel, q)
        self.mask = mask
        fused = self.kernel == "fused"
        # Plain causal attention: partial tiles are square diagonal tiles (when aligned), which
        # the kernel's own is_causal handles. Stacked GQA rows would break its alignment.
        self.pure_causal = (isinstance(mask, SlidingWindow) and mask.left is None and mask.right == 0
                            and self.G == 1)
        # Without a mask, or with a plain causal mask on a square problem (where the kernel's
        # top-left alignment is also ours), the fused operator skips empty blocks and tiles
        # internally in O(N) memory: one call over everything is fastest (every extra call
        # pays the intra-op threads' synchronisation), and its outputs need no copying.
        self.causal_call = self.pure_causal and fused and self.nq == self.nk
        # Causal GQA, or causal & key padding, on a square problem: one fused call per KV head,
        # its G query heads against the KV head expanded to G heads (a stride-0 view, no copy),
        # with the padding as a (B, 1, 1, Nk) additive bias (also a view when expanded), so the
        # kernel's own is_causal applies and no tile loop runs. The backward's expanded dK/dV
        # are transient, G heads at a time.
        causal, padding = _causal_and_padding(mask)
        self.key_valid = padding.valid if padding is not None else None
        self.grouped_causal = (causal and fused and self.nq == self.nk
                               and (self.G > 1 or self.key_valid is not None))
        self.single_call = (mask is None or self.causal_call or self.grouped_causal) and fused
        if self.single_call:
            q_tile, kv_tile = max(q_tile, self.nq, 1), max(kv_tile, self.nk, 1)
        # The forward keeps only (Tq × D) per segment, so it merges freely; the backward's
        # per-segment dK/dV are transient, so its segments are capped.
        rows = block_rows(mask, self.nq, self.nk, q_tile, kv_tile, self.B, self.Hq)
        self.plan = plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=fused, gather=MAX_GATHER)
        self.plan_bwd = (plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=True, max_segment=MAX_SEGMENT)
                         if fused else self.plan)
        self.mask_mod = mask.mask_fn(self.nq, self.nk) if mask is not None else None
        self.device = q.device

    def q_view(self, x: Tensor, qa: int, qb: int) -> Tensor:
        """(B, Hq, Nq, ...) -> this tile as (B, Hkv, G·Tq, ...)."""
        t = x[:, :, qa:qb]
        return t.reshape(self.B, self.Hkv, self.G * (qb - qa), *x.shape[3:])

    def q_store(self, dst: Tensor, qa: int, qb: int, tile: Tensor) -> None:
        dst[:, :, qa:qb] = tile.reshape(self.B, self.Hq, qb - qa, *dst.shape[3:])

    def allowed(self, qa: int, qb: int, seg: Segment) -> Tensor | None:
        """The mask of one segment as (Bm, Hkv or 1, G·Tq, Tk) bools; None when unmasked."""
        if not seg.masked:
            return None
        if self.pure_causal and seg.contiguous:
            start, stop = seg.ranges[0]
            if qa + self.nk - self.nq == start and qb - qa == stop - start:
                return CAUSAL_TILE
        dev = self.device
        b = torch.arange(self.B, device=dev)[:, None, None, None]
        h = torch.arange(self.Hq, device=dev)[None, :, None, None]
        qi = torch.arange(qa, qb, device=dev)[:, None]
        ki = seg.positions(dev)[None, :]
        m = eval_mask(self.mask_mod, b, h, qi, ki)
        m = m.expand(*m.shape[:2], qb - qa, seg.size)  # (Bm, Hm, Tq, Tk)
        if m.shape[1] == 1:
            return m.repeat(1, 1, self.G, 1) if self.G > 1 else m  # (Bm, 1, G·Tq, Tk)
        m = m.expand(m.shape[0], self.Hq, *m.shape[2:])
        return m.reshape(m.shape[0], self.Hkv, self.G * (qb - qa), m.shape[-1])


def allowed_bool(c: TileContext, qa: int, qb: int, seg: Segment) -> Tensor | None:
    """``c.allowed`` as a bool tensor (or None), for code with its own tile kernel."""
    a = c.allowed(qa, qb, seg)
    if a is CAUSAL_TILE:
        return torch.ones(qb - qa, seg.size, dtype=torch.bool, device=c.device).tril()
    return a


def _causal_and_padding(mask: Mask | None) -> tuple[bool, KeyPadding | None]:
    """(plain causal?, its key padding) for ``causal()`` and ``causal() & key_padding(valid)``."""
    def plain_causal(m):
        return isinstance(m, SlidingWindow) and m.left is None and m.right == 0

    if plain_causal(mask):
        return True, None
    if isinstance(mask, And):
        for a, b in ((mask.a, mask.b), (mask.b, mask.a)):
            if plain_causal(a) and isinstance(b, KeyPadding):
                return True, b
    return False, None


def _bnhd_zeros(q: Tensor, c: TileContext) -> Tensor:
    """Zeros of shape (B, Hq, Nq, D) laid out as (B, Nq, Hq, D) in memory, as SDPA's own output:
    a caller's ``out.transpose(1, 2)`` to (B, Nq, Hq·D) (every transformer's output projection)
    is then a view, not a copy saved beside the output that the backward keeps."""
    return q.new_zeros(c.B, c.nq, c.Hq, c.D).transpose(1, 2)  # (B, Hq, Nq, D), strides of (B, Nq, Hq, D)


def _is_bnhd(t: Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def _head_groups(c: TileContext, k: Tensor, v: Tensor):
    """(query heads, keys, values) per call: all heads at once without GQA, else each KV head
    expanded (a stride-0 view) to its G query heads, (B, G, N, D)."""
    if c.G == 1:
        yield slice(None), k, v
        return
    for j in range(c.Hkv):
        expand = (-1, c.G, -1, -1)
        yield slice(j * c.G, (j + 1) * c.G), k[:, j:j + 1].expand(*expand), v[:, j:j + 1].expand(*expand)


def _key_bias(c: TileContext, q: Tensor, heads: int):
    """The key padding as an additive (B, heads, Nq, Nk) bias, a view of (B, 1, 1, Nk); or CAUSAL_TILE."""
    if c.key_valid is None:
        return CAUSAL_TILE
    valid = c.key_valid.to(q.device)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, -math.inf)  # (Bm, Nk)
    return bias[:, None, None, :].expand(c.B, heads, c.nq, c.nk)


def _grouped_causal_forward(c: TileContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = _bnhd_zeros(q, c)  # (B, Hq, N, D)
    lse = torch.empty(c.B, c.Hq, c.nq, dtype=acc_dtype(q.dtype), device=q.device)  # (B, Hq, N)
    for heads, k_g, v_g in _head_groups(c, k, v):
        allowed = _key_bias(c, q, k_g.shape[1])
        o_g, l_g = _causal_call(q[:, heads], k_g, v_g, allowed, c.scale, backward=False)
        out[:, heads] = o_g
        lse[:, heads] = l_g
    if c.key_valid is not None:
        # A query before a row's first real key sees nothing: lse -inf (the kernel reports 0).
        seen = c.key_valid.to(q.device).cumsum(-1) > 0  # (Bm, N): some real key at or before
        lse.masked_fill_(~seen[:, None, :], -math.inf)
    return out, lse


def _grouped_causal_backward(c: TileContext, dout, q, k, v, out, lse_b):
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for j, (heads, k_g, v_g) in enumerate(_head_groups(c, k, v)):
        allowed = _key_bias(c, q, k_g.shape[1])
        dq_g, dk_g, dv_g = _causal_call(q[:, heads], k_g, v_g, allowed, c.scale, backward=True,
                                        dout=dout[:, heads], out=out[:, heads], lse=lse_b[:, heads])
        dq[:, heads] = dq_g
        if c.G == 1:
            dk.copy_(dk_g)
            dv.copy_(dv_g)
        else:
            dk[:, j] = dk_g.sum(1)  # (B, G, N, D) -> (B, N, D): the G heads that read KV head j
            dv[:, j] = dv_g.sum(1)
    return dq, dk, dv


def _causal_call(q, k, v, allowed, scale, *, backward, dout=None, out=None, lse=None):
    """The fused operator with its own ``is_causal`` and, optionally, an additive key bias."""
    if allowed is CAUSAL_TILE:
        fwd, bwd = TILE_KERNELS["fused"]
        return bwd(dout, q, k, v, out, lse, CAUSAL_TILE, scale) if backward else fwd(q, k, v, CAUSAL_TILE, scale)
    if backward:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, attn_mask=allowed, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=allowed,
                                                                      scale=scale)


def tiled_forward(c: TileContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    fwd = TILE_KERNELS[c.kernel][0]
    acc = acc_dtype(q.dtype)
    if c.grouped_causal and c.nq:
        return _grouped_causal_forward(c, q, k, v)
    if c.single_call and c.nq and c.nk:
        whole = CAUSAL_TILE if c.causal_call else None
        o_all, lse = fwd(c.q_view(q, 0, c.nq), k, v, whole, c.scale)  # (B, Hkv, G·Nq, ·)
        out = o_all.reshape(c.B, c.Hq, c.nq, c.D)
        if not _is_bnhd(out):
            out = _bnhd_zeros(q, c)
            out.view(c.B, c.Hkv, c.G, c.nq, c.D).copy_(o_all.view(c.B, c.Hkv, c.G, c.nq, c.D))
        return out, lse.to(acc).reshape(c.B, c.Hq, c.nq)
    out = _bnhd_zeros(q, c)
    lse = torch.full((c.B, c.Hq, c.nq), -math.inf, dtype=acc, device=q.device)  # (B, Hq, Nq)
    for qa, qb, segs in c.plan:
        if not segs:
            continue  # nothing to attend: zeros, lse -inf
        q_t = c.q_view(q, qa, qb)  # (B, Hkv, G·Tq, D)
        o_t = l_t = None
        for seg in segs:
            o_s, l_s = fwd(q_t, seg.take(k), seg.take(v),
                           c.allowed(qa, qb, seg), c.scale)
            l_s = l_s.to(acc)
            if o_t is None:
                o_t, l_t = (o_s, l_s) if len(segs) == 1 else (o_s.to(acc), l_s)
            else:
                o_t, l_t = merge_partials(o_t, l_t, o_s, l_s)
        c.q_store(out, qa, qb, o_t.to(q.dtype))
        c.q_store(lse, qa, qb, l_t)
    return out, lse


def tiled_backward(c: TileContext, dout, q, k, v, out, lse):
    bwd = TILE_KERNELS[c.kernel][1]
    # A row that attends to nothing has lse -inf; +inf makes every recomputed P exactly 0.
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    if c.kernel == "fused":
        lse_b = lse_b.float() if q.dtype == torch.bfloat16 else lse_b.to(q.dtype)
    if c.grouped_causal and c.nq:
        return _grouped_causal_backward(c, dout, q, k, v, out, lse_b)
    if c.single_call and c.nq and c.nk:
        dq, dk, dv = bwd(c.q_view(dout, 0, c.nq), c.q_view(q, 0, c.nq), k, v,
                         c.q_view(out, 0, c.nq), c.q_view(lse_b, 0, c.nq),
                         CAUSAL_TILE if c.causal_call else None, c.scale)
        return dq.reshape(q.shape), dk, dv
    half = q.dtype not in (torch.float32, torch.float64)
    acc = acc_dtype(q.dtype)
    dq = torch.zeros_like(q)
    # Half-precision key/value gradients accumulate over query tiles in float32.
    dk = torch.zeros(k.shape, dtype=acc if half else k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc if half else v.dtype, device=v.device)
    for qa, qb, segs in c.plan_bwd:
        if not segs:
            continue
        q_t, do_t, o_t = c.q_view(q, qa, qb), c.q_view(dout, qa, qb), c.q_view(out, qa, qb)
        l_t = c.q_view(lse_b, qa, qb)
        dq_t = None
        for seg in segs:
            ks, vs = seg.take(k), seg.take(v)
            dq_s, dk_s, dv_s = bwd(do_t, q_t, ks, vs, o_t, l_t, c.allowed(qa, qb, seg), c.scale)
            dq_t = dq_s.to(acc) if dq_t is None else dq_t.add_(dq_s)
            seg.add_into(dk, dk_s)
            seg.add_into(dv, dv_s)
        c.q_store(dq, qa, qb, dq_t.to(q.dtype))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c: TileContext):
        out, lse = tiled_forward(c, q, k, v)
        ctx.c = c
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = tiled_backward(ctx.c, dout, q, k, v, out, lse)
        return dq, dk, dv, None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                    q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto") -> Tensor:
    """Exact softmax attention over the block map of ``mask`` (None = all pairs).

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with ``Hq % Hkv == 0``.
        mask: the effective mask (causal included), or None.
        scale: multiplier of QKᵀ.
        q_tile, kv_tile: tile sizes of the block map.
        kernel: "auto", "fused" (CPU operator) or "torch" (plain PyTorch, any device).

    Returns:
        (B, Hq, Nq, D); rows with nothing to attend are zeros.
    """
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return _TiledAttention.apply(q, k, v, c)


def tiled_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                        q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    """Forward only, also returning the per-row log-sum-exp (B, Hq, Nq); for ring attention
    and other callers that merge partial results themselves."""
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return tiled_forward(c, q, k, v)


def tiled_backward_lse(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       mask: Mask | None, scale: float, q_tile: int = 256, kv_tile: int = 256,
                       kernel: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through one block of keys, given the output and log-sum-exp of the WHOLE row.

    For ring attention and other callers that split the keys: with ``out`` (B, Hq, Nq, D) and
    ``lse`` (B, Hq, Nq) merged over all key blocks, the probabilities this block recomputes are
    the global ones, so ``dq`` is this block's share of the full dq (sum the shares over the
    blocks) and ``dk``/``dv`` (B, Hkv, Nk, D) are this block's full gradients from these queries.
    """
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return tiled_backward(c, dout, q, k, v, out, lse)
