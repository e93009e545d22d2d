"""Built-in score modifications, in FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` form.

Each is a small callable object: pass it as ``attnmem.attention(..., score_mod=...)`` (or to
``torch.nn.attention.flex_attention``, which takes the same signature). ``score`` is the scaled
score ``q·k · scale``; the indices are raw positions (``q_idx`` in [0, Nq), ``kv_idx`` in
[0, Nk)). attnmem calls a score_mod once per tile, with ``score`` (B, Hq, Tq, Tk) and the
indices as broadcastable int64 tensors (b (B,1,1,1), h (1,Hq,1,1), q_idx (1,1,Tq,1),
kv_idx (1,1,1,Tk)), so these built-ins are a few tensor ops per tile, never a Python call per
score. Tensors they hold (ALiBi slopes, a T5 bias table) receive gradients when they require
them.

The fast paths of the tiled kernel (``attnmem.kernels.mods``) read two declarations here:
``alibi`` and ``relative_bias`` are additive biases of the indices alone
(``additive_bias(h, q_idx, kv_idx, dtype)``: each tile's bias goes to the fused CPU operator),
and ``softcap`` declares its cap (``softcap``: the native C++ kernel, ``attnmem.kernels.native``,
or a torch-ops tile kernel with the derivative written out).
With a learned table or slopes (requiring grad) the generic path runs, which computes their
gradients.

``dropout_mask`` materialises the dropout pattern of ``attnmem.attention(dropout_p=...)``
densely, for references and tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_positive_int
from .kernels import dropout_keep

__all__ = ["softcap", "alibi", "alibi_slopes", "relative_bias", "relative_position_bucket", "dropout_mask",
           "shift_positions"]


class SoftCap:
    """``score -> cap · tanh(score / cap)`` (Gemma 2/3, Grok; Gemma 2 uses cap = 50)."""

    def __init__(self, cap: float):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be a positive finite number, got {cap!r}")
        self.cap = float(cap)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / self.cap) * self.cap

    @property
    def softcap(self) -> float:
        """The cap, declared for the tiled kernel's softcap fast path."""
        return self.cap

    def __repr__(self) -> str:
        return f"softcap({self.cap:g})"


def softcap(cap: float) -> SoftCap:
    """Logit soft-capping: ``score' = cap · tanh(score / cap)``, smooth, ``|score'| < cap``.

    Raises:
        ValueError: ``cap`` not a positive finite number.
    """
    return SoftCap(cap)


