"""Multi-query associative recall (MQAR), as defined by Arora et al. 2023 (Zoology).

Each example opens with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...``; keys come from the
lower half of the vocabulary (token 0 excluded) and values from the upper half, each drawn
without replacement within an example. Every key then reappears once later in the sequence,
at a gap drawn from a power law (``p(g) ∝ g^(power_a - 1)``, short gaps most likely), and the
model must emit its value at that position. Every other position holds a random token
(``random_non_queries``, Zoology's default) or 0. This follows ``multiquery_ar`` in
HazyResearch/zoology: an input of ``seq_len`` tokens, labels shifted by one, ``-100`` where
there is nothing to predict::

    position:  0  1  2  3 | ...  q   q+1 ...
    input:     k1 v1 k2 v2| ...  k2  x   ...     x: noise
    label:     -  -  -  - | ...  v2  -   ...

Zoology's standard vocabulary is 8192; any even ``vocab_size`` with enough keys and values
for ``num_pairs`` works (smaller vocabularies train faster on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_positive_fields

IGNORE = -100


@dataclass(frozen=True)
class MQAR:
    """Options of the MQAR generator; ``sample`` draws a batch.

    Args:
        seq_len: tokens per example (input length).
        num_pairs: key-value pairs per example; each is queried once.
        vocab_size: even; keys are ``1 .. vocab_size/2 - 1``, values ``vocab_size/2 .. vocab_size - 1``.
        power_a: exponent of the gap distribution ``p(g) ∝ g^(power_a - 1)`` (Zoology: 0.01).
        random_non_queries: fill unused positions with random tokens instead of 0.

    Raises:
        ValueError: an option out of range or a sequence too short for the pairs and queries.
    """

    seq_len: int = 256
    num_pairs: int = 16
    vocab_size: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = True

    kind = "lm"

    def __post_init__(self):
        check_positive_fields(self, ("seq_len", "num_pairs", "vocab_size"), where="mqar")
        if self.vocab_size % 2:
            raise ValueError(f"mqar: vocab_size must be even (keys and values split it), got {self.vocab_size}")
        if self.num_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"mqar: num_pairs={self.num_pairs} needs at least {self.num_pairs} distinct keys; "
                             f"vocab_size={self.vocab_size} has {self.vocab_size // 2 - 1}")
        if 4 * self.num_pairs > self.seq_len:
            raise ValueError(f"mqar: seq_len={self.seq_len} is too short for num_pairs={self.num_pairs}; "
                             f"expected seq_len >= 4 * num_pairs = {4 * self.num_pairs}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"mqar: power_a must be in (0, 1], got {self.power_a!r}")

    @property
    def num_outputs(self) -> int:
        return self.vocab_size

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` examples: inputs (n, seq_len) int64 and labels (n, seq_len), ``-100`` = no target."""
        g, P, V = generator, self.num_pairs, self.vocab_size
        context = 2 * P
        half = V // 2
        # P distinct draws per row: the indices of the P largest of i.i.d. uniforms (a uniformly
        # random P-subset in random order; topk, unlike a full argsort, costs O(V) per row).
        keys = torch.rand(n, half - 1, generator=g).topk(P, dim=1).indices + 1  # (n, P) distinct, in [1, half)
        values = torch.rand(n, half, generator=g).topk(P, dim=1).indices + half  # (n, P) distinct, in [half, V)
        # Query slots sit at even offsets after the context, so a query is never followed by another.
        space = (self.seq_len - context) // 2
        weights = self.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(n, space), P, replacement=False, generator=g)  # (n, P)
        query_pos = context + 2 * gaps  # (n, P)
        noise = torch.randint(V, (n, self.seq_len), generator=g)
        inputs = noise if self.random_non_queries else torch.zeros(n, self.seq_len, dtype=torch.int64)
        inputs = inputs.clone()
        kv = torch.stack([keys, values], dim=2).reshape(n, context)  # (n, 2P): k1 v1 k2 v2 ...
        inputs[:, :context] = kv
        inputs.scatter_(1, query_pos, keys)
        labels = torch.full((n, self.seq_len), IGNORE, dtype=torch.int64)
        labels.scatter_(1, query_pos, values)
        return inputs, labels
