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

Score modifications (``Mods``) ride on the same schedule, still in O(N) memory:

* ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's signature, raw indices) is called
  once per tile on the tile's scores (B, Hq, Tq, Tk) and broadcastable index tensors, after the
  scale and before the mask. The backward recomputes it per tile under autograd and pulls the
  tile's dS back through it with ``torch.autograd.grad``: into the raw scores and into every
  tensor the score_mod captures that requires grad (found once per call by ``captured_tensors``).
* dropout acts on the normalised probabilities, ``out = (P ∘ Z) V`` with ``Z ∈ {0, 1/(1-p)}``.
  Because ``P = exp(S - lse)`` of the whole row, each segment's partial ``Σ exp(S - lse_seg) Z V``
  merges by the same log-sum-exp rule (the lse itself is of the undropped P). ``Z`` is a hash of
  (seed, b, h, q_idx, kv_idx), so both passes regenerate it per tile, whatever the tiling.
* sinks (one logit per query head) add ``exp(sink)`` to each row's denominator: they change only
  the final normalisation, ``lse' = logaddexp(lse, sink)``, ``out' = out · exp(lse - lse')``.
* the per-row lse can be returned, with its gradient: ``∂lse/∂S = P``, so a gradient ``dlse``
  only shifts the backward's ``D = rowsum(dO ∘ O)`` to ``D - dlse``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .masks import Mask, SlidingWindow, eval_mask

KERNELS = ("auto", "fused", "torch")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Below this many queries a separate query tile costs more in Python than it saves.
_MIN_Q_TILE = 16
# Most keys in one backward call. Each call's dK/dV are transient, so this bounds the
# backward's working memory at 2·B·Hkv·_MAX_SEGMENT·D elements.
_MAX_SEGMENT = 2048
# Most keys gathered (copied) from scattered tiles into one forward call.
_MAX_GATHER = 4096


def _fused_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def resolve_kernel(kernel: str, q: Tensor) -> str:
    if kernel == "auto":
        if q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and _fused_available():
            return "fused"
        return "torch"
    return kernel


# --- score modifications and dropout --------------------------------------------------------

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
_M32 = 0xFFFFFFFF
# Dropout draws 24-bit uniforms: keep iff u >= round(p·2²⁴), an exact probability.
_DROP_BITS = 24


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons), a 32-bit integer hash with full avalanche, on int64 tensors
    holding values in [0, 2³²). The products wrap past 2⁶³ but their low 32 bits are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(seed: int, p: float, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The dropout factor ``Z`` at broadcast (b, h, q_idx, kv_idx): 0 (dropped) or ``1/keep``.

    ``u = hash(seed, b, h, q_idx, kv_idx) >> 8`` is a 24-bit uniform from a counter-based hash
    (``_mix32`` chained over the indices), dropped iff ``u < t`` with ``t = round(p·2²⁴)``; the
    kept factor ``2²⁴ / (2²⁴ - t)`` is the exact inverse of the keep probability, so
    ``E[Z] = 1`` (unbiased inverted dropout). Any tile of any call regenerates its own part.
    """
    t = round(p * 2 ** _DROP_BITS)
    x = _mix32(torch.tensor(seed & _M32, device=b.device) ^ ((seed >> 32) & _M32))
    x = _mix32(x ^ b)
    x = _mix32(x ^ h)
    x = _mix32(x ^ q_idx)
    x = _mix32(x ^ ((kv_idx * 0x9E3779B1) & _M32))
    keep = (x >> (32 - _DROP_BITS)) >= t
    return keep * (2 ** _DROP_BITS / (2 ** _DROP_BITS - t))


class _Collect(TorchFunctionMode):
    """Records the tensors requiring grad that a function reads but did not make."""

    def __init__(self, made: list[Tensor]):
        super().__init__()
        self.made = {id(t) for t in made}
        self.keep_alive = list(made)
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in self.made:
                self.found.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.made.add(id(t))
                self.keep_alive.append(t)
        return out


def captured_tensors(score_mod: ScoreMod, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The tensors requiring grad that ``score_mod`` reads (a learned bias table, a slope
    parameter), found by one call on a 1×1 probe; they become inputs of the autograd function,
    so their gradients flow as FlexAttention's do."""
    probe = [torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)] + [
        torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device) for _ in range(4)]
    mode = _Collect(probe)
    with torch.no_grad(), mode:
        score_mod(*probe)
    return tuple(mode.found.values())