def alibi_slopes(heads: int) -> Tensor:
    """The ALiBi slopes of Press et al. (2022) for ``heads`` heads, float32 (heads,).

    For a power of two ``n``: ``m_h = 2^(-8h/n)``, h = 1..n (n = 8: 1/2, 1/4, …, 1/256). Otherwise,
    with ``p`` the largest power of two below ``heads``: the p slopes of ``p``, then the
    odd-indexed slopes of ``2p`` (``2^(-4h/p)``, h = 1, 3, 5, …) for the remaining heads, as in
    the authors' code and Bloom's ``build_alibi_tensor``.

    Raises:
        ValueError: ``heads`` not a positive int.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    p = 2 ** math.floor(math.log2(heads))
    slopes = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
    slopes += [2.0 ** (-4.0 * i / p) for i in range(1, 2 * (heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi:
    """``score -> score - slope_h · |q_idx + offset - kv_idx|`` (see ``alibi``)."""

    def __init__(self, slopes: Tensor, offset: int = 0):
        if not isinstance(slopes, Tensor) or slopes.dim() != 1 or not slopes.dtype.is_floating_point:
            got = tuple(slopes.shape) if isinstance(slopes, Tensor) else type(slopes).__name__
            raise ValueError(f"slopes must be a 1-d floating-point tensor of one slope per head (H,), got {got}")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, got {type(offset).__name__}")
        self.slopes, self.offset = slopes, offset

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = (q_idx + self.offset - kv_idx).abs().to(score.dtype)  # (1, 1, Tq, Tk)
        return score - self.slopes.to(score.device)[h].to(score.dtype) * distance

    def decay(self) -> tuple[Tensor, int]:
        """(slopes (H,), offset): the bias is 0 at key ``q_idx + offset`` and falls by
        ``slope_h`` a key away from it, declared for the tiled kernel, which skips the key tiles
        it makes negligible (``attnmem.kernels.tiled.reach_groups``); slopes detached."""
        return self.slopes.detach(), self.offset

    def additive_bias(self, h: Tensor, q_idx: Tensor, kv_idx: Tensor, dtype: torch.dtype) -> Tensor:
        """``-slope_h · |q_idx + offset - kv_idx|`` as a (1, Hq, Tq, Tk) tensor of ``dtype``
        (the score_mod is ``score + additive_bias``); slopes detached."""
        distance = (q_idx + self.offset - kv_idx).abs_().to(dtype)  # (1, 1, Tq, Tk)
        neg_slopes = -self.slopes.detach().to(device=distance.device, dtype=dtype)[h]  # (1, Hq, 1, 1)
        return distance * neg_slopes

    @staticmethod
    def bias_bytes(heads: int, rows: int, keys: int, itemsize: int) -> tuple[int, int]:
        """(peak while ``additive_bias`` runs, its result) in bytes on a tile of ``rows`` queries
        and ``keys`` keys, read off it: the int64 distances beside their cast, then the cast
        beside the (1, Hq, Tq, Tk) product (the memory models of the tiled kernel use it)."""
        pairs = rows * keys
        result = heads * pairs * itemsize
        return max(8 * pairs + itemsize * pairs, itemsize * pairs + result), result

    def row_bias(self, h: Tensor, q_first: int, q_last: int, kv_idx: Tensor, kv_first: int, kv_last: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The bias of a block whose keys lie all on one side of every query's diagonal, as a
        row of keys and a per-query shift: ``bias = row - shift`` (see ``row_bias`` of
        ``attnmem.kernels.mods``); None when the keys straddle a query's diagonal.

        ``q_first``/``q_last`` and ``kv_first``/``kv_last`` bound the block's query and key
        positions (``kv_idx``, (1, 1, 1, Tk), need not be contiguous). Keys all at or before the
        diagonal (``j₁ = kv_last <= q_first + offset``):
        ``-m·(i + offset - j) = m·(j - j₁) - m·(i + offset - j₁)``; all at or after it
        (``j₀ = kv_first >= q_last + offset``): ``-m·(j - i - offset) = -m·(j - j₀) - m·(j₀ - i - offset)``.
        The row is 0 at the nearest key and falls off away from it, so the pairs that carry
        weight have small values, as in the dense bias: no large value is rounded beside them.
        Returns ((1, Hq, 1, Tk), (1, Hq, Tq)) of ``dtype``.
        """
        j0, j1 = kv_first, kv_last
        slopes = self.slopes.detach().to(device=kv_idx.device, dtype=dtype)[h[0, :, 0, 0]]  # (Hq,)
        rows = torch.arange(q_first + self.offset, q_last + self.offset + 1, device=kv_idx.device)  # (Tq,)
        if j1 <= q_first + self.offset:
            near, sign = j1, 1
        elif j0 >= q_last + self.offset:
            near, sign = j0, -1
        else:
            return None
        row = (kv_idx.reshape(-1) - near).to(dtype).mul_(sign)  # (Tk,): <= 0
        shift = (rows - near).to(dtype).mul_(sign)  # (Tq,): >= 0
        return row * slopes[None, :, None, None], shift * slopes[None, :, None]

    def __repr__(self) -> str:
        return f"alibi(H={self.slopes.numel()}, offset={self.offset})"


def alibi(slopes: Tensor | int, *, offset: int = 0) -> ALiBi:
    """Attention with linear biases: ``score' = score - m_h · |i + offset - j|``.

    ``i = q_idx``, ``j = kv_idx``, ``m_h = slopes[h]`` (query head h). Under a causal mask this
    is ALiBi's ``-m_h·(i - j)``; without one it is the symmetric form FlashAttention's
    ``alibi_slopes`` computes. ``offset = Nk - Nq`` aligns query i with key i + Nk - Nq, as
    attnmem's bottom-right causal mask and FlashAttention do (decoding with a KV cache).

    Args:
        slopes: (H,) float tensor, one per query head (``alibi_slopes(H)``; learnable if it
            requires grad), or an int H for the standard slopes.
        offset: added to q_idx; default 0 (Nq == Nk).

    Raises:
        ValueError: slopes not a 1-d float tensor or a positive int.
    """
    if isinstance(slopes, int) and not isinstance(slopes, bool):
        slopes = alibi_slopes(slopes)
    return ALiBi(slopes, offset)


