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

Two tile kernels compute a segment: ``fused`` calls PyTorch's own CPU flash-attention operator
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which accept an
external log-sum-exp), and ``torch`` is plain matmul/exp code that runs on any device and dtype.
Both are tested against the float64 reference.

GQA/MQA never copies K/V to Hq heads: the G query heads that share one KV head are stacked
along the sequence axis, ``(B, Hq, Tq, D) -> (B, Hkv, G·Tq, D)``, so one KV head serves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import Mask, SlidingWindow, eval_mask

KERNELS = ("auto", "fused", "torch")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Below this many queries a separate query tile costs more in Python than it saves.
MIN_Q_TILE = 16
# Most keys in one backward call. Each call's dK/dV are transient, so this bounds the
# backward's working memory at 2·B·Hkv·MAX_SEGMENT·D elements.
MAX_SEGMENT = 2048
# Most keys gathered (copied) from scattered tiles into one forward call.
MAX_GATHER = 4096


def _fused_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def resolve_kernel(kernel: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The tile kernel a call runs: the option's own choice, or for "auto" the fused CPU operator
    where it takes the dtype, else plain PyTorch. The one place this is decided: the kernels
    and every memory model (``Method.memory_model``) ask it."""
    if kernel == "auto":
        dev = device.type if isinstance(device, torch.device) else str(device)
        if dev == "cpu" and dtype in _FUSED_DTYPES and _fused_available():
            return "fused"
        return "torch"
    return kernel


@dataclass(frozen=True)
class CallPlan:
    """How ``tiled_attention`` runs one call: its kernel, and whether the whole call is one
    kernel call (``single_call``; ``causal_call`` when that call uses the kernel's is_causal)."""

    kernel: str
    pure_causal: bool  # the mask is plain causal and G = 1: diagonal tiles use is_causal
    causal_call: bool
    single_call: bool


def plan_call(kernel: str, *, device: str | torch.device, dtype: torch.dtype, mask: Mask | None,
              nq: int, nk: int, q_heads: int, kv_heads: int) -> CallPlan:
    """The one decision of how a call is computed, for the kernel and the memory models alike."""
    kernel = resolve_kernel(kernel, device, dtype)
    fused = kernel == "fused"
    # Plain causal attention: partial tiles are square diagonal tiles (when aligned), which
    # the kernel's own is_causal handles. Stacked GQA rows would break its alignment.
    pure_causal = (isinstance(mask, SlidingWindow) and mask.left is None and mask.right == 0
                   and q_heads == kv_heads)
    # Without a mask, or with a plain causal mask on a square problem (where the kernel's
    # top-left alignment is also ours), the fused operator skips empty blocks and tiles
    # internally in O(N) memory: one call over everything is fastest (every extra call
    # pays the intra-op threads' synchronisation), and its outputs need no copying.
    causal_call = pure_causal and fused and nq == nk
    return CallPlan(kernel, pure_causal, causal_call, (mask is None or causal_call) and fused)


@dataclass(frozen=True)
class Segment:
    """Keys of one query tile computed in one kernel call: one or more ``[start, stop)``
    ranges (several ranges are gathered into one buffer); ``masked`` when the mask must be
    evaluated on them."""

    ranges: tuple[tuple[int, int], ...]
    masked: bool

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def contiguous(self) -> bool:
        return len(self.ranges) == 1

    def take(self, x: Tensor) -> Tensor:
        """The keys (or values) of this segment from (B, H, N, D): a view when contiguous."""
        if self.contiguous:
            a, b = self.ranges[0]
            return x[:, :, a:b]
        return torch.cat([x[:, :, a:b] for a, b in self.ranges], dim=2)  # (B, H, size, D)

    def add_into(self, dst: Tensor, grad: Tensor) -> None:
        """Scatter a (B, H, size, D) gradient back into the ranges of ``dst``."""
        offset = 0
        for a, b in self.ranges:
            dst[:, :, a:b] += grad[:, :, offset:offset + b - a]
            offset += b - a

    def positions(self, device: torch.device) -> Tensor:
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.ranges])


