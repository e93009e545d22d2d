"""The two tile kernels: one call computes one segment's partial output and log-sum-exp.

``fused`` calls PyTorch's own CPU flash-attention operator (``aten._scaled_dot_product_flash_attention_for_cpu``
and its backward, which accept an external log-sum-exp); ``torch`` is plain matmul/exp code that runs
on any device and dtype. ``resolve_kernel`` is the one place that decides which one ``"auto"`` means.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNELS = ("auto", "fused", "torch")
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def fused_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def resolve_kernel(kernel: str, q: Tensor) -> str:
    if kernel == "auto":
        if q.device.type == "cpu" and q.dtype in FUSED_DTYPES and fused_available():
            return "fused"
        return "torch"
    return kernel


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


def fused_forward(q, k, v, allowed, scale):
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


def fused_backward(dout, q, k, v, out, lse, allowed, scale):
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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_forward(q, k, v, allowed, scale):
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
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


def torch_backward(dout, q, k, v, out, lse, allowed, scale):
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
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


TILE_KERNELS = {"fused": (fused_forward, fused_backward), "torch": (torch_forward, torch_backward)}