def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Tensor:
    """T5's bucketing of ``relative_position = kv_idx - q_idx`` (``_relative_position_bucket``
    of Hugging Face's T5, Mesh TensorFlow's original).

    Bidirectional: half the buckets for ``relative_position > 0``, and ``n = |relative_position|``;
    otherwise ``n = max(-relative_position, 0)`` (keys ahead all share bucket 0). Within a half of
    ``nb`` buckets: ``n < nb/2`` is its own bucket; larger ``n`` are logarithmic,
    ``nb/2 + floor(log(n / (nb/2)) / log(max_distance / (nb/2)) · (nb - nb/2))``, capped at nb - 1.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class RelativeBias:
    """``score -> score + table[bucket(kv_idx - q_idx), h]`` (see ``relative_bias``)."""

    def __init__(self, table: Tensor, num_buckets: int, max_distance: int, bidirectional: bool):
        for name, val in (("num_buckets", num_buckets), ("max_distance", max_distance)):
            check_positive_int(name, val)
        min_buckets = 4 if bidirectional else 2
        if num_buckets < min_buckets:
            raise ValueError(f"num_buckets must be at least {min_buckets} (bidirectional={bidirectional}), "
                             f"got {num_buckets}")
        max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if max_distance <= max_exact:
            raise ValueError(f"max_distance must exceed the exact buckets' range {max_exact} "
                             f"(num_buckets={num_buckets}, bidirectional={bidirectional}), got {max_distance}")
        if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[0] != num_buckets:
            got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise ValueError(f"table must have shape (num_buckets, H) = ({num_buckets}, H), got {got}")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        self.table, self.num_buckets, self.max_distance = table, num_buckets, max_distance
        self.bidirectional = bidirectional

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bucket = relative_position_bucket(kv_idx - q_idx, self.bidirectional, self.num_buckets,
                                          self.max_distance)  # (1, 1, Tq, Tk)
        bias = self.table.to(score.device).t()[h, bucket]  # (1, Hq, Tq, Tk)
        return score + bias.to(score.dtype)

    def additive_bias(self, h: Tensor, q_idx: Tensor, kv_idx: Tensor, dtype: torch.dtype) -> Tensor:
        """``table[bucket(kv_idx - q_idx), h]`` as a (1, Hq, Tq, Tk) tensor of ``dtype``, table
        detached. The buckets are computed once per distinct offset ``kv_idx - q_idx`` (at most
        Tq + Tk - 1 of them), then gathered: no logarithm per score."""
        offsets = kv_idx - q_idx  # (1, 1, Tq, Tk)
        low = int(offsets.min())
        distinct = torch.arange(low, int(offsets.max()) + 1, device=offsets.device)  # (L,)
        bucket = relative_position_bucket(distinct, self.bidirectional, self.num_buckets, self.max_distance)
        per_head = self.table.detach().to(device=offsets.device, dtype=dtype).t()[:, bucket]  # (H, L)
        return per_head[h[0, :, 0, 0]][:, offsets[0, 0] - low].unsqueeze(0)  # (1, Hq, Tq, Tk)

    @staticmethod
    def bias_bytes(heads: int, rows: int, keys: int, itemsize: int) -> tuple[int, int]:
        """(peak while ``additive_bias`` runs, its result) in bytes on a tile of ``rows`` queries
        and ``keys`` keys, read off it: the int64 offsets and their shifted copy (the gather's
        index) beside the gathered (1, Hq, Tq, Tk) result, with the L = Tq + Tk - 1 distinct
        offsets, their buckets (int64) and the table's two (H, L) gathers."""
        pairs, distinct = rows * keys, rows + keys - 1
        result = heads * pairs * itemsize
        return 16 * pairs + result + 2 * heads * distinct * itemsize + 16 * distinct, result

    def __repr__(self) -> str:
        return (f"relative_bias(H={self.table.shape[1]}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional})")