@dataclass(frozen=True)
class Mods:
    """What changes the scores or probabilities of one call (all optional).

    score_mod: FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    captured: the tensors the score_mod reads that need gradients (``captured_tensors``).
    dropout_p, dropout_seed: dropout on the normalised probabilities (``dropout_keep``).
    """

    score_mod: ScoreMod | None = None
    captured: tuple[Tensor, ...] = field(default=(), repr=False)
    dropout_p: float = 0.0
    dropout_seed: int = 0

    @property
    def active(self) -> bool:
        return self.score_mod is not None or self.dropout_p > 0


class _TileMods:
    """The score_mod and dropout of one tile: global indices of its rows and keys, and the
    reshapes between the kernels' stacked (B, Hkv, G·Tq, Tk) and (B, Hq, Tq, Tk)."""

    def __init__(self, c: _Ctx, qa: int, qb: int, seg: Segment):
        self.mods, self.c = c.mods, c
        dev = c.device
        rows = torch.arange(qa, qb, device=dev) if c.q_pos is None else c.q_pos[qa:qb]
        self.b = torch.arange(c.B, device=dev)[:, None, None, None]
        self.h = torch.arange(c.Hq, device=dev)[None, :, None, None]
        self.q_idx = rows[None, None, :, None]
        self.kv_idx = seg.positions(dev)[None, None, None, :]
        self.tq, self.tk = qb - qa, seg.size

    def scores(self, s: Tensor) -> Tensor:
        c = self.c
        s4 = s.view(c.B, c.Hq, self.tq, self.tk)  # (B, Hq, Tq, Tk)
        out = self.mods.score_mod(s4, self.b, self.h, self.q_idx, self.kv_idx)
        if not isinstance(out, Tensor):
            raise TypeError(f"score_mod must return a tensor, got {type(out).__name__}")
        out = out.to(s.dtype).expand(s4.shape)
        return out.reshape(s.shape)  # (B, Hkv, G·Tq, Tk)

    def keep(self, dtype: torch.dtype) -> Tensor | None:
        if not self.mods.dropout_p:
            return None
        c = self.c
        z = dropout_keep(self.mods.dropout_seed, self.mods.dropout_p, self.b, self.h, self.q_idx, self.kv_idx)
        return z.to(dtype).expand(c.B, c.Hq, self.tq, self.tk).reshape(c.B, c.Hkv, c.G * self.tq, self.tk)


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