def block_rows(mask: Mask | None, nq: int, nk: int, q_tile: int, kv_tile: int,
               batch: int, heads: int) -> list[list[tuple[int, bool]]]:
    """Per query tile, ``(kv_tile, is_full)`` of every non-empty key tile (all when unmasked)."""
    if mask is None:
        return [[(j, True) for j in range(math.ceil(nk / kv_tile))]] * math.ceil(nq / q_tile)
    return mask.block_map(nq, nk, q_tile, kv_tile, batch=batch, heads=heads).rows()


def _pack(ranges: list[tuple[int, int]], masked: bool, max_keys: int | None, split: bool) -> list[Segment]:
    """Group ranges into segments of at most ``max_keys`` keys (one range may exceed it when
    not ``split``: a contiguous range costs no copy)."""
    if split and max_keys:
        pieces = []
        for a, b in ranges:
            pieces += [(x, min(x + max_keys, b)) for x in range(a, b, max_keys)]
        ranges = pieces
    segs: list[Segment] = []
    group: list[tuple[int, int]] = []
    size = 0
    for a, b in ranges:
        if group and max_keys is not None and size + (b - a) > max_keys:
            segs.append(Segment(tuple(group), masked))
            group, size = [], 0
        group.append((a, b))
        size += b - a
    if group:
        segs.append(Segment(tuple(group), masked))
    return segs


def plan_segments(rows: list[list[tuple[int, bool]]], nq: int, nk: int, q_tile: int, kv_tile: int,
                  merge: bool = True, max_segment: int | None = None,
                  gather: int | None = None) -> list[tuple[int, int, list[Segment]]]:
    """Per query tile ``(qa, qb, segments)`` from block rows; never from N×N.

    With ``merge``, tiles of one kind (full or partial) join into few segments for a kernel
    that tiles internally: neighbouring tiles become one range (a view, no copy), and ranges
    are gathered into one buffer of up to ``gather`` keys so that scattered tiles (block-sparse
    masks) cost few kernel calls. ``max_segment`` splits ranges too (the backward, whose
    per-segment dK/dV are transient). Without ``merge`` every segment is one key tile, so the
    kernel's working memory stays O(q_tile · kv_tile).
    """
    plan = []
    for i, row in enumerate(rows):
        qa = i * q_tile
        by_kind: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        segs: list[Segment] = []
        for j, full in row:
            ka, kb = j * kv_tile, min((j + 1) * kv_tile, nk)
            runs = by_kind[full]
            if not merge:
                segs.append(Segment(((ka, kb),), not full))
            elif runs and runs[-1][1] == ka:
                runs[-1] = (runs[-1][0], kb)
            else:
                runs.append((ka, kb))
        if merge:
            limit = max_segment if max_segment is not None else gather
            for full in (True, False):
                segs += _pack(by_kind[full], not full, limit, split=max_segment is not None)
        plan.append((qa, min(qa + q_tile, nq), segs))
    return plan


# --- tile kernels ---------------------------------------------------------------------------
# Shapes inside: q (B, Hkv, M, D) with M = G·Tq, k/v (B, Hkv, Tk, D), allowed (Bm, Hm, M, Tk),
# None (every pair allowed) or CAUSAL_TILE.


class _CausalTile:
    """A square tile on the diagonal of a causal mask: the kernel's own ``is_causal`` applies,
    so no mask tensor is built and the fused kernel skips the tile's upper half itself."""

    def __repr__(self) -> str:
        return "CAUSAL_TILE"


CAUSAL_TILE = _CausalTile()


def _causal_bool(q: Tensor, k: Tensor) -> Tensor:
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()


