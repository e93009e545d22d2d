"""Adaptive attention span (Sukhbaatar et al., 2019): each head learns how far back it looks.

Head h has a span ``z_h``; a key at distance ``x = i - j >= 0`` behind query i is weighted by
the soft ramp ``m_z(x) = clamp((R + z - x) / R, 0, 1)`` (``R`` = ramp width; with R = 0 the ramp
is the step ``x <= z``). The weight multiplies the exponentiated score before normalisation::

    a_ij = m(i - j) · exp(s_ij) / Σ_j' m(i - j') · exp(s_ij')

which is softmax with the additive bias ``log m(i - j)`` (``-inf`` where m = 0). Keys further
than ``W = ceil(max_h z_h) + R`` never count, so the computation runs over a band of W keys
behind each query tile and memory is O(N·W), not a mask over an N×N matrix. Like the tiled
exact kernel, the band kernel keeps only the output and the per-row log-sum-exp and recomputes
probabilities in the backward; it also returns the gradient of the per-(head, distance) bias
table, through which the spans learn: ``∂m/∂z = 1/R`` inside the ramp and 0 elsewhere, so a
span learns from the keys in its ramp, as in the paper.

Attention is causal by definition here (distances run backwards); alignment is bottom-right
when Nq != Nk. A user mask narrows it further.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels import acc_dtype, resolve_kernel
from ..masks import Mask, as_mask, eval_mask
from ..memory.model import Footprint, Shape
from ..registry import Capabilities, Inputs, Method, Style, register


def ramp_log_weights(spans: Tensor, ramp: int, width: int) -> Tensor:
    """(H, width) table of ``log m_z(x)`` for distances x = 0..width-1; -inf where m = 0.

    Differentiable in ``spans`` (shape (H,)); the gradient is finite everywhere.
    """
    x = torch.arange(width, device=spans.device, dtype=spans.dtype)
    if ramp == 0:
        inside = x[None, :] <= spans[:, None]
        return torch.where(inside, torch.zeros_like(inside, dtype=spans.dtype), -math.inf)
    m = ((ramp + spans[:, None] - x[None, :]) / ramp).clamp(0.0, 1.0)  # (H, width)
    # The clamp_min keeps log's gradient finite where m = 0; where() then discards that branch.
    return torch.where(m > 0, m.clamp_min(torch.finfo(m.dtype).tiny).log(), -math.inf)


class _Band:
    """The band schedule of one call: which keys each query tile sees, and the bias per tile."""

    def __init__(self, q: Tensor, k: Tensor, width: int, q_tile: int, mask: Mask | None, scale: float):
        self.B, self.Hq, self.nq, self.D = q.shape
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.width, self.scale = width, scale
        self.fused = False  # set by the caller: tiles run in PyTorch's fused CPU operator
        self.offset = self.nk - self.nq
        self.mask_mod = mask.mask_fn(self.nq, self.nk) if mask is not None else None
        self.tiles = []
        for qa in range(0, self.nq, q_tile):
            qb = min(qa + q_tile, self.nq)
            ka = max(qa + self.offset - (width - 1), 0)
            kb = min(qb + self.offset, self.nk)  # the last query sees key qb - 1 + offset
            if kb > ka and width > 0:
                self.tiles.append((qa, qb, ka, kb))

    def q_view(self, x: Tensor, qa: int, qb: int) -> Tensor:
        """(B, Hq, Nq, ...) -> (B, Hkv, G·Tq, ...)."""
        return x[:, :, qa:qb].reshape(self.B, self.Hkv, self.G * (qb - qa), *x.shape[3:])

    def q_store(self, dst: Tensor, qa: int, qb: int, tile: Tensor) -> None:
        dst[:, :, qa:qb] = tile.reshape(self.B, self.Hq, qb - qa, *dst.shape[3:])

    def distances(self, qa, qb, ka, kb, device) -> tuple[Tensor, Tensor]:
        """(Tq, Tk) distance i + offset - j clamped into the table, and where it is in the band."""
        dist = (torch.arange(qa, qb, device=device)[:, None] + self.offset
                - torch.arange(ka, kb, device=device)[None, :])
        inside = (dist >= 0) & (dist < self.width)
        return dist.clamp(0, self.width - 1), inside

    def bias(self, table: Tensor, qa, qb, ka, kb) -> tuple[Tensor, Tensor]:
        """(1 or B, Hkv, G·Tq, Tk) additive bias of one tile, and the clamped distances."""
        dist, inside = self.distances(qa, qb, ka, kb, table.device)
        b = table[:, dist]  # (Hq, Tq, Tk)
        b = b.masked_fill(~inside, -math.inf)
        b = b.unsqueeze(0)  # (1, Hq, Tq, Tk)
        if self.mask_mod is not None:
            bb = torch.arange(self.B, device=table.device)[:, None, None, None]
            hh = torch.arange(self.Hq, device=table.device)[None, :, None, None]
            qi = torch.arange(qa, qb, device=table.device)[:, None]
            ki = torch.arange(ka, kb, device=table.device)[None, :]
            allowed = eval_mask(self.mask_mod, bb, hh, qi, ki)
            b = b.masked_fill(~allowed, -math.inf)
        b = b.reshape(b.shape[0], self.Hkv, self.G * (qb - qa), kb - ka)  # (Bb, Hkv, G·Tq, Tk)
        return b, dist


def _fused_band_forward(c: _Band, q, k, v, tab):
    """Forward through PyTorch's CPU flash-attention operator, the bias passed as its float mask."""
    out = q.new_zeros(c.B, c.Hq, c.nq, c.D)  # (B, Hq, Nq, D)
    lse = torch.full((c.B, c.Hq, c.nq), -math.inf, dtype=q.dtype, device=q.device)  # (B, Hq, Nq)
    for qa, qb, ka, kb in c.tiles:
        bias = c.bias(tab, qa, qb, ka, kb)[0].to(q.dtype)
        o_t, l_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            c.q_view(q, qa, qb), k[:, :, ka:kb], v[:, :, ka:kb], 0.0, False, attn_mask=bias, scale=c.scale)
        # The operator reports lse = 0 for a row with nothing allowed; that row attends to nothing.
        l_t = l_t.masked_fill(torch.isneginf(bias).all(-1).expand(l_t.shape), -math.inf)
        c.q_store(out, qa, qb, o_t)
        c.q_store(lse, qa, qb, l_t)
    return out, lse