def _torch_fwd(q, k, v, allowed, scale, tm: _TileMods | None = None):
    """One segment in plain PyTorch; out and lse in the accumulation dtype."""
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    if tm is not None and tm.mods.score_mod is not None:
        s = tm.scores(s)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = s.sub_(row_max).exp_()
    row_sum = p.sum(-1, keepdim=True)
    keep = tm.keep(acc) if tm is not None else None
    if keep is not None:
        p.mul_(keep)  # the lse above stays that of the undropped probabilities
    out = torch.matmul(p, v.to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
    lse = (row_max + row_sum.log()).squeeze(-1)  # -inf where nothing was allowed
    return out, lse


def _torch_bwd(dout, q, k, v, out, lse, allowed, scale, tm: _TileMods | None = None, delta=None):
    """Gradients of one segment in the accumulation dtype, and those of the score_mod's
    captured tensors. ``delta`` (B, Hkv, M), when given, replaces rowsum(dO ∘ O)."""
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = _acc_dtype(q.dtype)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(qa, ka.transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    graph = None
    if tm is not None and tm.mods.score_mod is not None:
        with torch.enable_grad():
            s_raw = s.requires_grad_()
            s_mod = tm.scores(s_raw)
        graph = (s_raw, s_mod)
        s = s_mod.detach().clone()  # the graph may need s_mod's values (tanh does)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    keep = tm.keep(acc) if tm is not None else None
    dv = torch.matmul((p if keep is None else p * keep).transpose(-1, -2), da)
    dp = torch.matmul(da, va.transpose(-1, -2))
    if keep is not None:
        dp.mul_(keep)
    delta = (da * out.to(acc)).sum(-1, keepdim=True) if delta is None else delta.to(acc).unsqueeze(-1)
    ds = p.mul_(dp.sub_(delta))
    d_captured: tuple[Tensor | None, ...] = ()
    if graph is not None:
        s_raw, s_mod = graph
        grads = torch.autograd.grad(s_mod, (s_raw, *tm.mods.captured), ds, allow_unused=True)
        ds, d_captured = grads[0], grads[1:]
    dq = torch.matmul(ds, ka).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    return dq, dk, dv, d_captured


def _fused_bwd_acc(dout, q, k, v, out, lse, allowed, scale, tm=None, delta=None):
    """The fused backward with gradients in the accumulation dtype: half-precision segments
    run in float32, so no partial sum is rounded to bfloat16 before it is added."""
    assert tm is None and delta is None, "the fused operator takes no score_mod, dropout or dlse"
    if q.dtype in (torch.bfloat16, torch.float16):
        q, k, v, dout, out = (t.float() for t in (q, k, v, dout, out))
    dq, dk, dv = _fused_bwd(dout, q, k, v, out, lse.to(q.dtype), allowed, scale)
    return dq, dk, dv, ()


_KERNEL_FNS = {"fused": (_fused_fwd, _fused_bwd_acc), "torch": (_torch_fwd, _torch_bwd)}


# --- the autograd function ------------------------------------------------------------------


class _Ctx:
    """Everything about one call that both passes need, computed once."""

    def __init__(self, q, k, mask, scale, q_tile, kv_tile, kernel, mods: Mods | None = None,
                 q_pos: Tensor | None = None):
        self.B, self.Hq, self.nq, self.D = q.shape
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.scale = scale
        # The fused operator cannot run a score_mod or our dropout pattern: the torch kernel does.
        self.mods = mods if mods is not None and mods.active else None
        self.kernel = "torch" if self.mods is not None else resolve_kernel(kernel, q)
        # Global query positions of q's rows, when q holds a subset of the call's rows.
        self.q_pos = q_pos
        self.tiles = (q_tile, kv_tile)
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
        self.plan = plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=fused, gather=_MAX_GATHER)
        self.plan_bwd = (plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=True, max_segment=_MAX_SEGMENT)
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


    def tile_mods(self, qa: int, qb: int, seg: Segment) -> _TileMods | None:
        return _TileMods(self, qa, qb, seg) if self.mods is not None else None


def allowed_bool(c: _Ctx, qa: int, qb: int, seg: Segment) -> Tensor | None:
    """``c.allowed`` as a bool tensor (or None), for code with its own tile kernel."""
    a = c.allowed(qa, qb, seg)
    if a is CAUSAL_TILE:
        return torch.ones(qb - qa, seg.size, dtype=torch.bool, device=c.device).tril()
    return a


def merge_pair(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of two partial attentions over disjoint keys, differentiable.

    ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a·exp(lse_a - lse) + out_b·exp(lse_b - lse)``;
    shapes out (..., N, D), lse (..., N); out comes back in ``out_a``'s dtype. A row with
    nothing on either side (both lse -inf) stays 0 / -inf, with zero (never NaN) gradients.
    """
    finite = torch.isfinite(torch.maximum(lse_a, lse_b))
    # Both sides -inf: merge zeros instead, so neither value nor gradient sees -inf - -inf.
    sa = torch.where(finite, lse_a, torch.zeros_like(lse_a))
    sb = torch.where(finite, lse_b, torch.zeros_like(lse_b))
    lse = torch.logaddexp(sa, sb)
    w_a = torch.where(finite, torch.exp(sa - lse), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(sb - lse), torch.zeros_like(lse)).unsqueeze(-1)
    out = out_a * w_a.to(out_a.dtype) + out_b.to(out_a.dtype) * w_b.to(out_a.dtype)
    return out, torch.where(finite, lse, torch.full_like(lse, -math.inf))


def merge(partials: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partial attentions over disjoint key sets into the attention over their union.

    Args:
        partials: ``[(out_i, lse_i), ...]`` with out_i (B, H, N, D) and lse_i (B, H, N), each
            the softmax attention of the same queries over one key set (``return_lse=True``).

    Returns:
        ``(out, lse)``: out (B, H, N, D) in the first partial's dtype, merged in the lse dtype,
        and lse (B, H, N). Differentiable in every out_i and lse_i (plain torch ops: memory is
        that of the inputs plus a few (B, H, N, D) temporaries).

    Equivalent PyTorch code::

        lse = torch.logsumexp(torch.stack(lses), 0)
        out = sum(o * torch.exp(l - lse)[..., None] for o, l in partials)

    Raises:
        ValueError: no partials, or shapes that do not match.
    """
    if not isinstance(partials, (list, tuple)) or not partials:
        raise ValueError(f"partials must be a non-empty list of (out, lse) pairs, got {partials!r:.80}")
    for i, pair in enumerate(partials):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
            raise TypeError(f"partials[{i}] must be an (out, lse) pair of tensors, got {type(pair).__name__}")
        o, lse = pair
        if o.dim() < 2 or lse.shape != o.shape[:-1]:
            raise ValueError(f"partials[{i}]: lse must have out's shape without D, got out {tuple(o.shape)} "
                             f"and lse {tuple(lse.shape)}")
        if o.shape != partials[0][0].shape:
            raise ValueError(f"partials[{i}]: out has shape {tuple(o.shape)}, "
                             f"partials[0] has {tuple(partials[0][0].shape)}")
    out_dtype = partials[0][0].dtype
    out, lse = partials[0][0].to(partials[0][1].dtype), partials[0][1]
    for o, l_ in partials[1:]:
        out, lse = merge_pair(out, lse, o, l_.to(lse.dtype))
    return out.to(out_dtype), lse


def _merge(out_acc, lse_acc, out_s, lse_s):
    return merge_pair(out_acc, lse_acc, out_s, lse_s)


def tiled_forward(c: _Ctx, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Nq, D) in q's dtype and per-row lse (B, Hq, Nq) in the accumulation dtype."""
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
            tm = c.tile_mods(qa, qb, seg)
            o_s, l_s = fwd(q_t, seg.take(k), seg.take(v), c.allowed(qa, qb, seg), c.scale,
                           *((tm,) if tm is not None else ()))
            l_s = l_s.to(acc)
            if o_t is None:
                o_t, l_t = (o_s, l_s) if len(segs) == 1 else (o_s.to(acc), l_s)
            else:
                o_t, l_t = merge_pair(o_t, l_t, o_s, l_s)
        c.q_store(out, qa, qb, o_t.to(q.dtype))
        c.q_store(lse, qa, qb, l_t)
    return out, lse


def _add_all(total: list[Tensor | None], parts: Sequence[Tensor | None]) -> list[Tensor | None]:
    if not total:
        total = [None] * len(parts)
    return [t if g is None else (g.clone() if t is None else t.add_(g)) for t, g in zip(total, parts)]


def tiled_backward(c: _Ctx, dout, q, k, v, out, lse, *, delta: Tensor | None = None,
                   cast: bool = True):
    """dq, dk, dv (and, when ``c.mods`` has captured tensors, their gradients as a 4th item).

    Every partial sum is added in the accumulation dtype (float32 for half precision) and cast
    once, at the end, unless ``cast`` is False (callers adding several passes cast themselves).
    ``delta`` (B, Hq, Nq) replaces rowsum(dO ∘ O): ``D - dlse`` when the lse has a gradient.
    """
    if delta is not None and c.kernel == "fused":
        # The fused operator computes D itself: the torch kernel, on the original tiles.
        c = _Ctx(q, k, c.mask, c.scale, *c.tiles, "torch", c.mods, c.q_pos)
    kernel = c.kernel
    bwd = _KERNEL_FNS[kernel][1]
    acc = _acc_dtype(q.dtype)
    # A row that attends to nothing has lse -inf; +inf makes every recomputed P exactly 0.
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    if kernel == "fused":
        lse_b = lse_b.float() if q.dtype in (torch.bfloat16, torch.float16) else lse_b.to(q.dtype)
    d_captured: list[Tensor | None] = []
    if c.single_call and kernel == "fused" and c.nq and c.nk:
        dq, dk, dv, _ = bwd(c.q_view(dout, 0, c.nq), c.q_view(q, 0, c.nq), k, v,
                            c.q_view(out, 0, c.nq), c.q_view(lse_b, 0, c.nq),
                            CAUSAL_TILE if c.causal_call else None, c.scale)
        dq, dk, dv = dq.reshape(q.shape), dk, dv
    else:
        plan = c.plan_bwd
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qa, qb, segs in plan:
            if not segs:
                continue
            q_t, do_t, o_t = c.q_view(q, qa, qb), c.q_view(dout, qa, qb), c.q_view(out, qa, qb)
            l_t = c.q_view(lse_b, qa, qb)
            d_t = c.q_view(delta, qa, qb) if delta is not None else None
            dq_t = None
            for seg in segs:
                ks, vs = seg.take(k), seg.take(v)
                tm = c.tile_mods(qa, qb, seg)
                extra = (tm, d_t) if tm is not None or d_t is not None else ()
                dq_s, dk_s, dv_s, dc = bwd(do_t, q_t, ks, vs, o_t, l_t, c.allowed(qa, qb, seg), c.scale, *extra)
                dq_t = dq_s.to(acc) if dq_t is None else dq_t.add_(dq_s)
                seg.add_into(dk, dk_s)
                seg.add_into(dv, dv_s)
                if dc:
                    d_captured = _add_all(d_captured, dc)
            c.q_store(dq, qa, qb, dq_t)
    if cast:
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if c.mods is not None and c.mods.captured:
        return dq, dk, dv, d_captured or [None] * len(c.mods.captured)
    return dq, dk, dv


def row_dot(a: Tensor, b: Tensor, dtype: torch.dtype, rows: int = 1024) -> Tensor:
    """rowsum(a ∘ b) over D, (B, H, N, D) -> (B, H, N) in ``dtype``, a block of rows at a
    time so that no (B, H, N, D) temporary is made."""
    out = torch.empty(a.shape[:-1], dtype=dtype, device=a.device)
    for r in range(0, a.shape[2], rows):
        out[:, :, r:r + rows] = (a[:, :, r:r + rows].to(dtype) * b[:, :, r:r + rows].to(dtype)).sum(-1)
    return out


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Renormalise for one sink logit per query head: ``lse' = logaddexp(lse, sink_h)``,
    ``out' = out·exp(lse - lse')`` (in place on ``out``). Rows with no key keep out = 0."""
    s = sinks.detach().to(lse.dtype).view(1, -1, 1)  # (1, Hq, 1)
    new = torch.logaddexp(lse, s.expand_as(lse))
    w = torch.exp(lse - new)  # exp(-inf) = 0 where nothing was attended
    out.mul_(w.unsqueeze(-1).to(out.dtype))
    return out, new


class _Run:
    """A schedule of exact attention: ``forward -> (out, lse)`` and its backward. The
    autograd function below adds sinks and the lse's gradient around any such schedule."""

    def forward(self, q, k, v) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, delta):
        raise NotImplementedError


