"""Naive softmax attention: the N×N bottleneck itself, and the float64 oracle of every test."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .masks import Mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None = None,
                        scale: float | None = None, score_mod: Callable | None = None,
                        sinks: Tensor | None = None, dropout_p: float = 0.0,
                        dropout_seed: Any = None, return_lse: bool = False):
    """softmax(score_mod(Q Kᵀ · scale) + mask) V with the full (B, H, Nq, Nk) score matrix.

    Equivalent PyTorch code, with K/V repeated to Hq heads for GQA::

        s = q @ k.transpose(-1, -2) * scale            # (B, H, Nq, Nk)
        s = score_mod(s, b, h, q_idx, kv_idx)          # broadcast aranges, raw indices
        s = s.masked_fill(~allowed, -inf)
        s = cat([s, sinks[h] per row], -1)             # the sink column: denominator only
        p = softmax(s, -1)[..., :Nk].nan_to_num(0)     # empty rows -> zeros
        out = (p * Z) @ v                              # Z: attnmem.scores.dropout_mask
    """
    from .kernels import dropout_keep, make_mods

    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * nq, D)  # (B, Hkv, G·Nq, D): query heads sharing a KV head
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (B, Hkv, G·Nq, Nk)
    s = s.reshape(B, Hq, nq, nk)  # (B, Hq, Nq, Nk)
    dev = q.device
    idx = (torch.arange(B, device=dev)[:, None, None, None], torch.arange(Hq, device=dev)[None, :, None, None],
           torch.arange(nq, device=dev)[None, None, :, None], torch.arange(nk, device=dev)[None, None, None, :])
    if score_mod is not None:
        s = score_mod(s, *idx).to(s.dtype).expand(s.shape)
    if mask is not None:
        allowed = mask.to_dense(nq, nk, batch=B, heads=Hq).to(q.device)
        s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink_col = sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, nq, 1)
        s = torch.cat([s, sink_col], -1)  # (B, Hq, Nq, Nk + 1)
    # A row with nothing allowed would be NaN after softmax; it attends to nothing: zeros.
    # Only a mask or a score_mod can empty a row: without them no (B, H, Nq, Nk) copy or row
    # flags are made, so the reference's memory stays S, P and their gradients.
    empty = torch.isneginf(s).all(-1, keepdim=True) if mask is not None or score_mod is not None else None
    if empty is not None:
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    p = p[..., :nk]  # without sinks: all of it, a view
    if dropout_p:
        mods = make_mods(None, dropout_p, dropout_seed, q)
        p = p * dropout_keep(mods.dropout_seed, dropout_p, *idx).to(p.dtype)
    out = torch.matmul(p.reshape(B, Hkv, G * nq, nk), v)  # (B, Hkv, G·Nq, D)
    out = out.reshape(B, Hq, nq, D)
    if return_lse:
        lse = torch.logsumexp(s, -1)
        if empty is not None:
            lse = lse.masked_fill(empty.squeeze(-1), -math.inf)
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out