def _fused_band_backward(c: _Band, dout, q, k, v, out, lse, tab):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qa, qb, ka, kb in c.tiles:
        bias = c.bias(tab, qa, qb, ka, kb)[0].to(q.dtype)
        dq_t, dk_t, dv_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            c.q_view(dout, qa, qb), c.q_view(q, qa, qb), k[:, :, ka:kb], v[:, :, ka:kb],
            c.q_view(out, qa, qb), c.q_view(lse, qa, qb), 0.0, False, attn_mask=bias, scale=c.scale)
        c.q_store(dq, qa, qb, dq_t)
        dk[:, :, ka:kb] += dk_t
        dv[:, :, ka:kb] += dv_t
    return dq, dk, dv


class _BandAttention(torch.autograd.Function):
    """Causal banded softmax attention with a per-(head, distance) additive bias table."""

    @staticmethod
    def forward(ctx, q, k, v, table, c: _Band):
        acc = acc_dtype(q.dtype)
        tab = table.detach().to(acc)
        if c.fused:
            out, lse = _fused_band_forward(c, q, k, v, tab)
            ctx.c = c
            ctx.save_for_backward(q, k, v, table, out, lse)
            return out
        out = q.new_zeros(c.B, c.Hq, c.nq, c.D)  # (B, Hq, Nq, D)
        lse = torch.full((c.B, c.Hq, c.nq), -math.inf, dtype=acc, device=q.device)  # (B, Hq, Nq)
        for qa, qb, ka, kb in c.tiles:
            q_t = c.q_view(q, qa, qb).to(acc)  # (B, Hkv, M, D)
            s = torch.matmul(q_t, k[:, :, ka:kb].to(acc).transpose(-1, -2)).mul_(c.scale)  # (B, Hkv, M, Tk)
            s.add_(c.bias(tab, qa, qb, ka, kb)[0])
            row_max = s.amax(-1, keepdim=True)
            row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
            p = s.sub_(row_max).exp_()
            row_sum = p.sum(-1, keepdim=True)
            o_t = torch.matmul(p, v[:, :, ka:kb].to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
            c.q_store(out, qa, qb, o_t.to(q.dtype))
            c.q_store(lse, qa, qb, (row_max + row_sum.log()).squeeze(-1))
        ctx.c = c
        ctx.save_for_backward(q, k, v, table, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, table, out, lse = ctx.saved_tensors
        c: _Band = ctx.c
        acc = acc_dtype(q.dtype)
        tab = table.detach().to(acc)
        # A row with nothing allowed has lse -inf; +inf makes its recomputed P exactly 0.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
        if c.fused:
            dq, dk, dv = _fused_band_backward(c, dout, q, k, v, out, lse, tab)
            return dq, dk, dv, None, None
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        need_table = ctx.needs_input_grad[3]
        dtable = torch.zeros(tab.shape, dtype=acc, device=q.device) if need_table else None
        for qa, qb, ka, kb in c.tiles:
            q_t = c.q_view(q, qa, qb).to(acc)  # (B, Hkv, M, D)
            do_t = c.q_view(dout, qa, qb).to(acc)
            o_t = c.q_view(out, qa, qb).to(acc)
            l_t = c.q_view(lse, qa, qb).unsqueeze(-1)  # (B, Hkv, M, 1)
            ks, vs = k[:, :, ka:kb].to(acc), v[:, :, ka:kb].to(acc)
            bias, dist = c.bias(tab, qa, qb, ka, kb)
            s = torch.matmul(q_t, ks.transpose(-1, -2)).mul_(c.scale).add_(bias)  # (B, Hkv, M, Tk)
            p = s.sub_(l_t).exp_()
            dv[:, :, ka:kb] += torch.matmul(p.transpose(-1, -2), do_t)
            dp = torch.matmul(do_t, vs.transpose(-1, -2))
            delta = (do_t * o_t).sum(-1, keepdim=True)
            ds = p.mul_(dp.sub_(delta))  # gradient of the biased score s + b
            if need_table:
                per_head = ds.sum(0).reshape(c.Hq, qb - qa, kb - ka)  # (Hq, Tq, Tk)
                dtable.index_put_((torch.arange(c.Hq, device=q.device)[:, None, None], dist.expand_as(per_head)),
                                  per_head, accumulate=True)
            c.q_store(dq, qa, qb, torch.matmul(ds, ks).mul_(c.scale).to(q.dtype))
            dk[:, :, ka:kb] += torch.matmul(ds.transpose(-1, -2), q_t).mul_(c.scale)
        dtable = dtable.to(table.dtype) if need_table else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), dtable, None


def _as_spans(spans: Tensor | Sequence[float] | float, heads: int, device, dtype) -> Tensor:
    if isinstance(spans, Tensor):
        t = spans.expand(heads) if spans.dim() == 0 else spans
    elif isinstance(spans, (int, float)):
        t = torch.full((heads,), float(spans), device=device, dtype=dtype)
    else:
        t = torch.tensor([float(s) for s in spans], device=device, dtype=dtype)
    if t.shape != (heads,):
        raise ValueError(f"spans must be one number or one per query head ({heads}), got shape {tuple(t.shape)}")
    if bool((t.detach() < 0).any()):
        raise ValueError(f"spans must be >= 0, got {t.detach().tolist()}")
    return t


def adaptive_span_attention(q: Tensor, k: Tensor, v: Tensor, *, spans: Tensor | Sequence[float] | float,
                            ramp: int = 32, mask: Mask | None = None, scale: float | None = None,
                            q_tile: int = 256) -> Tensor:
    """Causal attention with per-head soft spans; the functional form (spans may require grad).

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), ``Hq % Hkv == 0``.
        spans: one span per query head, shape (Hq,), or one number for all; >= 0.
        ramp: ramp width R >= 0 (0: a hard cut at distance ``span``).
        mask: an extra ``attnmem.masks.Mask`` (True = attend), combined with the span.
        scale: multiplier of QKᵀ; default ``1/sqrt(D)``.
        q_tile: queries per band tile; working memory O(q_tile · (q_tile + W)).

    Returns:
        (B, Hq, Nq, D); rows with nothing to attend are zeros.

    Raises:
        ValueError: a negative span or ramp, or spans of the wrong shape.
    """
    if not isinstance(ramp, int) or isinstance(ramp, bool) or ramp < 0:
        raise ValueError(f"ramp must be a non-negative int, got {ramp!r}")
    Hq, D = q.shape[1], q.shape[3]
    acc = acc_dtype(q.dtype)
    z = _as_spans(spans, Hq, q.device, acc)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    width = min(math.ceil(float(z.detach().max())) + ramp + (1 if ramp == 0 else 0), k.shape[2])
    width = max(width, 1)
    table = ramp_log_weights(z.to(acc), ramp, width)  # (Hq, W)
    band = _Band(q, k, width, max(q_tile, 1), mask, scale)
    # Fixed spans need no bias gradient, so PyTorch's fused CPU flash-attention operator (which
    # takes the bias as a float mask but does not return its gradient) can run each tile.
    band.fused = band_is_fused(q.device, q.dtype, learned=table.requires_grad)
    return _BandAttention.apply(q, k, v, table, band)


class AdaptiveSpanAttention(nn.Module):
    """The learnable form: one span per head, ``z_h = max_span · clamp(θ_h, 0, 1)``.

    Args:
        heads: query heads.
        max_span: the largest span a head may learn.
        ramp: ramp width R.
        init_span: starting span of every head (default ``max_span``).
        q_tile: queries per band tile.

    ``span_loss()`` is the paper's L1 penalty, the mean span over heads in positions (multiply
    by your λ and add it to the loss); ``current_spans()`` returns the spans (H,).
    """

    def __init__(self, *, heads: int, max_span: int, ramp: int = 32, init_span: float | None = None,
                 q_tile: int = 256):
        super().__init__()
        self.heads, self.max_span, self.ramp, self.q_tile = heads, max_span, ramp, q_tile
        init = max_span if init_span is None else init_span
        self.span_frac = nn.Parameter(torch.full((heads,), init / max_span))

    def current_spans(self) -> Tensor:
        return self.max_span * self.span_frac.clamp(0.0, 1.0)

    def span_loss(self) -> Tensor:
        return self.current_spans().mean()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, mask=None) -> Tensor:
        if not causal:
            raise ValueError("adaptive_span is causal by definition (spans look backwards); got causal=False")
        user = as_mask(mask) if mask is not None else None
        return adaptive_span_attention(q, k, v, spans=self.current_spans(), ramp=self.ramp, mask=user,
                                       scale=None, q_tile=self.q_tile)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, max_span={self.max_span}, ramp={self.ramp}"


