"""Naive softmax attention: the N×N bottleneck itself, and the float64 oracle of every test."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import Mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None = None,
                        scale: float | None = None) -> Tensor:
    """softmax(Q Kᵀ · scale + mask) V with the full (B, H, Nq, Nk) score matrix.

    Equivalent PyTorch code, with K/V repeated to Hq heads for GQA::

        s = q @ k.transpose(-1, -2) * scale            # (B, H, Nq, Nk)
        s = s.masked_fill(~allowed, -inf)
        p = softmax(s, -1).nan_to_num(0)               # empty rows -> zeros
        out = p @ v                                    # (B, H, Nq, D)
    """
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * nq, D)  # (B, Hkv, G·Nq, D): query heads sharing a KV head
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (B, Hkv, G·Nq, Nk)
    s = s.reshape(B, Hq, nq, nk)  # (B, Hq, Nq, Nk)
    if mask is not None:
        allowed = mask.to_dense(nq, nk, batch=B, heads=Hq).to(q.device)
        s = s.masked_fill(~allowed, -math.inf)
    # A row with nothing allowed would be NaN after softmax; it attends to nothing: zeros.
    empty = torch.isneginf(s).all(-1, keepdim=True) if mask is not None else None
    if empty is not None:
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    out = torch.matmul(p.reshape(B, Hkv, G * nq, nk), v)  # (B, Hkv, G·Nq, D)
    return out.reshape(B, Hq, nq, D)
