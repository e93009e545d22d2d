"""Exact attention: the quadratic reference, PyTorch SDPA, and the O(N) tiled kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import KERNELS, flex_attention, flex_available, flex_safe, tiled_attention
from ..masks import Dense
from ..reference import reference_attention
from ..registry import Capabilities, Inputs, Method, register


@register
class Reference(Method):
    name = "reference"
    family = "exact"
    exact = True
    quadratic = True
    memory = "O(B·H·N²): the full score and probability matrices"
    summary = "softmax(QKᵀ)V with the N×N matrix; the bottleneck itself and the test oracle"

    caps = Capabilities(score_mod=True, sinks=True, dropout=True, return_lse=True)

    def forward(self, inp: Inputs, opts) -> torch.Tensor:
        return reference_attention(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale, **mods_kwargs(inp))


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
    check_options = {"q_tile": 16, "kv_tile": 16}
    family = "exact"
    exact = True
    memory = "O(B·H·N·D) + O(B·H·N) log-sum-exp; empty tiles skipped"
    summary = "FlashAttention-style tiles with online softmax and recomputing backward, any mask"
    Options = ChunkedOptions

    caps = Capabilities(score_mod=True, sinks=True, dropout=True, return_lse=True)

    def extra_reasons(self, inp, opts):
        return fused_reasons(inp, opts)

    def forward(self, inp, opts):
        if flex_score_mod_applies(inp):  # pragma: no cover - needs CUDA
            return flex_attention(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale, score_mod=inp.score_mod)
        return tiled_attention(inp.q, inp.k, inp.v, mask=inp.mask, scale=inp.scale,
                               q_tile=opts.q_tile, kv_tile=opts.kv_tile, kernel=opts.kernel,
                               **mods_kwargs(inp))


def mods_kwargs(inp: Inputs) -> dict:
    """The score modifications of a call, as keyword arguments of the tiled kernel."""
    return {"score_mod": inp.score_mod, "sinks": inp.sinks, "dropout_p": inp.dropout_p,
            "dropout_seed": inp.dropout_seed, "return_lse": inp.return_lse}


def fused_reasons(inp: Inputs, opts) -> list[str]:
    """Why ``kernel='fused'`` (the CPU operator) cannot run this call, if it cannot."""
    if opts.kernel != "fused":
        return []
    if inp.q.device.type != "cpu":
        return ["kernel='fused' runs on CPU only"]
    if inp.q.dtype == torch.float16:
        return ["kernel='fused' does not support float16"]
    if inp.score_mod is not None or inp.dropout_p:
        return ["kernel='fused' cannot apply a score_mod or dropout_p (kernel='auto' or 'torch' can)"]
    return []


def flex_score_mod_applies(inp: Inputs) -> bool:
    """On CUDA a score_mod goes to FlexAttention (same signature), when nothing else needs the
    tiled path: no sinks, dropout or lse, and a mask FlexAttention can trace."""
    return (inp.q.is_cuda and inp.score_mod is not None and flex_available() and inp.sinks is None
            and not inp.dropout_p and not inp.return_lse and (inp.mask is None or flex_safe(inp.mask)))
