"""Exact attention: the quadratic reference, PyTorch SDPA, and the O(N) tiled kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import KERNELS, tiled_attention
from ..masks import Dense
from ..reference import reference_attention
from ..registry import Inputs, Method, register


@register
class Reference(Method):
    name = "reference"
    family = "exact"
    exact = True
    quadratic = True
    memory = "O(B·H·N²): the full score and probability matrices"
    summary = "softmax(QKᵀ)V with the N×N matrix; the bottleneck itself and the test oracle"

    def forward(self, inp: Inputs, opts) -> torch.Tensor:
        return reference_attention(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale)


@register
class SDPA(Method):
    name = "sdpa"
    family = "exact"
    exact = True
    memory = "O(B·H·N·D) without a mask; a dense mask is O(B·H·N²) and computes every score"
    # A dense mask is kept for explicit use (the benchmarks' "dense mask" peer); auto never
    # passes one here because SDPA turns it into an N×N float bias.
    summary = "torch.nn.functional.scaled_dot_product_attention (fused kernels)"
    def extra_reasons(self, inp, opts):
        reasons = []
        if inp.q_heads != inp.kv_heads and inp.q.device.type != "cuda":
            # On CPU, enable_gqa repeats K/V to Hq heads in memory; CUDA kernels index them.
            reasons.append(f"would expand K/V from {inp.kv_heads} to {inp.q_heads} heads on CPU")
        if inp.user_mask is not None and not isinstance(inp.user_mask, Dense):
            reasons.append(f"mask {inp.user_mask!r} would have to be materialised as an N×N tensor")
        if isinstance(inp.user_mask, Dense) and inp.causal:
            reasons.append("does not combine causal=True with a mask")
        if inp.causal and inp.nq != inp.nk:
            reasons.append(
                f"is_causal is top-left aligned; attnmem's causal is bottom-right (Nq={inp.nq} != Nk={inp.nk})"
            )
        return reasons

    def quadratic_reason(self, inp):
        if isinstance(inp.user_mask, Dense):
            return "turns a bool mask into an N×N float bias and computes every score"
        return None

    def forward(self, inp, opts):
        mask = inp.user_mask.tensor.to(inp.q.device) if isinstance(inp.user_mask, Dense) else None
        gqa = {"enable_gqa": True} if inp.q_heads != inp.kv_heads else {}
        if mask is None or inp.nk == 0:
            return F.scaled_dot_product_attention(
                inp.q, inp.k, inp.v, attn_mask=None, is_causal=inp.causal and inp.nq > 0,
                scale=inp.scale, **gqa,
            )
        out = F.scaled_dot_product_attention(inp.q, inp.k, inp.v, attn_mask=mask, scale=inp.scale, **gqa)
        # SDPA returns NaN for rows with nothing allowed; attnmem's contract is zeros.
        empty = ~mask.any(-1, keepdim=True)
        return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


@dataclass(frozen=True)
class ChunkedOptions:
    """Tile sizes of the block map, and which tile kernel computes each segment.

    q_tile, kv_tile: positive ints (default 256). kernel: "auto" (the fused CPU operator where
    it applies, else plain PyTorch), "fused" or "torch".

    With the fused operator, no mask, or plain causal on a square problem without GQA, is one
    operator call over everything (the operator tiles and skips empty blocks itself); other
    masks run tile by tile over their block map.
    """

    q_tile: int = 256
    kv_tile: int = 256
    kernel: str = "auto"

    def __post_init__(self):
        for name in ("q_tile", "kv_tile"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


@register
class Chunked(Method):
    name = "chunked"
    family = "exact"
    exact = True
    memory = "O(B·H·N·D) + O(B·H·N) log-sum-exp; empty tiles skipped"
    summary = "FlashAttention-style tiles with online softmax and recomputing backward, any mask"
    Options = ChunkedOptions

    def extra_reasons(self, inp, opts):
        if opts.kernel == "fused" and inp.q.device.type != "cpu":
            return ["kernel='fused' runs on CPU only"]
        if opts.kernel == "fused" and inp.q.dtype == torch.float16:
            return ["kernel='fused' does not support float16"]
        return []

    def forward(self, inp, opts):
        return tiled_attention(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale,
                               q_tile=opts.q_tile, kv_tile=opts.kv_tile, kernel=opts.kernel)