def relative_bias(table: Tensor, num_buckets: int = 32, max_distance: int = 128,
                  bidirectional: bool = True) -> RelativeBias:
    """T5's learned relative-position bias: ``score' = score + table[bucket(j - i), h]``.

    ``bucket`` is ``relative_position_bucket`` (T5's bucketing) of ``j - i`` (``kv_idx - q_idx``).
    T5 does not scale its scores: call ``attnmem.attention(..., scale=1.0)`` to match it.

    Args:
        table: (num_buckets, H), as T5's ``relative_attention_bias.weight``; its gradient is
            computed when it requires grad.
        num_buckets, max_distance, bidirectional: T5's (32, 128, True for the encoder).

    Raises:
        ValueError: a table of another shape, or non-positive sizes.
    """
    return RelativeBias(table, num_buckets, max_distance, bidirectional)


class PositionShifted:
    """``score_mod`` with its queries ``q_shift`` and its keys ``kv_shift`` positions later
    (see ``shift_positions``). It keeps the ``additive_bias`` fast path of a score_mod that
    declares one."""

    def __init__(self, score_mod, q_shift: int, kv_shift: int = 0):
        self.score_mod, self.q_shift, self.kv_shift = score_mod, q_shift, kv_shift
        if callable(getattr(score_mod, "additive_bias", None)):
            self.additive_bias = self._additive_bias

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.score_mod(score, b, h, q_idx + self.q_shift, kv_idx + self.kv_shift)

    def _additive_bias(self, h: Tensor, q_idx: Tensor, kv_idx: Tensor, dtype: torch.dtype) -> Tensor:
        return self.score_mod.additive_bias(h, q_idx + self.q_shift, kv_idx + self.kv_shift, dtype)

    def __repr__(self) -> str:
        return f"shift_positions({self.score_mod!r}, {self.q_shift}, {self.kv_shift})"


def shift_positions(score_mod, q_shift: int, kv_shift: int = 0):
    """``score_mod`` as it applies to queries at positions ``q_shift .. q_shift + Nq - 1`` and
    keys at ``kv_shift .. kv_shift + Nk - 1``: called with ``q_idx + q_shift`` and
    ``kv_idx + kv_shift`` for the raw indices of a call.

    Decoding needs it: the n new tokens after L cached ones are queries 0 .. n - 1 of their call
    but positions L - n .. L - 1 of the sequence the score_mod was written for (a ``full``
    cache passes ``q_shift = L - n``; a sliding window, whose oldest held key is at position
    L - w, also ``kv_shift = L - w``). ``softcap`` reads no index and is returned as is;
    ``alibi`` becomes ``alibi`` with its offset moved (its fast paths unchanged); any other
    score_mod is wrapped (``PositionShifted``), keeping an ``additive_bias`` it declares.

    Raises:
        TypeError: a shift not an int, or ``score_mod`` not callable.
    """
    for name, shift in (("q_shift", q_shift), ("kv_shift", kv_shift)):
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise TypeError(f"{name} must be an int, got {type(shift).__name__}")
    if not callable(score_mod):
        raise TypeError(f"score_mod must be a callable, got {type(score_mod).__name__}")
    if (q_shift == 0 and kv_shift == 0) or isinstance(score_mod, SoftCap):
        return score_mod
    if type(score_mod) is ALiBi:
        return ALiBi(score_mod.slopes, score_mod.offset + q_shift - kv_shift)
    return PositionShifted(score_mod, q_shift, kv_shift)


def dropout_mask(seed: int, p: float, batch: int, heads: int, nq: int, nk: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """The dropout factor ``Z`` (B, H, Nq, Nk) float32 that ``attnmem.attention(dropout_p=p,
    dropout_seed=seed)`` applies to its probabilities: 0 (dropped) or ``1/keep`` (quadratic:
    for references and tests)."""
    idx = (torch.arange(batch, device=device)[:, None, None, None],
           torch.arange(heads, device=device)[None, :, None, None],
           torch.arange(nq, device=device)[None, None, :, None],
           torch.arange(nk, device=device)[None, None, None, :])
    return dropout_keep(seed, p, *idx).float().expand(batch, heads, nq, nk)