class TiledRun(_Run):
    """One ``_Ctx`` over the whole call."""

    def __init__(self, c: _Ctx):
        self.c = c

    @property
    def mods(self) -> Mods | None:
        return self.c.mods

    def forward(self, q, k, v):
        return tiled_forward(self.c, q, k, v)

    def backward(self, dout, q, k, v, out, lse, delta):
        grads = tiled_backward(self.c, dout, q, k, v, out, lse, delta=delta)
        return (*grads[:3], list(grads[3]) if len(grads) > 3 else [])


class _ExactAttention(torch.autograd.Function):
    """out, lse of a ``_Run``, with optional sinks; inputs: q, k, v, sinks, *captured."""

    @staticmethod
    def forward(ctx, run: _Run, n_captured: int, q, k, v, sinks, *captured):
        out, lse = run.forward(q, k, v)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
        ctx.run, ctx.n_captured = run, n_captured
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        none = (None,) * (6 + ctx.n_captured)
        if dout is None and dlse is None:
            return none
        acc = lse.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        delta = None
        if dlse is not None or (sinks is not None and ctx.needs_input_grad[5]):
            delta = row_dot(dout, out, acc)  # (B, Hq, Nq)
            if dlse is not None:
                delta = delta - dlse.to(acc)
        dq, dk, dv, d_captured = ctx.run.backward(dout, q, k, v, out, lse,
                                                  delta if dlse is not None else None)
        d_sinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            # ∂out/∂sink = -p_sink·out and ∂lse/∂sink = p_sink, with p_sink = exp(sink - lse').
            p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)  # (B, Hq, Nq)
            d_sinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
        d_captured = list(d_captured) + [None] * (ctx.n_captured - len(d_captured))
        return (None, None, dq, dk, dv, d_sinks, *d_captured)


