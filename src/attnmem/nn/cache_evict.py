"""Caches that evict tokens to stay within a budget: StreamingLLM, H2O and SnapKV.

Each keeps at most ``budget`` tokens per layer, batch row and KV head, in position order, with
their positions (H2O also their accumulated attention scores). They share one decode step:

* the prefill (the first call, on an empty cache) runs the layer's full-sequence path over the
  whole prompt, exactly as the ``full`` cache does, and then cuts the prompt's keys/values to
  the budget by the kind's rule;
* every later token at position p attends (causal softmax, scale 1/√D) to the tokens held and to
  itself; then the kind's rule cuts the held tokens back to the budget. Several new tokens in one
  call are decoded one after the other, so the result does not depend on how steps are grouped.

With ``budget`` at least the context, nothing is ever evicted and the attention is that of the
``full`` cache. Positions are those the model gave the tokens (sinusoidal embeddings added at the
input), so an evicted token does not move the others; StreamingLLM's re-numbering of positions
inside the cache is for rotary embeddings and has no counterpart here.

==================  ======================================================================
kind                keeps, of the tokens held after a step
==================  ======================================================================
``sink_window``     the first ``sinks`` tokens and the last ``budget - sinks`` (Xiao et al., 2023)
``heavy_hitter``    the last ``recent`` tokens and the ``budget - recent`` others with the largest
                    accumulated attention (Zhang et al., 2023, H2O)
``snapkv``          after the prefill: the last ``window`` prompt tokens and, per head, the
                    ``budget - window`` earlier ones the window attends to most, after pooling
                    (Li et al., 2024); decoding then appends without evicting
==================  ======================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_positive_int
from .cache import LayerCache, buffers_nbytes, register_kind

# Prompt queries whose attention rows are materialised at a time while the prefill scores are
# accumulated (H2O, SnapKV): bounds that transient to rows × prompt length per head.
SCORE_ROWS = 256


def _non_negative_int(name: str, val: object, at_most: tuple[str, int]) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= at_most[1]:
        raise ValueError(f"{name} must be an int in [0, {at_most[0]}={at_most[1]}], got {val!r}")


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, L, ...) and index (B, H, m) -> (B, H, m, ...): per-row, per-head token selection."""
    shape = index.shape + x.shape[3:]
    return x.gather(2, index.reshape(index.shape + (1,) * (x.dim() - 3)).expand(shape))


