"""What a method's memory model sees and returns: ``Shape`` in, ``Footprint`` out.

A registered method states its own memory beside its kernel (``Method.memory_model``), for the
calls its ``Method.memory_domain_reasons`` accepts; ``attnmem.estimate`` asks the method and
traces the call on fake tensors only outside that domain. This module has no dependencies
inside attnmem, so every mechanism can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Shape:
    """One attention call's sizes, as a memory model sees them (square: Nq = Nk = seq_len)."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    itemsize: int
    dtype: str  # "float32", "float64", "bfloat16", "float16"
    training: bool
    causal: bool
    masked: bool  # a user mask besides causal
    # Score modifications: None without score_mod and dropout, else their fast kind
    # (``kernels.mods.fast_kind``: "bias", "softcap", or "" for the generic path).
    mods: str | None = None
    sinks: bool = False
    # What the kind alone does not tell: a score_mod is given (else "" is dropout alone), its
    # built-in additive bias ("alibi", "relative_bias": ``Shape.mods == "bias"``, else None),
    # dropout_p > 0, and sinks that require a gradient.
    score_mod: bool = False
    bias: str | None = None
    dropout: bool = False
    sinks_grad: bool = False

    @property
    def q_bytes(self) -> int:
        """One (B, Hq, N, D) tensor of the call's dtype."""
        return self.batch * self.heads * self.seq_len * self.head_dim * self.itemsize

    @property
    def kv_bytes(self) -> int:
        """One (B, Hkv, N, D) tensor of the call's dtype."""
        return self.batch * self.kv_heads * self.seq_len * self.head_dim * self.itemsize

    @property
    def inputs_bytes(self) -> int:
        return self.q_bytes + 2 * self.kv_bytes

    @property
    def acc_itemsize(self) -> int:
        """Bytes of the accumulation dtype: float64 for float64 inputs, float32 otherwise."""
        return 8 if self.itemsize == 8 else 4

    @property
    def half(self) -> bool:
        """bfloat16 or float16 inputs (their accumulators are float32)."""
        return self.itemsize == 2

    @property
    def lse_bytes(self) -> int:
        """One log-sum-exp per query row, in the accumulation dtype."""
        return self.batch * self.heads * self.seq_len * self.acc_itemsize


class Footprint(NamedTuple):
    """Bytes of one call beyond its inputs: ``saved`` between forward and backward (0 without
    training), ``transient`` the rest of the peak."""

    saved: int
    transient: int


def outside(result: Footprint | str) -> list[str]:
    """Domain reasons of a closed form that returns the reason (a str) where it does not hold."""
    return [result] if isinstance(result, str) else []