def run_exact(run: _Run, q: Tensor, k: Tensor, v: Tensor, *, sinks: Tensor | None = None,
              mods: Mods | None = None, return_lse: bool = False):
    """Apply a schedule through the autograd function: out, or (out, lse) with ``return_lse``."""
    captured = mods.captured if mods is not None else ()
    out, lse = _ExactAttention.apply(run, len(captured), q, k, v, sinks, *captured)
    return (out, lse) if return_lse else out


def make_mods(score_mod: ScoreMod | None, dropout_p: float, dropout_seed: int | torch.Generator | None,
              q: Tensor) -> Mods | None:
    """``Mods`` of one call: the score_mod's captured tensors, the dropout seed resolved (a
    Generator or None draws one, from it or from torch's global generator)."""
    if score_mod is None and not dropout_p:
        return None
    seed = 0
    if dropout_p:
        if isinstance(dropout_seed, int) and not isinstance(dropout_seed, bool):
            seed = dropout_seed
        else:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=dropout_seed).item())
    captured = captured_tensors(score_mod, _acc_dtype(q.dtype), q.device) if score_mod is not None else ()
    return Mods(score_mod, captured, float(dropout_p), seed)


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                    q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto",
                    score_mod: ScoreMod | None = None, sinks: Tensor | None = None,
                    dropout_p: float = 0.0, dropout_seed: int | torch.Generator | None = None,
                    return_lse: bool = False):
    """Exact softmax attention over the block map of ``mask`` (None = all pairs).

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with ``Hq % Hkv == 0``.
        mask: the effective mask (causal included), or None.
        scale: multiplier of QKᵀ.
        q_tile, kv_tile: tile sizes of the block map.
        kernel: "auto", "fused" (CPU operator) or "torch" (plain PyTorch, any device); a
            score_mod or dropout always runs the torch kernel.
        score_mod, sinks (Hq,), dropout_p, dropout_seed, return_lse: as ``attnmem.attention``.

    Returns:
        (B, Hq, Nq, D), or ``(out, lse)`` with lse (B, Hq, Nq); rows with nothing to attend are
        zeros.
    """
    mods = make_mods(score_mod, dropout_p, dropout_seed, q)
    c = _Ctx(q, k, mask, scale, max(q_tile, _MIN_Q_TILE), kv_tile, kernel, mods)
    if mods is None and sinks is None and not return_lse:
        return _TiledAttention.apply(q, k, v, c)
    return run_exact(TiledRun(c), q, k, v, sinks=sinks, mods=mods, return_lse=return_lse)


