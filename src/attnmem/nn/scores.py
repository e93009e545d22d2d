"""Learnable score modifications as modules, for ``MultiHeadAttention(score_mod=...)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import scores as S


class RelativePositionBias(nn.Module):
    """T5's learned relative-position bias as a score_mod: ``score + table[bucket(j - i), h]``.

    The table (num_buckets, heads) is a parameter (T5 initialises it like an embedding); the
    bucketing is ``attnmem.scores.relative_position_bucket``. Call signature is FlexAttention's
    ``(score, b, h, q_idx, kv_idx)``.
    """

    def __init__(self, heads: int, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.table = nn.Parameter(torch.randn(num_buckets, heads) * 0.02)
        S.relative_bias(self.table, num_buckets, max_distance, bidirectional)  # checks the sizes
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        mod = S.relative_bias(self.table, self.num_buckets, self.max_distance, self.bidirectional)
        return mod(score, b, h, q_idx, kv_idx)


class LearnedALiBi(nn.Module):
    """ALiBi with learnable slopes, initialised to the standard ones (``alibi_slopes``)."""

    def __init__(self, heads: int, *, offset: int = 0):
        super().__init__()
        self.slopes = nn.Parameter(S.alibi_slopes(heads))
        self.offset = offset

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return S.alibi(self.slopes, offset=self.offset)(score, b, h, q_idx, kv_idx)
