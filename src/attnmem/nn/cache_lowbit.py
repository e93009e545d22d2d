"""KIVI-style 4- and 2-bit caches (Liu et al., 2024): keys per channel, values per token.

Keys of a head have outlier *channels*, values do not: so keys are quantised per channel over
groups of ``group`` consecutive tokens, values per token over groups of ``value_group``
channels. Each group is quantised asymmetrically to b bits::

    lo, hi = min(x), max(x) over the group;  step = (hi - lo) / (2^b - 1)
    code = round((x - lo) / step) in 0 .. 2^b - 1;  x̂ = code · step + lo

so every element is within half a step of its value: ``|x - x̂| <= step / 2`` (plus the float
rounding of the last line, a few ulps of max |x|). The codes are packed 8/b to a byte; each
group stores its step and lo in the cache's dtype. The ``residual`` most recent tokens (and
those that do not yet fill a key group: at most ``residual + group - 1``) stay in full
precision, and a decoded token reads them as they are; older tokens are quantised a key group at
a time. With ``residual`` at least the context nothing is ever quantised and the cache is the
``full`` cache.

Bytes per token and KV head, D = head_dim, s = the dtype's bytes:
``2·D·b/8 + 2·s·D/group (keys' step and lo) + 2·s·D/value_group (values')``. At D = 64, float32,
group = value_group = 32: 0.1875× the float32 cache for 4 bits, 0.125× for 2 bits.

The prefill attends with the float keys/values it was given, as the ``int8`` cache does. Each
later token attends (causal softmax, scale 1/√D) to the dequantised cache, ``LOWBIT_KV_BLOCK``
tokens at a time with an online softmax, so no float copy of the whole cache is ever made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..checks import check_positive_int
from .cache import FoldedMods, LayerCache, RunningSoftmax, buffers_nbytes, grow_buffer, register_kind

# Quantised tokens dequantised at a time while decoding (rounded up to whole key groups).
LOWBIT_KV_BLOCK = 4096


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric ``bits``-bit quantisation of x over ``dim``: (codes uint8, step, lo).

    ``step`` and ``lo`` keep ``dim`` with size 1; ``codes · step + lo`` is within ``step / 2`` of x.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    step = (x.amax(dim=dim, keepdim=True) - lo) / qmax
    safe = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0, x̂ = lo
    codes = torch.round((x - lo) / safe).clamp(0, qmax).to(torch.uint8)
    return codes, step, lo


def pack(codes: Tensor, bits: int) -> Tensor:
    """(..., D) codes below 2^bits -> (..., D·bits/8) uint8, 8/bits codes per byte, first code lowest."""
    per = 8 // bits
    grouped = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))  # (..., D/per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack``: (..., D·bits/8) uint8 -> (..., D) codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., D·bits/8, 8/bits)
    return codes.reshape(packed.shape[:-1] + (-1,))


class LowBitKVCache(LayerCache):
    """Base of ``int4`` and ``int2``; see the module docstring for the definition.

    Args:
        group: tokens per key group (default 32, KIVI's).
        value_group: channels per value group (default ``min(group, head_dim)``); divides head_dim.
        residual: recent tokens always kept in full precision (default 128, KIVI's), an int >= 0.
        max_len: preallocate for that many tokens and make going past it an error.
    """

    bits = 0
    decodes_mods = ("score_mod", "sinks")

    def __init__(self, *, kv_heads: int, head_dim: int, group: int = 32, value_group: int | None = None,
                 residual: int = 128, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        check_positive_int("group", group)
        value_group = min(group, head_dim) if value_group is None else value_group
        check_positive_int("value_group", value_group)
        if head_dim % value_group:
            raise ValueError(f"value_group must divide head_dim={head_dim}, got {value_group}")
        if head_dim % (8 // self.bits):
            raise ValueError(f"{self.kind}: head_dim must be a multiple of {8 // self.bits} "
                             f"({8 // self.bits} codes share a byte), got {head_dim}")
        if not isinstance(residual, int) or isinstance(residual, bool) or residual < 0:
            raise ValueError(f"residual must be an int >= 0, got {residual!r}")
        self.group, self.value_group, self.residual = group, value_group, residual
        self.quantized = 0  # tokens in the quantised part, a multiple of group
        self.k_codes: Tensor | None = None  # (B, Hkv, capacity, D·b/8) uint8
        self.v_codes: Tensor | None = None
        self.k_step: Tensor | None = None  # (B, Hkv, capacity / group, D): per key group and channel
        self.k_lo: Tensor | None = None
        self.v_step: Tensor | None = None  # (B, Hkv, capacity, D / value_group): per token and group
        self.v_lo: Tensor | None = None
        self.k_res: Tensor | None = None  # (B, Hkv, r, D) full precision, the most recent r tokens
        self.v_res: Tensor | None = None

    @classmethod
    def predict_nbytes(cls, *, batch: int, kv_heads: int, head_dim: int, seq_len: int, item: int, group: int = 32,
                       value_group: int | None = None, residual: int = 128) -> int:
        """One layer's bytes holding ``seq_len`` tokens, preallocated with ``max_len=seq_len``:
        the quantised part (packed codes, step and lo per group) and the full-precision residual."""
        value_group = min(group, head_dim) if value_group is None else value_group
        quantized = max(0, (seq_len - residual) // group) * group
        codes = 2 * quantized * head_dim * cls.bits // 8
        scales = 2 * item * (quantized // group * head_dim + quantized * (head_dim // value_group))
        return batch * kv_heads * (codes + scales + 2 * (seq_len - quantized) * head_dim * item)

    def _quantized_capacity(self) -> int | None:
        """Most tokens the quantised part can ever hold under ``max_len`` (None: no limit)."""
        if self.max_len is None:
            return None
        return max(0, (self.max_len - self.residual) // self.group) * self.group

    def append(self, k: Tensor, v: Tensor) -> None:
        self._check_new(k, v)
        if self.k_res is not None:
            k, v = torch.cat([self.k_res, k], dim=2), torch.cat([self.v_res, v], dim=2)  # (B, Hkv, r + n, D)
        T = max(0, (k.shape[2] - self.residual) // self.group) * self.group  # tokens to quantise now
        if T:
            self._store(k[:, :, :T], v[:, :, :T])
        # Copies, not views: a view would keep the whole float block alive.
        self.k_res, self.v_res = k[:, :, T:].clone(), v[:, :, T:].clone()
        self.length = self.quantized + self.k_res.shape[2]

    def _store(self, k: Tensor, v: Tensor) -> None:
        """Quantise T = m·group tokens (B, Hkv, T, D) and add them to the quantised part."""
        B, H, T, D = k.shape
        G, m = self.group, T // self.group
        a, b = self.quantized, self.quantized + T
        cap = self._quantized_capacity()
        k_codes, k_step, k_lo = quantize(k.reshape(B, H, m, G, D), self.bits, dim=3)  # step, lo: (B, H, m, 1, D)
        v_codes, v_step, v_lo = quantize(v.reshape(B, H, T, D // self.value_group, self.value_group),
                                         self.bits, dim=4)  # step, lo: (B, H, T, D/Gv, 1)
        parts = {"k_codes": (pack(k_codes.reshape(B, H, T, D), self.bits), a, b, cap),
                 "v_codes": (pack(v_codes.reshape(B, H, T, D), self.bits), a, b, cap),
                 "k_step": (k_step[:, :, :, 0], a // G, b // G, cap and cap // G),
                 "k_lo": (k_lo[:, :, :, 0], a // G, b // G, cap and cap // G),
                 "v_step": (v_step[..., 0], a, b, cap), "v_lo": (v_lo[..., 0], a, b, cap)}
        for name, (val, start, end, limit) in parts.items():
            buf = grow_buffer(getattr(self, name), val, end, limit)
            buf[:, :, start:end] = val
            setattr(self, name, buf)
        self.quantized = b

    def dequantized_blocks(self, block: int = LOWBIT_KV_BLOCK) -> Iterator[tuple[Tensor, Tensor]]:
        """The quantised part, oldest first, as float (B, Hkv, t, D) key and value blocks."""
        G = self.group
        block = max(G, block // G * G)
        for a in range(0, self.quantized, block):
            b = min(a + block, self.quantized)
            B, H, t = self.k_codes.shape[0], self.kv_heads, b - a
            kc = unpack(self.k_codes[:, :, a:b], self.bits).reshape(B, H, t // G, G, self.head_dim)
            keys = kc * self.k_step[:, :, a // G:b // G, None] + self.k_lo[:, :, a // G:b // G, None]
            vc = unpack(self.v_codes[:, :, a:b], self.bits).reshape(B, H, t, -1, self.value_group)
            values = vc * self.v_step[:, :, a:b, :, None] + self.v_lo[:, :, a:b, :, None]
            yield keys.reshape(B, H, t, self.head_dim), values.reshape(B, H, t, self.head_dim)

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """Every held token as the decoder sees it (dequantised, then the residual): (B, Hkv, length, D)."""
        blocks = list(self.dequantized_blocks()) + [(self.k_res, self.v_res)]
        return torch.cat([b[0] for b in blocks], dim=2), torch.cat([b[1] for b in blocks], dim=2)

    def attend(self, mha: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check_stateless_module(mha)
        self._check_new(k, v)
        if self.length == 0:
            out = mha.attend(q, k, v)  # the prefill: the method's own path, on the float keys/values
            self.append(k, v)
            return out
        outs = []
        for i in range(q.shape[2]):  # one token at a time: each sees the cache as it then is
            self.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
            outs.append(self._decode(q[:, :, i:i + 1], mha))
        return torch.cat(outs, dim=2)

    def _decode(self, q: Tensor, mha: Any) -> Tensor:
        """One new query (B, Hq, 1, D) over every held token, block by block (online softmax),
        with the layer's score_mod and sinks."""
        B, Hq, _, D = q.shape
        qg = q.reshape(B, self.kv_heads, Hq // self.kv_heads, D) / math.sqrt(D)  # (B, Hkv, G, D)
        mods = FoldedMods(mha, q, self.length - 1)
        run = RunningSoftmax(qg)
        blocks = self.dequantized_blocks()
        first = 0  # position of the block's first key
        for keys, values in (*blocks, (self.k_res, self.v_res)):
            if keys.shape[2] == 0:
                continue
            s = mods.scores(qg @ keys.to(q.dtype).transpose(-1, -2), first)  # (B, Hkv, G, t)
            run.add(s, values.to(q.dtype))
            first += keys.shape[2]
        return run.output(mods.sinks).reshape(B, Hq, 1, D)

    def nbytes(self) -> int:
        return buffers_nbytes(self.k_codes, self.v_codes, self.k_step, self.k_lo, self.v_step, self.v_lo,
                               self.k_res, self.v_res)


@register_kind
class Int4KVCache(LowBitKVCache):
    """KIVI-style 4-bit cache: keys per channel in token groups, values per token in channel
    groups, a full-precision residual window; see ``attnmem.nn.cache_lowbit``."""

    kind = "int4"
    bits = 4


@register_kind
class Int2KVCache(LowBitKVCache):
    """KIVI-style 2-bit cache: keys per channel in token groups, values per token in channel
    groups, a full-precision residual window; see ``attnmem.nn.cache_lowbit``."""

    kind = "int2"
    bits = 2
