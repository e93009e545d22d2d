"""Decoding caches: what a layer keeps of past tokens, and how new tokens attend to it.

At inference the score matrix is gone (one query row per step) and the memory that grows is
the cache of past keys and values. Each cache kind changes it differently:

==================  ===========================================  ==========================
kind                stores (per layer)                           bytes, in context length L
==================  ===========================================  ==========================
``full``            K and V of every token, only the Hkv heads   O(L · Hkv · D)
``int8``            K, V as int8 + one scale per head and token  O(L · Hkv · (D + 4)) bytes
``sliding_window``  ring buffer of the last ``window`` tokens    O(window · Hkv · D)
``linear_state``    S = Σ φ(k) vᵀ (F × D) and z = Σ φ(k) per head O(1)
==================  ===========================================  ==========================

A cache defines the attention its layer does at decode time: ``full`` and ``int8`` are causal
softmax attention, ``sliding_window`` is causal softmax attention within the window
(``attnmem.attention(..., method="chunked", causal=True, mask=masks.sliding_window(w, 0))``),
and ``linear_state`` is causal linear attention ``φ(q)ᵀS / φ(q)ᵀz`` (Katharopoulos et al.,
2020). Pick the kind that matches the model's method: each method names its own
(``Method.decode_cache``, read by ``default_kind``; ``linear`` and ``performer`` use
``linear_state``; pass the method's own feature map as ``feature_map``).

A layer's ``score_mod`` and ``sinks`` apply at every step of ``full``, ``int8`` and
``sliding_window`` (and of ``paged``, ``int4``, ``int2``), the new tokens at their sequence
positions (``attnmem.scores.shift_positions``), so a decode reproduces the layer's own
forward; ``linear_state`` and the eviction kinds refuse such a layer (``LayerCache.decodes_mods``).

Every layer cache takes ``attend(mha, q, k, v)`` — queries (B, Hq, n, D) of ``n`` new tokens and
their keys/values (B, Hkv, n, D) — stores the new tokens and returns (B, Hq, n, D). The first call
on an empty cache (the prefill) runs the method's full-sequence path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import masks, registry
from ..api import attention
from ..checks import check_positive_int
from ..scores import shift_positions


def default_kind(method: str) -> str | None:
    """The cache kind that reproduces ``method``'s attention at decode time: the method's own
    ``decode_cache`` (``Method.decode_cache``; "auto" decodes with the full cache), or None.

    Wiring ``linear``/``performer`` to ``linear_state``: pass the method's key and query feature
    maps as ``feature_map``/``query_map`` and ``eps=0`` where the method only guards exact-zero
    denominators. A FAVOR+ key stabiliser fitted over all keys must be frozen at the prefill
    (S and z scale by exp(old - new) if it is ever raised).
    """
    if method == "auto":
        return "full"
    return registry.get(method).decode_cache


# Keys of the int8 cache are dequantised this many at a time, so a step never holds a float
# copy of the whole cache; ``folded_attention`` reads any cache this many keys at a time.
KV_BLOCK = 4096
# A decode step with a score_mod or sinks folds its rows (``folded_attention``) up to this many
# query rows (G·n); more new tokens at once take ``attnmem.attention``'s tiled path.
FOLDED_ROWS = 256
INT8_MAX = 127.0


def elu_feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1, the positive feature map of Katharopoulos et al. (2020)."""
    return F.elu(x) + 1.0


