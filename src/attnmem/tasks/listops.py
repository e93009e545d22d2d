"""ListOps as generated for the Long Range Arena (Nangia & Bowman 2018; Tay et al. 2021).

Expressions over the digits 0-9 with four operators, nested up to ``max_depth`` with up to
``max_args`` arguments each, and the value of the whole expression (a digit) as the class::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->  9

Operators: ``MIN``, ``MAX``, ``MED`` (median; for an even count, ``int(np.median)`` as in LRA,
i.e. the mean of the two middle values rounded down), ``SM`` (sum modulo 10). The tree
sampler is LRA's ``generate_tree``: below ``max_depth`` a node is a digit with probability
0.75, else an operator with 2..``max_args`` arguments; expressions whose token count falls
outside ``[min_length, max_length]`` are rejected and drawn again. Sequences are right-padded
with token 0 to ``max_length``.

Token ids: 0 pad, 1-10 the digits 0-9, 11 ``[MIN``, 12 ``[MAX``, 13 ``[MED``, 14 ``[SM``, 15 ``]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_positive_fields

PAD = 0
DIGIT0 = 1
OPERATORS = ("MIN", "MAX", "MED", "SM")
OP_TOKEN = {op: 11 + i for i, op in enumerate(OPERATORS)}
CLOSE = 15
VOCAB_SIZE = 16
VALUE_P = 0.25  # LRA: a node below max_depth is an operator with this probability
MAX_TRIES = 10_000


def apply_op(op: str, args: list[int]) -> int:
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "SM":
        return sum(args) % 10
    s = sorted(args)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2


def sample_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[list[int], int]:
    """Tokens and value of one subtree (LRA's ``generate_tree``, evaluated as it is built)."""
    if depth >= max_depth or rng.random() > VALUE_P:
        digit = rng.randrange(10)
        return [DIGIT0 + digit], digit
    n_args = rng.randint(2, max_args)
    children = [sample_tree(rng, depth + 1, max_depth, max_args) for _ in range(n_args)]
    op = rng.choice(OPERATORS)
    tokens = [OP_TOKEN[op]]
    for child_tokens, _ in children:
        tokens += child_tokens
    tokens.append(CLOSE)
    return tokens, apply_op(op, [value for _, value in children])


@dataclass(frozen=True)
class ListOps:
    """Options of the ListOps generator; ``sample`` draws a batch.

    Args:
        max_length: longest expression in tokens; every example is padded to it.
        min_length: shortest expression accepted (LRA: 500 with max_length 2000).
        max_depth: deepest nesting (LRA: 10).
        max_args: most arguments of one operator (LRA: 10).

    Raises:
        ValueError: an option out of range.
    """

    max_length: int = 512
    min_length: int = 64
    max_depth: int = 10
    max_args: int = 10

    kind = "classify"
    num_outputs = 10
    vocab_size = VOCAB_SIZE

    def __post_init__(self):
        check_positive_fields(self, ("max_length", "min_length", "max_depth"), where="listops")
        if not isinstance(self.max_args, int) or self.max_args < 2:
            raise ValueError(f"listops: max_args must be an int >= 2, got {self.max_args!r}")
        if self.min_length > self.max_length:
            raise ValueError(f"listops: min_length={self.min_length} exceeds max_length={self.max_length}")

    @property
    def seq_len(self) -> int:
        return self.max_length

    def expression(self, rng: random.Random) -> tuple[list[int], int]:
        """One accepted expression: its tokens (unpadded) and its value."""
        for _ in range(MAX_TRIES):
            tokens, value = sample_tree(rng, 1, self.max_depth, self.max_args)
            if self.min_length <= len(tokens) <= self.max_length:
                return tokens, value
        raise ValueError(f"listops: no expression with {self.min_length}..{self.max_length} tokens in "
                         f"{MAX_TRIES} draws (max_depth={self.max_depth}, max_args={self.max_args})")

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` examples: inputs (n, max_length) int64, right-padded with 0, and labels (n,) in 0..9."""
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        inputs = torch.full((n, self.max_length), PAD, dtype=torch.int64)
        labels = torch.empty(n, dtype=torch.int64)
        for i in range(n):
            tokens, value = self.expression(rng)
            inputs[i, : len(tokens)] = torch.tensor(tokens)
            labels[i] = value
        return inputs, labels