def causal_probs(q: Tensor, k: Tensor, rows: range) -> Tensor:
    """Causal softmax probabilities of the prompt queries ``rows`` over all its keys.

    q (B, Hq, N, D) and k (B, Hkv, N, D) of one prompt -> (B, Hkv, G, len(rows), N), the G query
    heads of a KV head on their own axis; query i sees keys 0..i, scale 1/√D.
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    qg = q[:, :, rows.start:rows.stop].reshape(B, Hkv, Hq // Hkv, len(rows), D)  # (B, Hkv, G, r, D)
    s = (qg @ k[:, :, None].transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, r, N)
    future = torch.arange(N, device=q.device)[None, :] > torch.arange(rows.start, rows.stop, device=q.device)[:, None]
    return s.masked_fill(future, -math.inf).softmax(-1)


class EvictingCache(LayerCache):
    """Base of the eviction kinds: held keys/values (B, Hkv, held, D) in position order, with
    their positions (B, Hkv, held); ``_keep`` says which of them survive a step."""

    def __init__(self, *, kv_heads: int, head_dim: int, budget: int, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        check_positive_int("budget", budget)
        self.budget = budget
        self.k: Tensor | None = None  # (B, Hkv, held, D)
        self.v: Tensor | None = None
        self.pos: Tensor | None = None  # (B, Hkv, held) int64: the position of each held token

    # --- what a kind decides ----------------------------------------------------------------
    def _keep(self) -> Tensor | None:
        """Indices (B, Hkv, budget) into the held tokens, ascending, of those that stay; None: all."""
        raise NotImplementedError

    def _observe(self, probs: Tensor) -> None:
        """A decode step's probabilities (B, Hkv, G, held) over the held tokens (the new one last)."""

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._hold(k, v)
        self._evict()

    # --- shared mechanics -------------------------------------------------------------------
    def _hold(self, k: Tensor, v: Tensor) -> None:
        """Add new tokens (B, Hkv, n, D) at the end of the held ones."""
        B, H, n, _ = k.shape
        pos = torch.arange(self.length, self.length + n, device=k.device).expand(B, H, n)  # (B, Hkv, n)
        if self.k is None:
            self.k, self.v, self.pos = k, v, pos
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.pos = torch.cat([self.pos, pos], dim=2)
        self.length += n

    def _evict(self) -> None:
        if self.k.shape[2] <= self.budget:
            return
        index = self._keep()
        if index is not None:
            self._select(index)

    def _select(self, index: Tensor) -> None:
        self.k, self.v, self.pos = (_gather_tokens(t, index) for t in (self.k, self.v, self.pos))

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store new tokens without attending (no attention is observed) and evict to the budget."""
        self._check_new(k, v)
        self._hold(k, v)
        self._evict()

    def attend(self, mha: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check_stateless_module(mha)
        self._check_new(k, v)
        if self.length == 0:
            out = mha.attend(q, k, v)  # the prefill: the method's own path over the whole prompt
            self._prefill(q, k, v)
            return out
        return torch.cat([self._step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
                          for i in range(q.shape[2])], dim=2)

    def _step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One new token: q (B, Hq, 1, D) attends to the held tokens and to itself."""
        self._hold(k, v)
        B, Hq, _, D = q.shape
        Hkv = self.kv_heads
        qg = q.reshape(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D): a KV head's query heads as rows
        probs = ((qg @ self.k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1)  # (B, Hkv, G, held)
        out = (probs @ self.v).reshape(B, Hq, 1, D)
        self._observe(probs)
        self._evict()
        return out

    @classmethod
    def predict_nbytes(cls, *, batch: int, kv_heads: int, head_dim: int, seq_len: int, item: int, budget: int,
                       **options: Any) -> int:
        """One layer's bytes once ``seq_len`` tokens have passed: min(seq_len, budget) tokens of
        K and V (``item`` bytes per element) and their int64 positions (for ``snapkv``: a
        ``seq_len``-token prompt, nothing decoded yet)."""
        check_positive_int("budget", budget)
        held = min(seq_len, budget)
        return batch * kv_heads * held * (2 * head_dim * item + 8 + cls.score_bytes * item)

    score_bytes = 0  # per held token, in units of the keys' element size (H2O's scores: 1)

    def kept_positions(self) -> Tensor:
        """Positions (B, Hkv, held) of the tokens held now."""
        return self.pos

    def nbytes(self) -> int:
        return buffers_nbytes(self.k, self.v, self.pos)


@register_kind
class SinkWindowCache(EvictingCache):
    """StreamingLLM (Xiao et al., 2023): ``sinks`` attention-sink tokens plus a recent window.

    Holds the first ``sinks`` tokens of the sequence and the last ``budget - sinks``. A decoded
    token at position p attends to the keys j with ``j < sinks`` or ``p - (budget - sinks) <= j <= p``
    (the window of ``budget - sinks`` held tokens plus itself, as ``sliding_window`` counts).
    The prefill attends over the whole prompt, then keeps only those tokens.

    Args:
        budget: tokens held per layer, head and batch row (positive int).
        sinks: leading tokens always kept, ``0 <= sinks <= budget`` (default 4, the paper's).
    """

    kind = "sink_window"

    def __init__(self, *, kv_heads: int, head_dim: int, budget: int, sinks: int = 4, max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, budget=budget, max_len=max_len)
        _non_negative_int("sinks", sinks, ("budget", budget))
        self.sinks = sinks

    def _keep(self) -> Tensor:
        held = self.k.shape[2]
        index = torch.cat([torch.arange(self.sinks), torch.arange(held - (self.budget - self.sinks), held)])
        B, H, _ = self.pos.shape
        return index.to(self.k.device).expand(B, H, self.budget)


@register_kind
class HeavyHitterCache(EvictingCache):
    """H2O (Zhang et al., 2023): keep the recent tokens and the heavy hitters of attention.

    Every held token carries an accumulated score: the sum, over every query that has attended
    to it so far and every query head sharing its KV head, of its softmax attention probability.
    The prompt's queries count with the probabilities of causal softmax attention over the
    prompt; a decoded token adds its probabilities over the held tokens and itself. After the
    prefill and after each step the cache keeps the last ``recent`` tokens and, of the others,
    the ``budget - recent`` with the largest scores (equal scores: the earlier token stays).
    Tokens added by ``append`` (no attention observed) start at score 0.

    Args:
        budget: tokens held per layer, head and batch row (positive int).
        recent: most recent tokens always kept, ``0 <= recent <= budget`` (default ``budget // 2``,
            the paper's equal split between heavy hitters and recent tokens).
    """

    kind = "heavy_hitter"
    score_bytes = 1

    def __init__(self, *, kv_heads: int, head_dim: int, budget: int, recent: int | None = None,
                 max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, budget=budget, max_len=max_len)
        recent = budget // 2 if recent is None else recent
        _non_negative_int("recent", recent, ("budget", budget))
        self.recent = recent
        self.score: Tensor | None = None  # (B, Hkv, held), the dtype of the keys

    def _hold(self, k: Tensor, v: Tensor) -> None:
        zeros = k.new_zeros(k.shape[:3])  # (B, Hkv, n)
        self.score = zeros if self.score is None else torch.cat([self.score, zeros], dim=2)
        super()._hold(k, v)

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._hold(k, v)
        N = k.shape[2]
        for a in range(0, N, SCORE_ROWS):
            self.score += causal_probs(q, k, range(a, min(a + SCORE_ROWS, N))).sum(dim=(2, 3))  # (B, Hkv, N)
        self._evict()

    def _observe(self, probs: Tensor) -> None:
        self.score += probs.sum(dim=2)  # (B, Hkv, held): summed over the group's query heads

    def _keep(self) -> Tensor:
        held = self.k.shape[2]
        older = held - self.recent
        # A stable descending sort keeps the earlier of equal scores first.
        order = self.score[:, :, :older].sort(dim=2, descending=True, stable=True).indices
        heavy = order[:, :, : self.budget - self.recent].sort(dim=2).values  # (B, Hkv, heavy), ascending
        B, H, _ = heavy.shape
        recent = torch.arange(older, held, device=heavy.device).expand(B, H, self.recent)
        return torch.cat([heavy, recent], dim=2)

    def _select(self, index: Tensor) -> None:
        super()._select(index)
        self.score = self.score.gather(2, index)

    def nbytes(self) -> int:
        return super().nbytes() + buffers_nbytes(self.score)


POOLINGS = ("avg", "max")
DEFAULT_SNAP_WINDOW = 16


@register_kind
class SnapKVCache(EvictingCache):
    """SnapKV (Li et al., 2024): the end of the prompt chooses which prompt keys to keep.

    Only the prefill compresses. With a prompt of N > ``budget`` tokens and w = ``window`` (at
    most N): the last w prompt queries are the observation window. Per batch row and KV head,
    the score of an earlier prompt key j < N - w is the sum, over the window's queries and the
    query heads of that KV head, of its causal softmax probability; scores are pooled along the
    keys (``pooling`` over ``kernel`` neighbours, stride 1, zero padding of ``kernel // 2``:
    ``F.avg_pool1d`` with ``count_include_pad=True``, or ``F.max_pool1d``), so that a kept key
    brings its neighbours. The cache keeps the ``budget - w`` earlier keys with the largest
    pooled scores (equal scores: the earlier key) and the window itself. Decoded tokens are then
    appended and never evicted: the cache holds ``min(N, budget)`` prompt tokens plus every
    decoded token (``append``, which sees no queries, never evicts either).

    Args:
        budget: prompt tokens kept per layer, head and batch row, at least ``window``.
        window: observation-window length (default ``min(16, budget)``; SnapKV uses 32 on long prompts).
        kernel: pooling width, a positive odd int (default 5, SnapKV's); 1 means no pooling.
        pooling: ``"avg"`` (SnapKV's default) or ``"max"``.
    """

    kind = "snapkv"

    def __init__(self, *, kv_heads: int, head_dim: int, budget: int, window: int | None = None, kernel: int = 5,
                 pooling: str = "avg", max_len: int | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, budget=budget, max_len=max_len)
        window = min(DEFAULT_SNAP_WINDOW, budget) if window is None else window
        check_positive_int("window", window)
        if window > budget:
            raise ValueError(f"window must be at most budget={budget} (the window is always kept), got {window}")
        if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel <= 0 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        self._hold(k, v)
        N = k.shape[2]
        if N <= self.budget:
            return
        w = min(self.window, N)
        index = self.select(q, k, w)
        self._select(torch.cat([index, torch.arange(N - w, N, device=k.device).expand(*index.shape[:2], w)], dim=2))

    def select(self, q: Tensor, k: Tensor, w: int) -> Tensor:
        """Indices (B, Hkv, budget - w), ascending, of the prompt keys before the window to keep."""
        N = k.shape[2]
        score = sum(causal_probs(q, k, range(a, min(a + SCORE_ROWS, N)))[..., : N - w].sum(dim=(2, 3))
                    for a in range(N - w, N, SCORE_ROWS))  # (B, Hkv, N - w)
        if self.kernel > 1:
            B, H, M = score.shape
            flat = score.reshape(B * H, 1, M)  # (B·Hkv, 1, N - w): one pooling row per head
            pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
            score = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).reshape(B, H, M)
        order = score.sort(dim=2, descending=True, stable=True).indices
        return order[:, :, : self.budget - w].sort(dim=2).values

    def snapshot(self, q_window: Tensor, k: Tensor, v: Tensor) -> None:
        """Fill an empty cache with a prompt's keys/values (B, Hkv, N, D) compressed as the
        prefill would, given only the observation window's queries q_window (B, Hq, w, D):
        the selection needs no other query (for filling a cache without running a model)."""
        self._check_new(k, v)
        if self.length:
            raise ValueError(f"snapshot needs an empty cache; this one holds {self.length} tokens")
        N, w = k.shape[2], q_window.shape[2]
        if not 0 < w <= min(N, self.budget):
            raise ValueError(f"q_window must hold 1 to min(prompt, budget)={min(N, self.budget)} queries, got {w}")
        q = q_window.new_zeros(q_window.shape[:2] + (N, q_window.shape[3]))  # (B, Hq, N, D): rows before unused
        q[:, :, N - w:] = q_window
        saved = self.window
        self.window = w
        try:
            self._prefill(q, k, v)
        finally:
            self.window = saved

    def _keep(self) -> None:
        return None  # decoding appends: the budget binds the prompt only