class LayerCache:
    """Base class of one layer's cache. Subclasses implement ``append``, ``attend``, ``nbytes``."""

    kind = ""
    # The layer modifications ("score_mod", "sinks") this kind's decode step applies; a layer
    # with any other is refused (``check_module``).
    decodes_mods: tuple[str, ...] = ()

    def __init__(self, *, kv_heads: int, head_dim: int, max_len: int | None = None):
        check_positive_int("kv_heads", kv_heads)
        check_positive_int("head_dim", head_dim)
        check_positive_int("max_len", max_len, allow_none=True)
        self.kv_heads, self.head_dim, self.max_len = kv_heads, head_dim, max_len
        self.length = 0  # tokens seen so far
        self.batch: int | None = None

    # --- checks shared by every kind ------------------------------------------------------
    def check_module(self, mha: Any) -> None:
        """ValueError when this cache was built for another layer shape, a non-causal layer, or a
        layer with a ``score_mod`` or ``sinks`` this kind's decode step would leave out (not in
        its ``decodes_mods``)."""
        if (mha.kv_heads, mha.head_dim) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"cache was built for kv_heads={self.kv_heads}, head_dim={self.head_dim}; this layer has "
                f"kv_heads={mha.kv_heads}, head_dim={mha.head_dim} (a cache from another model shape?)"
            )
        if not mha.causal:
            raise ValueError("decoding with a cache needs a causal layer (causal=True)")
        mods = [n for n, mod in (("score_mod", mha.score_mod), ("sinks", mha.sinks))
                if mod is not None and n not in self.decodes_mods]
        if mods:  # the decode step attends without them: refuse rather than decode another model
            raise ValueError(f"the {self.kind!r} cache cannot apply this layer's {' and '.join(mods)} when "
                             "decoding; use the 'full' cache, or run the model on the whole sequence "
                             "without a cache")

    def check_stateless_module(self, mha: Any) -> None:
        """``check_module``, and ValueError when the layer's method has learned state, which a
        cache of keys and values (however they are held) cannot stand in for."""
        self.check_module(mha)
        if mha.inner is not None:
            raise ValueError(f"method {mha.method!r} has learned state; a {self.kind!r} cache cannot decode it")

    def _check_new(self, k: Tensor, v: Tensor) -> None:
        if k.dim() != 4 or k.shape != v.shape or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(
                f"k and v must have shape (B, {self.kv_heads}, n, {self.head_dim}), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if self.batch is not None and k.shape[0] != self.batch:
            raise ValueError(f"cache holds batch size {self.batch}, got new tokens with batch size {k.shape[0]}")
        n = k.shape[2]
        if self.max_len is not None and self.length + n > self.max_len:
            raise ValueError(
                f"cache max_len={self.max_len} exceeded: it holds {self.length} tokens, got {n} more"
            )
        self.batch = k.shape[0]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store keys/values (B, Hkv, n, D) of ``n`` new tokens without attending."""
        raise NotImplementedError

    def attend(self, mha: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds (allocated capacity, not just the used part)."""
        raise NotImplementedError

    @classmethod
    def model_cache(cls, *, layers: int, kv_heads: int, head_dim: int, max_len: int | None = None,
                    **options: Any) -> ModelCache:
        """A ``ModelCache`` of ``layers`` caches of this kind (kinds whose layers share state override it)."""
        return ModelCache([cls(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len, **options)
                           for _ in range(layers)], max_len=max_len)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"length={self.length}, nbytes={self.nbytes()})")


def grow_buffer(buf: Tensor | None, like: Tensor, need: int, max_len: int | None) -> Tensor:
    """A (B, H, capacity, X) buffer holding at least ``need`` tokens; grows by doubling."""
    cap = 0 if buf is None else buf.shape[2]
    if need <= cap:
        return buf
    new_cap = max_len if max_len is not None else max(need, 2 * cap, 16)
    B, H, _, X = like.shape
    out = torch.empty(B, H, new_cap, X, dtype=like.dtype, device=like.device)
    if buf is not None:
        out[:, :, :cap] = buf
    return out


def layer_mods(mha: Any, q: Tensor, q_shift: int, kv_shift: int = 0) -> dict[str, Any]:
    """The layer's ``score_mod`` (shifted to the positions of its queries and keys,
    ``attnmem.scores.shift_positions``) and ``sinks``, as ``attnmem.attention`` keywords."""
    mods: dict[str, Any] = {}
    if mha.score_mod is not None:
        mods["score_mod"] = shift_positions(mha.score_mod, q_shift, kv_shift)
    if mha.sinks is not None:
        mods["sinks"] = mha.sinks.to(q.dtype)
    return mods