def _fused_fwd(q, k, v, allowed, scale):
    if allowed is CAUSAL_TILE:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, -math.inf)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    if allowed is not None:
        # The operator reports lse = 0 for a row with no allowed key; make it -inf so the
        # merge gives it no weight.
        lse = lse.masked_fill(~allowed.any(-1).expand(lse.shape), -math.inf)
    return out, lse


def _fused_bwd(dout, q, k, v, out, lse, allowed, scale):
    if allowed is CAUSAL_TILE:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale
        )
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, -math.inf)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_fwd(q, k, v, allowed, scale):
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = s.sub_(row_max).exp_()
    row_sum = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
    lse = (row_max + row_sum.log()).squeeze(-1)  # -inf where nothing was allowed
    return out.to(q.dtype), lse


def _torch_bwd(dout, q, k, v, out, lse, allowed, scale):
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = _acc_dtype(q.dtype)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(qa, ka.transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-1, -2), da)
    dp = torch.matmul(da, va.transpose(-1, -2))
    delta = (da * out.to(acc)).sum(-1, keepdim=True)
    ds = p.mul_(dp.sub_(delta))
    dq = torch.matmul(ds, ka).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_KERNEL_FNS = {"fused": (_fused_fwd, _fused_bwd), "torch": (_torch_fwd, _torch_bwd)}


# --- the autograd function ------------------------------------------------------------------


class _Ctx:
    """Everything about one call that both passes need, computed once."""

    def __init__(self, q, k, mask, scale, q_tile, kv_tile, kernel):
        self.B, self.Hq, self.nq, self.D = q.shape
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.scale = scale
        self.mask = mask
        plan = plan_call(kernel, device=q.device, dtype=q.dtype, mask=mask, nq=self.nq, nk=self.nk,
                         q_heads=self.Hq, kv_heads=self.Hkv)
        self.kernel, self.pure_causal = plan.kernel, plan.pure_causal
        self.causal_call, self.single_call = plan.causal_call, plan.single_call
        fused = self.kernel == "fused"
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


def allowed_bool(c: _Ctx, qa: int, qb: int, seg: Segment) -> Tensor | None:
    """``c.allowed`` as a bool tensor (or None), for code with its own tile kernel."""
    a = c.allowed(qa, qb, seg)
    if a is CAUSAL_TILE:
        return torch.ones(qb - qa, seg.size, dtype=torch.bool, device=c.device).tril()
    return a


def _merge(out_acc, lse_acc, out_s, lse_s):
    lse = torch.logaddexp(lse_acc, lse_s)
    # Rows with nothing allowed so far have lse -inf on both sides: give them weight 0.
    finite = torch.isfinite(lse)
    w_acc = torch.where(finite, torch.exp(lse_acc - lse), torch.zeros_like(lse)).unsqueeze(-1)
    w_s = torch.where(finite, torch.exp(lse_s - lse), torch.zeros_like(lse)).unsqueeze(-1)
    return out_acc * w_acc + out_s.to(out_acc.dtype) * w_s, lse


def tiled_forward(c: _Ctx, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    fwd = _KERNEL_FNS[c.kernel][0]
    acc = _acc_dtype(q.dtype)
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
                o_t, l_t = _merge(o_t, l_t, o_s, l_s)
        c.q_store(out, qa, qb, o_t.to(q.dtype))
        c.q_store(lse, qa, qb, l_t)
    return out, lse


def tiled_backward(c: _Ctx, dout, q, k, v, out, lse):
    bwd = _KERNEL_FNS[c.kernel][1]
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
    acc = _acc_dtype(q.dtype)
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
    def forward(ctx, q, k, v, c: _Ctx):
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
    c = _Ctx(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return _TiledAttention.apply(q, k, v, c)


def tiled_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                        q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    """Forward only, also returning the per-row log-sum-exp (B, Hq, Nq); for ring attention
    and other callers that merge partial results themselves."""
    c = _Ctx(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
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
    c = _Ctx(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return tiled_backward(c, dout, q, k, v, out, lse)
