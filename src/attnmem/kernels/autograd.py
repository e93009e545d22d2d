"""The autograd of attention that keeps only its output and log-sum-exp for the backward.

FlashAttention's memory rule: the forward saves ``q, k, v, out`` and the per-row log-sum-exp
``lse`` (B, H, N), never the probabilities; the backward recomputes ``P = exp(S - lse)`` tile by
tile. The tiled kernel and ring attention differ only in how they schedule those two passes,
so they share this one ``autograd.Function`` and pass their own passes to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

ForwardPass = Callable[[Any, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
BackwardPass = Callable[[Any, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class LseAttention(torch.autograd.Function):
    """``LseAttention.apply(q, k, v, plan, forward_pass, backward_pass)``.

    ``forward_pass(plan, q, k, v) -> (out, lse)`` and
    ``backward_pass(plan, dout, q, k, v, out, lse) -> (dq, dk, dv)``; ``plan`` is whatever both
    passes need about the call (a ``TileContext``, a ring's layout), computed once.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, forward_pass: ForwardPass, backward_pass: BackwardPass):
        out, lse = forward_pass(plan, q, k, v)
        ctx.plan, ctx.backward_pass = plan, backward_pass
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_pass(ctx.plan, dout, q, k, v, out, lse)
        return dq, dk, dv, None, None, None