def _check_int(name: str, val: object, minimum: int) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")


@dataclass(frozen=True)
class AdaptiveSpanOptions:
    """max_span: largest learnable span (int >= 1, default 1024). ramp: ramp width R (int >= 0,
    default 32). init_span: starting span (default max_span). q_tile: queries per band tile."""

    max_span: int = 1024
    ramp: int = 32
    init_span: float | None = None
    q_tile: int = 256

    def __post_init__(self):
        _check_int("max_span", self.max_span, 1)
        _check_int("ramp", self.ramp, 0)
        _check_int("q_tile", self.q_tile, 1)
        if self.init_span is not None and not (0 <= self.init_span <= self.max_span):
            raise ValueError(f"init_span must be in [0, max_span={self.max_span}], got {self.init_span!r}")


def band_is_fused(device, dtype: torch.dtype, *, learned: bool) -> bool:
    """Whether the band's tiles run in PyTorch's fused CPU operator (float32/float64, spans with
    no gradient) or in the PyTorch loop; the kernel and the memory model both ask this."""
    return resolve_kernel("auto", device, dtype) == "fused" and dtype in (torch.float32, torch.float64) and not learned


_CAPS = Capabilities(mask=True, gqa=True)


@register
class AdaptiveSpan(Method):
    name = "adaptive_span"
    style = Style("#8c564b", "v")
    family = "adaptive_span"
    exact = False
    stateful = True
    memory = "O(B·H·N·D) + O(B·H·N) log-sum-exp; O(N·S) work over a band of the largest span S"
    summary = "learned per-head span with a soft ramp (Sukhbaatar et al. 2019); causal"
    Options = AdaptiveSpanOptions
    caps = _CAPS

    def extra_reasons(self, inp: Inputs, opts):
        if not inp.causal:
            return ["is causal by definition (spans look backwards); pass causal=True"]
        return []

    check_options = {"max_span": 16, "ramp": 4, "init_span": 9.5, "q_tile": 16}

    def build_module(self, *, heads, kv_heads, head_dim, opts):
        return AdaptiveSpanAttention(heads=heads, max_span=opts.max_span, ramp=opts.ramp,
                                     init_span=opts.init_span, q_tile=opts.q_tile)

    def module_definition(self, module, inp: Inputs, opts) -> Tensor:
        return adaptive_span_definition(inp.q, inp.k, inp.v, spans=module.current_spans().to(inp.q.dtype),
                                        ramp=module.ramp, mask=inp.user_mask, scale=inp.scale)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return _span_domain_reasons(s)

    def memory_model(self, s: Shape, opts) -> Footprint:
        """The learned module's spans start at ``init_span`` (default ``max_span``): z =
        max_span · clamp(init / max_span, 0, 1) in float32, as ``AdaptiveSpanAttention`` holds it.
        Training with a ramp, the spans get gradients: the PyTorch loop (``graph``); otherwise the
        fused kernel, as ``adaptive_span_fixed``. See ``span_footprint``."""
        init = opts.max_span if opts.init_span is None else opts.init_span
        frac = torch.full((1,), init / opts.max_span)  # the module's parameter (float32)
        z = float((opts.max_span * frac.clamp(0.0, 1.0)).max())
        graph = s.training and opts.ramp > 0
        return span_footprint(s, _span_width(s, z, opts.ramp), max(opts.q_tile, 1), graph=graph)


