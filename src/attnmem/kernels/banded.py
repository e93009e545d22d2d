"""Causal sliding windows as one fused-operator call per query segment, over the keys it sees.

With ``sliding_window(left, 0)`` (each query sees itself and the ``left`` keys before it; HF's
``sliding_window = left + 1``) on a square problem, the queries ``[qa, qb)`` see exactly the
contiguous keys ``[qa - left, qb)``, and inside that band the allowed pairs are the same
diagonal strip for every segment::

    query i of the segment, key m of its band (key qa - left + m):  allowed iff i <= m <= i + left

          m:  0 ...... left ...... T + left - 1
    i = 0     x x x x x x . . . . . .
    i = 1     . x x x x x x . . . . .
    i = T-1   . . . . . . x x x x x x

So one additive bias of (T, T + left), 0 on the strip and -inf off it, serves every segment as a
view (cut at the sequence's start and end), and each segment is one call of PyTorch's fused CPU
operator in each pass, over views of q, k, v: no mask evaluation, no gathered keys, N / T calls.
Key padding adds its (B, 1, 1, K) bias to the strip of a segment whose keys hold padding (one
(B, 1, T, K) tensor, transient; segments without padding keep the view). The operator computes
the band's whole T × (T + left) rectangle, (T + left) / (left + 1) times the allowed pairs (1.25
at T = 256, left = 1023); it still took 0.72 x the tile loop's time at N = 8192, left = 1023
(benchmarks/hf.py --band, quiet machine, BENCHMARKS.md session 5), which evaluates the mask on
two partial tiles per query tile.

GQA takes K/V with fewer heads directly (``native_gqa``); ``kernels.plan_call`` sends a call here
only then (or without GQA), in float32 or float64, with no score modification.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masks import And, KeyPadding, Mask, SlidingWindow


def band_of(mask: Mask | None) -> tuple[int, KeyPadding | None] | None:
    """``(left, key padding)`` for ``sliding_window(left, 0)`` and ``sliding_window(left, 0) &
    key_padding(valid)`` (either order); None for any other mask."""
    def window(m: Mask) -> int | None:
        # Exactly the user's window: ``Band`` (a subclass, the pieces methods split windows
        # into; benchmarks/hf.py --band times the tile loop with it) keeps the tile loop.
        if type(m) is SlidingWindow and m.left is not None and m.right == 0:
            return m.left
        return None

    left = window(mask) if mask is not None else None
    if left is not None:
        return left, None
    if isinstance(mask, And):
        for a, b in ((mask.a, mask.b), (mask.b, mask.a)):
            left = window(a)
            if left is not None and isinstance(b, KeyPadding):
                return left, b
    return None


def band_bias(rows: int, left: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(rows, rows + left): 0 where ``0 <= m - i <= left``, -inf elsewhere (the strip above)."""
    below = torch.full((rows, rows + left), -math.inf, dtype=dtype, device=device).tril_(-1)  # m - i < 0
    above = torch.full((rows, rows + left), -math.inf, dtype=dtype, device=device).triu_(left + 1)
    return below.add_(above)


def _segments(n: int, left: int, q_tile: int, padding: KeyPadding | None):
    """``(qa, qb, ka, c0, padded)`` per query segment: its keys ``[ka, qb)`` are the strip's
    columns ``[c0, c0 + qb - ka)``; ``padded`` when one of them is padding."""
    starts = list(range(0, n, q_tile))
    keys = [(max(qa - left, 0), min(qa + q_tile, n)) for qa in starts]
    full = padding.all_valid(*map(list, zip(*keys))) if padding is not None else [True] * len(starts)
    for qa, (ka, qb), ok in zip(starts, keys, full):
        yield qa, qb, ka, ka - (qa - left), not ok


def _segment_bias(strip: Tensor, pad: Tensor | None, padded: bool, qa: int, qb: int, ka: int, c0: int,
                  batch: int, heads: int) -> Tensor:
    """The segment's additive mask (B, Hq, Tq, K): a view of the strip, plus the keys' padding
    where one of them is padded (a (Bm, 1, Tq, K) tensor)."""
    bias = strip[:qb - qa, c0:c0 + qb - ka]  # (Tq, K), a view
    if padded:
        bias = bias + pad[:, None, None, ka:qb]  # (Bm, 1, Tq, K)
    return bias.expand(batch, heads, qb - qa, qb - ka)


def _pad_bias(padding: KeyPadding | None, q: Tensor) -> Tensor | None:
    """Key padding (Bm, Nk) bools as an additive (Bm, Nk) bias, or None."""
    if padding is None:
        return None
    valid = padding.valid.to(q.device)
    return torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, -math.inf)


def banded_forward(q: Tensor, k: Tensor, v: Tensor, *, left: int, scale: float, q_tile: int,
                   padding: KeyPadding | None) -> tuple[Tensor, Tensor]:
    """q (B, Hq, N, D), k, v (B, Hkv, N, D) -> out (B, Hq, N, D) laid out as (B, N, Hq, D) (so a
    caller's transpose to (B, N, Hq·D) is a view) and lse (B, Hq, N) in q's dtype."""
    B, Hq, n, D = q.shape
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = q.new_empty(B, n, Hq, D).transpose(1, 2)  # (B, Hq, N, D); every row is written below
    lse = q.new_empty(B, Hq, n)  # (B, Hq, N)
    strip = band_bias(min(q_tile, n), left, q.dtype, q.device)
    pad = _pad_bias(padding, q)
    for qa, qb, ka, c0, padded in _segments(n, left, q_tile, padding):
        bias = _segment_bias(strip, pad, padded, qa, qb, ka, c0, B, Hq)
        o_s, l_s = op(q[:, :, qa:qb], k[:, :, ka:qb], v[:, :, ka:qb], 0.0, False, attn_mask=bias, scale=scale)
        out[:, :, qa:qb] = o_s
        lse[:, :, qa:qb] = l_s
    if padding is not None:
        # A query whose window holds no valid key attends to nothing: lse -inf (the operator says 0).
        lse.masked_fill_(padding.empty_rows(left).to(q.device)[:, None, :], -math.inf)
    return out, lse


def banded_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, left: int,
                    scale: float, q_tile: int, padding: KeyPadding | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, Hq, N, D), dk, dv (B, Hkv, N, D) given ``lse`` (B, Hq, N) with +inf on empty rows."""
    B, Hq, n, D = q.shape
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq = torch.empty_like(q)  # every row is written once: a query is in one segment
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # neighbouring segments' bands overlap
    strip = band_bias(min(q_tile, n), left, q.dtype, q.device)
    pad = _pad_bias(padding, q)
    for qa, qb, ka, c0, padded in _segments(n, left, q_tile, padding):
        bias = _segment_bias(strip, pad, padded, qa, qb, ka, c0, B, Hq)
        dq_s, dk_s, dv_s = op(dout[:, :, qa:qb], q[:, :, qa:qb], k[:, :, ka:qb], v[:, :, ka:qb],
                              out[:, :, qa:qb], lse[:, :, qa:qb], 0.0, False, attn_mask=bias, scale=scale)
        dq[:, :, qa:qb] = dq_s
        # In place on the views (``+=`` on an index would also write the view back: two more
        # operators per segment, which a fake-tensor trace pays for).
        dk[:, :, ka:qb].add_(dk_s)
        dv[:, :, ka:qb].add_(dv_s)
    return dq, dk, dv