def attend_new(q: Tensor, keys: Tensor, values: Tensor, *, mods: dict[str, Any] | None = None,
               **window: Any) -> Tensor:
    """Causal attention of the last n tokens q (B, Hq, n, D) over keys/values (B, Hkv, L, D),
    with the layer's ``mods`` (``layer_mods``) if any.

    One new token sees every key it is given, so causality (and the window, whose keys the
    caller already cut) is a no-op; without mods the query heads of a KV group then fold into
    rows, so SDPA serves GQA without repeating K/V (a score_mod reads the head: no folding).
    """
    B, Hq, n, D = q.shape
    Hkv = keys.shape[1]
    mods = mods or {}
    if n == 1 and not mods:
        out = attention(q.reshape(B, Hkv, Hq // Hkv, D), keys, values)  # (B, Hkv, G, D)
        return out.reshape(B, Hq, 1, D)
    if window:
        return attention(q, keys, values, method="chunked", causal=True, **window, **mods)
    return attention(q, keys, values, causal=True, **mods)


class FoldedMods:
    """A layer's score_mod and sinks on the rows of a blockwise decode, which stacks the G
    query heads of a KV group as rows: scores (B, Hkv, G·n, t), row g·n + i being query head
    kv·G + g of new token i, at sequence position ``q_first + i``."""

    def __init__(self, mha: Any, q: Tensor, q_first: int):
        B, Hq, n, _ = q.shape
        Hkv, dev = mha.kv_heads, q.device
        self.shape = (B, Hq, n)
        self.score_mod = None if mha.score_mod is None else shift_positions(mha.score_mod, q_first)
        if self.score_mod is not None:  # the broadcast indices it is called with
            self.b = torch.arange(B, device=dev).view(B, 1, 1, 1)
            self.h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
            self.q_idx = torch.arange(n, device=dev).view(1, 1, n, 1)
        self.sinks = None  # (Hkv, G·n, 1): each row's sink logit
        if mha.sinks is not None:
            self.sinks = mha.sinks.to(q.dtype).view(Hkv, Hq // Hkv, 1, 1).expand(-1, -1, n, 1).reshape(Hkv, -1, 1)

    def scores(self, s: Tensor, kv_first: int) -> Tensor:
        """The scaled scores ``s`` (B, Hkv, G·n, t) of keys at positions kv_first .. kv_first + t - 1,
        modified (before any mask, as ``attnmem.attention`` orders them)."""
        if self.score_mod is None:
            return s
        B, Hq, n = self.shape
        t = s.shape[-1]
        kv_idx = torch.arange(kv_first, kv_first + t, device=s.device).view(1, 1, 1, t)
        return self.score_mod(s.reshape(B, Hq, n, t), self.b, self.h, self.q_idx, kv_idx).reshape(s.shape)


def folded_attention(q: Tensor, keys: Tensor, values: Tensor, mods: FoldedMods, *, kv_first: int = 0,
                     window: int | None = None, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                     block: int | None = None) -> Tensor:
    """Causal softmax attention of the last n tokens q (B, Hq, n, D) over keys/values
    (B, Hkv, L, D) at positions kv_first .. kv_first + L - 1, with the layer's ``mods``
    (``FoldedMods``), ``block`` keys at a time (online softmax; default ``KV_BLOCK``).

    The G query heads of a KV group fold into rows (no repeated K/V). ``window``: a new token
    at position p also skips keys before p - window (``masks.sliding_window(window, 0)``).
    ``k_scale``/``v_scale`` (B, Hkv, L, 1): per-token scales of quantised keys/values, applied
    to the (G·n, block) scores and probabilities rather than to the (block, D) keys and values.
    """
    B, Hq, n, D = q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    G, block = Hq // Hkv, block or KV_BLOCK
    qg = q.reshape(B, Hkv, G * n, D)  # (B, Hkv, G·n, D)
    scale = 1.0 / math.sqrt(D)
    if k_scale is None:
        qg = qg * scale
    # Row r is token r % n, at key index L - n + r % n; it sees keys at indices <= that.
    row = (L - n) + torch.arange(G * n, device=q.device) % n  # (G·n,)
    run = RunningSoftmax(qg)
    for a in range(0, L, block):
        b = min(a + block, L)
        s = qg @ keys[:, :, a:b].to(q.dtype).transpose(-1, -2)  # (B, Hkv, G·n, blk)
        if k_scale is not None:
            s = s * (k_scale[:, :, a:b, 0].to(q.dtype)[:, :, None, :] * scale)
        s = mods.scores(s, kv_first + a)
        # Only the tail block holds keys a new token must not see, and a window's first keys.
        if b - 1 > L - n or (window is not None and a < L - 1 - window):
            j = torch.arange(a, b, device=q.device)[None, :]
            keep = j <= row[:, None]
            if window is not None:
                keep &= j >= row[:, None] - window
            s = s.masked_fill(~keep, -math.inf)
        p_scale = None if v_scale is None else v_scale[:, :, a:b, 0].to(q.dtype)[:, :, None, :]
        run.add(s, values[:, :, a:b].to(q.dtype), p_scale)
    return run.output(mods.sinks).reshape(B, Hq, n, D)  # every row sees a key (its own)


def decode_step(mha: Any, q: Tensor, keys: Tensor, values: Tensor, *, kv_first: int = 0,
                window: int | None = None) -> Tensor:
    """Causal attention of the last n tokens q (B, Hq, n, D) over keys/values (B, Hkv, L, D)
    at positions kv_first .. kv_first + L - 1, with the layer ``mha``'s score_mod and sinks;
    ``window``: also ``masks.sliding_window(window, 0)``.

    Without mods, ``attend_new``; with them, ``folded_attention`` (no kernel set up per step)
    up to ``FOLDED_ROWS`` query rows, else ``attend_new`` with the mods shifted to the positions.
    """
    n = q.shape[2]
    mask = {} if window is None else {"mask": masks.sliding_window(window, 0)}
    if mha.score_mod is None and mha.sinks is None:
        return attend_new(q, keys, values, **mask)
    q_first = kv_first + keys.shape[2] - n
    if q.shape[1] // keys.shape[1] * n > FOLDED_ROWS:
        return attend_new(q, keys, values, mods=layer_mods(mha, q, q_first, kv_first), **mask)
    return folded_attention(q, keys, values, FoldedMods(mha, q, q_first), kv_first=kv_first, window=window)


class RunningSoftmax:
    """``softmax(s) @ V`` over key blocks seen one at a time (online softmax): the running row
    max, row sum and unnormalised output of query rows ``like`` (B, Hkv, R, D)."""

    def __init__(self, like: Tensor):
        self.row_max = torch.full(like.shape[:3] + (1,), -math.inf, dtype=like.dtype, device=like.device)
        self.row_sum = torch.zeros_like(self.row_max)
        self.acc = torch.zeros_like(like)

    def add(self, s: Tensor, values: Tensor, p_scale: Tensor | None = None) -> None:
        """Scores ``s`` (B, Hkv, R, t) of one block and its values (B, Hkv, t, D); ``p_scale``
        multiplies the probabilities (a per-token value scale that factors out of ``p @ V``).
        A row whose scores so far are all -inf (a score_mod may mask) adds nothing."""
        new_max = torch.maximum(self.row_max, s.amax(-1, keepdim=True))
        new_max = new_max.masked_fill(new_max == -math.inf, 0.0)
        p = torch.exp(s - new_max)
        correction = torch.exp(self.row_max - new_max)
        self.row_sum = self.row_sum * correction + p.sum(-1, keepdim=True)
        self.acc = self.acc * correction + (p if p_scale is None else p * p_scale) @ values
        self.row_max = new_max

    def output(self, sinks: Tensor | None = None) -> Tensor:
        """(B, Hkv, R, D); a row that saw no key is zeros.
        ``sinks`` (Hkv, R, 1): each row's sink logit, added to its denominator as
        ``exp(sink)`` (``attnmem.attention(sinks=...)``)."""
        if sinks is None:  # a row that saw no key (a score_mod masked all) is zeros, as attention's
            return self.acc / self.row_sum.masked_fill(self.row_sum == 0, 1.0)
        top = torch.maximum(self.row_max, sinks)
        correction = torch.exp(self.row_max - top)
        return self.acc * correction / (self.row_sum * correction + torch.exp(sinks - top))


def buffers_nbytes(*bufs: Tensor | None) -> int:
    return sum(b.numel() * b.element_size() for b in bufs if b is not None)


class KVCache(LayerCache):
    """Keys and values of every past token, Hkv heads only (GQA/MQA store fewer heads).

    ``max_len`` preallocates that many tokens and makes going past it an error; without it the
    buffers grow by doubling. Steps attend with ``attnmem.attention(q, K, V, causal=True)``,
    whose bottom-right alignment lets the new tokens see every cached token and each other causally.

    A layer's ``score_mod`` and ``sinks`` apply at every step: the score_mod sees the new
    tokens at their positions in the sequence (``attnmem.scores.shift_positions``), so decoding
    reproduces the model's full forward (ALiBi, soft-capping, T5's bias, gpt-oss's sinks).
    """

    kind = "full"
    decodes_mods = ("score_mod", "sinks")  # Int8KVCache inherits them (``FoldedMods``)

    def __init__(self, *, kv_heads: int, head_dim: int, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        self.k: Tensor | None = None  # (B, Hkv, capacity, D)
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> None:
        self._check_new(k, v)
        end = self.length + k.shape[2]
        self.k = grow_buffer(self.k, k, end, self.max_len)
        self.v = grow_buffer(self.v, v, end, self.max_len)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The used part of the cache: (B, Hkv, length, D) views."""
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def attend(self, mha, q, k, v):
        self.check_stateless_module(mha)
        prefill = self.length == 0
        self.append(k, v)
        if prefill:
            # The method's full-sequence path, on the float keys/values as given.
            return mha.attend(q, k, v)
        return self._decode(q, mha)

    def _decode(self, q: Tensor, mha: Any) -> Tensor:
        """New queries (B, Hq, n, D) against everything cached, with the layer's mods."""
        return decode_step(mha, q, *self.keys_values())

    def nbytes(self):
        return buffers_nbytes(self.k, self.v)


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, n, D) -> int8 values and one float32 scale per head and token, (B, H, n, 1).

    Symmetric absmax quantisation: ``x ≈ q * scale`` with ``scale = max|x| / 127``; the error of
    each element is at most ``scale / 2``.
    """
    scale = x.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX  # (B, H, n, 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quant = torch.round(x.float() / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quant, scale


class Int8KVCache(KVCache):
    """Like ``KVCache`` but holds int8 keys/values with per-head, per-token float32 scales.

    About a quarter of the float32 cache: D + 4 bytes per head and token instead of 4·D. The
    prefill attends with the float keys/values it was given; later steps read the quantised
    cache, dequantising ``KV_BLOCK`` tokens at a time with an online softmax.
    """

    kind = "int8"

    def __init__(self, *, kv_heads: int, head_dim: int, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        self.k_scale: Tensor | None = None  # (B, Hkv, capacity, 1) float32
        self.v_scale: Tensor | None = None

    def append(self, k, v):
        self._check_new(k, v)
        end = self.length + k.shape[2]
        for name in ("k", "v"):
            quant, scale = quantize_int8(k if name == "k" else v)
            buf = grow_buffer(getattr(self, name), quant, end, self.max_len)
            sbuf = grow_buffer(getattr(self, f"{name}_scale"), scale, end, self.max_len)
            buf[:, :, self.length:end] = quant
            sbuf[:, :, self.length:end] = scale
            setattr(self, name, buf)
            setattr(self, f"{name}_scale", sbuf)
        self.length = end

    def _decode(self, q: Tensor, mha: Any) -> Tensor:
        """Causal softmax attention of q (B, Hq, n, D), the last n tokens, over the int8 cache,
        with the layer's score_mod and sinks."""
        L = self.length
        return folded_attention(q, self.k[:, :, :L], self.v[:, :, :L], FoldedMods(mha, q, L - q.shape[2]),
                                k_scale=self.k_scale[:, :, :L], v_scale=self.v_scale[:, :, :L])

    def nbytes(self):
        return buffers_nbytes(self.k, self.v, self.k_scale, self.v_scale)


class SlidingWindowCache(LayerCache):
    """A ring buffer of the last ``window`` tokens: memory bounded by the window, not the context.

    Token at position p attends to positions p - window .. p, as
    ``attnmem.attention(q, k, v, method="chunked", causal=True, mask=masks.sliding_window(window, 0))``
    does over the whole sequence. Slot ``p % window`` holds token p.
    """

    kind = "sliding_window"
    decodes_mods = ("score_mod", "sinks")

    def __init__(self, *, kv_heads: int, head_dim: int, window: int, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        check_positive_int("window", window)
        self.window = window
        self.k: Tensor | None = None  # (B, Hkv, window, D)
        self.v: Tensor | None = None

    def _ordered(self) -> tuple[Tensor, Tensor]:
        """The held tokens oldest first: (B, Hkv, min(length, window), D) copies."""
        held = min(self.length, self.window)
        slots = (torch.arange(held, device=self.k.device) + (self.length - held)) % self.window
        return self.k.index_select(2, slots), self.v.index_select(2, slots)

    def append(self, k, v):
        self._check_new(k, v)
        if self.k is None:
            B, H, _, D = k.shape
            self.k = torch.zeros(B, H, self.window, D, dtype=k.dtype, device=k.device)
            self.v = torch.zeros_like(self.k)
        n = k.shape[2]
        keep = min(n, self.window)  # older new tokens would be overwritten within this call
        pos = torch.arange(self.length + n - keep, self.length + n, device=k.device)
        self.k[:, :, pos % self.window] = k[:, :, n - keep:]
        self.v[:, :, pos % self.window] = v[:, :, n - keep:]
        self.length += n

    def attend(self, mha, q, k, v):
        self.check_module(mha)
        self._check_new(k, v)
        if self.length == 0:
            keys, values = k, v  # prefill: the whole prompt under the window mask
        else:
            past_k, past_v = self._ordered()
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, ≤w+n, D)
        held = keys.shape[2] - k.shape[2]  # the oldest held key is at position length - held
        out = decode_step(mha, q, keys, values, kv_first=self.length - held, window=self.window)
        self.append(k, v)
        return out

    def nbytes(self):
        return buffers_nbytes(self.k, self.v)


class LinearStateCache(LayerCache):
    """Recurrent state of causal linear attention: S = Σ φ(k) vᵀ (F × D) and z = Σ φ(k), per KV head.

    Output of the token at position i: ``ψ(q_i)ᵀ S_i / (ψ(q_i)ᵀ z_i + eps)`` where S_i, z_i sum
    over positions ≤ i (a denominator that is exactly 0 counts as 1: a row with zero weight on
    every key returns zeros). The state does not grow with the context. ``feature_map`` φ maps
    keys (..., D) to (..., F) features (default ``elu(x) + 1``); ``query_map`` ψ maps queries
    (default φ; FAVOR+ uses a different stabiliser for queries than for keys). Several new
    tokens at once are processed in chunks of ``chunk``: quadratic within a chunk, through the
    state across chunks.
    """

    kind = "linear_state"

    def __init__(self, *, kv_heads: int, head_dim: int, feature_map: Callable[[Tensor], Tensor] | None = None,
                 query_map: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-6, chunk: int = 256,
                 max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        check_positive_int("chunk", chunk)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.feature_map = feature_map or elu_feature_map
        self.query_map = query_map or self.feature_map
        self.eps, self.chunk = float(eps), chunk
        self.state: Tensor | None = None  # S: (B, Hkv, F, D)
        self.norm: Tensor | None = None  # z: (B, Hkv, F)

    def _update(self, phi_k: Tensor, v: Tensor) -> None:
        if self.state is None:
            B, H, _, Fdim = phi_k.shape
            self.state = torch.zeros(B, H, Fdim, v.shape[-1], dtype=v.dtype, device=v.device)
            self.norm = torch.zeros(B, H, Fdim, dtype=v.dtype, device=v.device)
        self.state = self.state + phi_k.transpose(-1, -2) @ v  # (B, Hkv, F, D)
        self.norm = self.norm + phi_k.sum(dim=2)  # (B, Hkv, F)

    def append(self, k, v):
        self._check_new(k, v)
        self._update(self.feature_map(k), v)
        self.length += k.shape[2]

    def attend(self, mha, q, k, v):
        self.check_module(mha)
        self._check_new(k, v)
        B, Hq, n, D = q.shape
        G = Hq // self.kv_heads
        phi_q = self.query_map(q.reshape(B, self.kv_heads, G, n, D))  # (B, Hkv, G, n, F)
        phi_k = self.feature_map(k)  # (B, Hkv, n, F)
        outs = []
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            pq, pk, vc = phi_q[:, :, :, a:b], phi_k[:, :, None, a:b], v[:, :, None, a:b]
            scores = (pq @ pk.transpose(-1, -2)).tril()  # (B, Hkv, G, c, c): within the chunk
            num = scores @ vc  # (B, Hkv, G, c, D)
            den = scores.sum(-1)  # (B, Hkv, G, c)
            if self.state is not None:
                num = num + pq @ self.state[:, :, None]
                den = den + (pq @ self.norm[:, :, None, :, None]).squeeze(-1)
            den = den + self.eps
            outs.append(num / torch.where(den == 0, torch.ones_like(den), den)[..., None])
            self._update(phi_k[:, :, a:b], v[:, :, a:b])
        self.length += n
        return torch.cat(outs, dim=3).reshape(B, Hq, n, D)

    def nbytes(self):
        return buffers_nbytes(self.state, self.norm)


KINDS: dict[str, type[LayerCache]] = {
    c.kind: c for c in (KVCache, Int8KVCache, SlidingWindowCache, LinearStateCache)
}


def register_kind(cls: type[LayerCache]) -> type[LayerCache]:
    """Class decorator: make ``cls`` reachable as ``make_layer_cache(cls.kind, ...)``.

    The eviction, low-bit and paged kinds live in modules of their own (``cache_evict``,
    ``cache_lowbit``, ``cache_paged``) and register here when ``attnmem.nn`` is imported.
    """
    if not cls.kind or cls.kind in KINDS and KINDS[cls.kind] is not cls:
        raise ValueError(f"cache kind {cls.kind!r} of {cls.__name__} is empty or already taken")
    KINDS[cls.kind] = cls
    return cls


def make_layer_cache(kind: str, *, kv_heads: int, head_dim: int, **options: Any) -> LayerCache:
    """One layer's cache of ``kind``: a key of ``KINDS`` (``full``, ``int8``, ``sliding_window``,
    ``linear_state``, ``sink_window``, ``heavy_hitter``, ``snapkv``, ``int4``, ``int2``, ``paged``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return KINDS[kind](kv_heads=kv_heads, head_dim=head_dim, **options)
    except TypeError as e:
        raise TypeError(f"cache kind {kind!r}: {e}") from None


def make_model_cache(kind: str, *, layers: int, kv_heads: int, head_dim: int, max_len: int | None = None,
                     **options: Any) -> ModelCache:
    """A ``ModelCache`` of ``layers`` layer caches of ``kind`` (see ``make_layer_cache``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return KINDS[kind].model_cache(layers=layers, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
                                       **options)
    except TypeError as e:
        raise TypeError(f"cache kind {kind!r}: {e}") from None


class ModelCache:
    """One ``LayerCache`` per block of a ``Transformer``, plus the position of the next token.

    Build it with ``Transformer.new_cache(kind, ...)``; pass it to ``forward``/``hidden``/``generate``.
    """

    def __init__(self, layers: list[LayerCache], *, max_len: int | None = None):
        check_positive_int("max_len", max_len, allow_none=True)
        if not layers:
            raise ValueError("a ModelCache needs at least one layer cache")
        self.layers, self.max_len = list(layers), max_len
        self.length = 0

    @property
    def kind(self) -> str:
        return self.layers[0].kind

    def check_model(self, model: Any, new_tokens: int) -> None:
        if len(self.layers) != len(model.blocks):
            raise ValueError(
                f"cache has {len(self.layers)} layers, the model has {len(model.blocks)} "
                "(a cache from another model shape?)"
            )
        for cache, block in zip(self.layers, model.blocks):
            cache.check_module(block.attn)
        if self.max_len is not None and self.length + new_tokens > self.max_len:
            raise ValueError(
                f"cache max_len={self.max_len} exceeded: it holds {self.length} tokens, got {new_tokens} more"
            )

    def positions(self, batch: int, n: int, device: torch.device) -> Tensor:
        """Positions of the next ``n`` tokens: (n,), or (batch, n) where sequences differ in length."""
        return torch.arange(self.length, self.length + n, device=device)

    def advance(self, n: int) -> None:
        """Every layer has stored the ``n`` new tokens."""
        self.length += n

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def __repr__(self) -> str:
        return (f"ModelCache(kind={self.kind!r}, layers={len(self.layers)}, length={self.length}, "
                f"nbytes={self.nbytes()})")


def cache_bytes(kind: str, *, batch: int, layers: int, kv_heads: int, head_dim: int, seq_len: int,
                dtype: torch.dtype = torch.float32, window: int | None = None,
                feature_dim: int | None = None, **options: Any) -> int:
    """Predicted bytes of a filled cache holding ``seq_len`` tokens (``full``/``int8`` preallocated
    to exactly ``seq_len``), without allocating; for inference estimates. The kinds of
    ``cache_evict``, ``cache_lowbit`` and ``cache_paged`` take their own options (``budget=``,
    ``residual=``, ``block_size=``, ...) and answer with their class's ``predict_nbytes``."""
    item = torch.empty((), dtype=dtype).element_size()
    per_layer = batch * kv_heads
    predict = getattr(KINDS.get(kind), "predict_nbytes", None)
    if predict is not None:
        return layers * predict(batch=batch, kv_heads=kv_heads, head_dim=head_dim, seq_len=seq_len, item=item,
                                **options)
    if options:
        raise TypeError(f"cache kind {kind!r} takes no options {sorted(options)}")
    if kind == "full":
        per_layer *= 2 * seq_len * head_dim * item
    elif kind == "int8":
        per_layer *= 2 * seq_len * (head_dim + 4)
    elif kind == "sliding_window":
        check_positive_int("window", window)
        per_layer *= 2 * window * head_dim * item
    elif kind == "linear_state":
        f = feature_dim or head_dim
        per_layer *= (f * head_dim + f) * item
    else:
        raise ValueError(f"unknown cache kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return layers * per_layer