@dataclass(frozen=True)
class FixedSpanOptions:
    """spans: one span for all heads or a tuple, one per query head (>= 0; default 1024).
    ramp: ramp width R (int >= 0, default 32). q_tile: queries per band tile."""

    spans: float | tuple[float, ...] = 1024
    ramp: int = 32
    q_tile: int = 256

    def __post_init__(self):
        vals = self.spans if isinstance(self.spans, tuple) else (self.spans,)
        for s in vals:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0:
                raise ValueError(f"spans must be numbers >= 0, got {self.spans!r}")
        if isinstance(self.spans, list):
            raise ValueError("spans must be a number or a tuple, got a list")
        _check_int("ramp", self.ramp, 0)
        _check_int("q_tile", self.q_tile, 1)


def adaptive_span_definition(q: Tensor, k: Tensor, v: Tensor, *, spans: Tensor, ramp: int, mask: Mask | None,
                             scale: float) -> Tensor:
    """Sukhbaatar et al. eq. (2)-(3) on the full matrix: weights m_z(i - j)·exp(s_ij) over the
    causal keys (and ``mask``), normalised; ``spans`` (Hq,), one per query head."""
    _, Hq, nq, _ = q.shape
    nk = k.shape[2]
    G = Hq // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    dist = (torch.arange(nq, device=q.device)[:, None] + nk - nq
            - torch.arange(nk, device=q.device)[None, :]).to(q.dtype)  # (Nq, Nk): i - j, aligned
    if ramp == 0:
        weight = (dist[None] <= spans[:, None, None]).to(q.dtype)
    else:
        weight = ((ramp + spans[:, None, None] - dist[None]) / ramp).clamp(0, 1)  # (Hq, Nq, Nk)
    weight = weight * (dist >= 0)
    if mask is not None:
        weight = weight * mask.to_dense(nq, nk, batch=q.shape[0], heads=Hq).to(q.device)
    w = torch.exp(s - s.amax(-1, keepdim=True)) * weight
    return (w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)) @ v.repeat_interleave(G, 1)


