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

from ..masks import Mask, SlidingWindow, eval_mask
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
        self.single_call = (mask is None or self.causal_call) and fused
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


def tiled_forward(c: TileContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    fwd = TILE_KERNELS[c.kernel][0]
    acc = acc_dtype(q.dtype)
    if c.single_call and c.nq and c.nk:
        whole = CAUSAL_TILE if c.causal_call else None
        out, lse = fwd(c.q_view(q, 0, c.nq), k, v, whole, c.scale)  # (B, Hkv, G·Nq, ·)
        return out.reshape(c.B, c.Hq, c.nq, c.D), lse.to(acc).reshape(c.B, c.Hq, c.nq)
    out = q.new_zeros(c.B, c.Hq, c.nq, c.D)  # (B, Hq, Nq, D)
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