class _TiledAttention(torch.autograd.Function):
    """The plain call (no sinks, mods or lse): the fewest moving parts on the hot path."""

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


def tiled_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                        q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    """Forward only, also returning the per-row log-sum-exp (B, Hq, Nq); for ring attention
    and other callers that merge partial results themselves."""
    c = _Ctx(q, k, mask, scale, max(q_tile, _MIN_Q_TILE), kv_tile, kernel)
    return tiled_forward(c, q, k, v)


def tiled_backward_lse(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       mask: Mask | None, scale: float, q_tile: int = 256, kv_tile: int = 256,
                       kernel: str = "auto", cast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through one block of keys, given the output and log-sum-exp of the WHOLE row.

    For ring attention and other callers that split the keys: with ``out`` (B, Hq, Nq, D) and
    ``lse`` (B, Hq, Nq) merged over all key blocks, the probabilities this block recomputes are
    the global ones, so ``dq`` is this block's share of the full dq (sum the shares over the
    blocks) and ``dk``/``dv`` (B, Hkv, Nk, D) are this block's full gradients from these queries.
    With ``cast=False`` they stay in the accumulation dtype (float32 for half precision).
    """
    c = _Ctx(q, k, mask, scale, max(q_tile, _MIN_Q_TILE), kv_tile, kernel)
    return tiled_backward(c, dout, q, k, v, out, lse, cast=cast)