@register
class AdaptiveSpanFixed(Method):
    name = "adaptive_span_fixed"
    style = Style("#c49c94", "^")
    family = "adaptive_span"
    exact = False
    memory = AdaptiveSpan.memory
    summary = "adaptive-span attention with fixed spans (the functional form); causal"
    Options = FixedSpanOptions
    caps = _CAPS

    def extra_reasons(self, inp: Inputs, opts):
        reasons = []
        if not inp.causal:
            reasons.append("is causal by definition (spans look backwards); pass causal=True")
        if isinstance(opts.spans, tuple) and len(opts.spans) != inp.q_heads:
            reasons.append(f"spans has {len(opts.spans)} entries, expected one per query head ({inp.q_heads})")
        return reasons

    check_options = {"spans": 9.5, "ramp": 4, "q_tile": 16}

    def forward(self, inp: Inputs, opts):
        return adaptive_span_attention(inp.q, inp.k, inp.v, spans=opts.spans, ramp=opts.ramp,
                                       mask=inp.user_mask, scale=inp.scale, q_tile=opts.q_tile)

    def definition(self, inp: Inputs, opts) -> Tensor:
        spans = torch.as_tensor(opts.spans, dtype=inp.q.dtype, device=inp.q.device).expand(inp.q_heads)
        return adaptive_span_definition(inp.q, inp.k, inp.v, spans=spans, ramp=opts.ramp, mask=inp.user_mask,
                                        scale=inp.scale)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return _span_domain_reasons(s)

    def memory_model(self, s: Shape, opts) -> Footprint:
        """See ``span_footprint``; the width comes from the spans as the call's accumulation
        dtype holds them."""
        spans = opts.spans if isinstance(opts.spans, tuple) else (opts.spans,)
        z = torch.tensor([float(x) for x in spans], dtype=torch.float64 if s.itemsize == 8 else torch.float32)
        return span_footprint(s, _span_width(s, float(z.max()), opts.ramp), max(opts.q_tile, 1), graph=False)


