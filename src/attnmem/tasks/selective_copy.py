"""Selective copying (Gu & Dao 2023, Mamba §3.1): copy the marked tokens out of a noisy sequence.

An example is a body of ``seq_len - num_tokens`` positions in which ``num_tokens`` data tokens
sit at random positions among noise tokens, then a separator, then the data tokens in their
order of appearance (teacher-forced, as in a language model)::

    body (noise n, data d)            sep  answers
    n d1 n n d2 n n n d3 n ... n       S    d1 d2        (input)
    -  -  ...                    -     d1   d2 d3        (label, -100 where "-")

Token ids: 0 is the blank noise token, 1 the separator; with ``noise_vocab > 0`` noise tokens
are drawn from ``2 .. 1 + noise_vocab`` instead of being blank. Data tokens (the "marked" ones)
are the ids ``2 + noise_vocab .. vocab_size - 1``, so noise never looks like data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_positive_fields
from .mqar import IGNORE

BLANK, SEP = 0, 1


@dataclass(frozen=True)
class SelectiveCopy:
    """Options of the selective-copy generator; ``sample`` draws a batch.

    Args:
        seq_len: tokens per example (input length).
        num_tokens: data tokens to copy.
        vocab_size: total vocabulary, special and noise tokens included.
        noise_vocab: distinct noise tokens (0: every noise position is the blank token 0).

    Raises:
        ValueError: an option out of range, or no room for the data tokens.
    """

    seq_len: int = 256
    num_tokens: int = 16
    vocab_size: int = 32
    noise_vocab: int = 0

    kind = "lm"

    def __post_init__(self):
        check_positive_fields(self, ("seq_len", "num_tokens", "vocab_size"), where="selective_copy")
        if not isinstance(self.noise_vocab, int) or self.noise_vocab < 0:
            raise ValueError(f"selective_copy: noise_vocab must be an int >= 0, got {self.noise_vocab!r}")
        if self.data_start >= self.vocab_size:
            raise ValueError(f"selective_copy: vocab_size={self.vocab_size} leaves no data tokens; expected "
                             f"vocab_size > 2 + noise_vocab = {self.data_start}")
        if 2 * self.num_tokens > self.seq_len:
            raise ValueError(f"selective_copy: seq_len={self.seq_len} is too short for num_tokens="
                             f"{self.num_tokens}; expected seq_len >= 2 * num_tokens")

    @property
    def data_start(self) -> int:
        return 2 + self.noise_vocab

    @property
    def num_outputs(self) -> int:
        return self.vocab_size

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` examples: inputs (n, seq_len) int64 and labels (n, seq_len), ``-100`` = no target."""
        g, K = generator, self.num_tokens
        body = self.seq_len - K
        data = torch.randint(self.data_start, self.vocab_size, (n, K), generator=g)  # (n, K)
        pos = torch.rand(n, body, generator=g).argsort(1)[:, :K].sort(1).values  # (n, K) ascending
        if self.noise_vocab:
            inputs = torch.randint(2, self.data_start, (n, self.seq_len), generator=g)
        else:
            inputs = torch.full((n, self.seq_len), BLANK, dtype=torch.int64)
        inputs.scatter_(1, pos, data)
        inputs[:, body] = SEP
        inputs[:, body + 1:] = data[:, :-1]
        labels = torch.full((n, self.seq_len), IGNORE, dtype=torch.int64)
        labels[:, body:] = data
        return inputs, labels