# --- memory model -----------------------------------------------------------------------------


def _span_domain_reasons(s: Shape) -> list[str]:
    return ["a user mask is not modelled (traced)"] if s.masked else []


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


def span_footprint(s: Shape, width: int, q_tile: int, graph: bool) -> Footprint:
    """Adaptive-span attention (``adaptive_span._BandAttention``): query tiles of Tq ≤ q_tile rows,
    each against its band of Tk = min(Tq + W − 1, qb) keys, W = ⌈max span⌉ + R (+1 when R = 0),
    at most N. Per tile, with p = Tq·Tk pairs, a = the accumulation dtype's bytes (4 for half
    inputs): the bias b = Hq·p·a (per head, batch-independent), built from int64 distances (8p)
    and two bools per pair: its peak is max(17p, 10p + 2b) (the table lookup and its masked copy);
    S = B·Hq·p·a one score tile, t = B·Hq·Tq·D·a one query tile, k_t = B·Hkv·Tk·D·a.

    saved = O + L + the (Hq, W) table in the accumulation dtype (``graph``: learned spans with a
    ramp also keep the table's autograd graph, 3 more (Hq, W) floats and one of bools).
    Fused (float32/float64 with fixed spans, or no gradient for the spans; ``band_is_fused``):
    the forward peaks while a tile's bias is built, with the previous tile's bias, output and lse
    still bound (b' + t' + lse tile); the backward at the same point holds L (lse with +inf) +
    dQ + dK + dV + the previous tile's bias, dQ, dK, dV (b' + t' + 2k_t'); at a kernel call, for
    G > 1, the G-stacked q, O, lse tiles (copies).
    The PyTorch loop (learned spans, which also returns the table's gradient (Hq, W); and every
    half-precision call): the forward holds the previous tile's scores and output (S' + t')
    besides the new scores and bias; the backward, at the next tile's bias (or its dP), the
    previous tile's bias, distances, dS, dP (and, learning, per-head bias gradient: b' + 8p' +
    2S' + b'), or this tile's bias, distances, S, dP and the previous tile's dS, dP, per-head
    gradient. In half precision its tiles are float32 copies (q, dO, O and the band's K, V:
    3t + 2k_t), dK and dV accumulate in float32 (dQ is stored per tile in the input dtype) and
    are cast back at the end, beside the last tile's names: at long N the peak.
    O(N·W) work, O(N·D + Tq·(Tq + W)) memory. Domain: causal, no user mask."""
    a = s.acc_itemsize
    stack = s.heads != s.kv_heads
    loop = not band_is_fused("cpu", getattr(torch, s.dtype), learned=graph)
    base = s.q_bytes + s.lse_bytes + s.heads * width * a  # out, lse, table
    if graph:
        base += 3 * s.heads * width * a + s.heads * width
    fwd = bwd = tail = 0
    for (tq0, tk0), (tq, tk) in _span_tiles(s.seq_len, width, q_tile):
        p0, p = tq0 * tk0, tq * tk
        b0, b = s.heads * p0 * a, s.heads * p * a
        S0, S = s.batch * b0, s.batch * b  # one score tile: B·Hq·p·a
        t0, t = (s.batch * s.heads * x * s.head_dim * a for x in (tq0, tq))
        k0, k = (s.batch * s.kv_heads * x * s.head_dim * a for x in (tk0, tk))
        lr0, lr = s.batch * s.heads * tq0 * a, s.batch * s.heads * tq * a
        build = max(17 * p, 10 * p + 2 * b)
        if not loop:
            fwd = max(fwd, b0 + t0 + lr0 + build, t0 + lr0 + b + (t if stack else 0) + t + lr)
            bwd = max(bwd, b0 + t0 + 2 * k0 + build,
                      t0 + 2 * k0 + b + (2 * t + lr if stack else 0) + t + 2 * k)
            continue
        ph0 = b0 if graph else 0  # the previous tile's per-head bias gradient
        if s.half:
            q_t = t  # a float32 copy of the query tile
            copies = 3 * t + 2 * k + (lr if stack else 0)  # float32 q, dO, O tiles and K, V band
            fwd = max(fwd, S0 + t0 + q_t + k + S)  # K's float32 band while the scores are made
        else:
            q_t = t if stack else 0
            copies = 2 * t + lr if stack else 0  # stacked q, O tiles and their lse
        fwd = max(fwd, S0 + t0 + q_t + S + build)
        bwd = max(bwd, b0 + 8 * p0 + 2 * S0 + ph0 + copies + build,
                  b + 8 * p + S + 2 * S0 + ph0 + S + copies)
        tail = b + 8 * p + 2 * S + (b if graph else 0) + copies  # the last tile's names
    if not s.training:
        return Footprint(0, base + fwd)
    kv_grads = 2 * s.kv_bytes * a // s.itemsize if loop else 2 * s.kv_bytes  # dK, dV: float32 in the loop
    grads = s.q_bytes + kv_grads + (s.heads * width * a if graph else 0)  # + the table's gradient
    peak = max(base + fwd, base + s.lse_bytes + grads + bwd)
    if loop and s.half:  # dK, dV cast back at the end
        peak = max(peak, base + s.lse_bytes + grads + 2 * s.kv_bytes + tail)
    return Footprint(base, peak - base)


__all__ = ["AdaptiveSpanAttention", "adaptive_span_attention", "ramp_log_weights"]
