"""Paged KV cache: batched decoding of prompts of different lengths, memory ∝ tokens held.

A padded batch allocates ``B × max_len`` tokens per layer whatever the prompts' lengths. Here,
as in vLLM's PagedAttention (Kwon et al., 2023), keys and values live in a pool of blocks of
``block_size`` tokens; a block table maps each sequence's i-th block to a pool block, and a
sequence takes a new block only when its last one is full. The cache holds
``Σ_s ceil(L_s / block_size)`` blocks (plus the pool's growth slack, at most ``GROWTH`` of it,
or exactly ``num_blocks`` when preallocated).

Attention is the ``full`` cache's: each sequence's new tokens attend causally to its own held
tokens (read from its blocks), and the prefill runs the layer's full-sequence path. The block
table is shared by every layer of a model (``PagedModelCache``); each layer has its own pool.

Use: ``cache = model.new_cache("paged")``; ``with cache.sequences([i]): model(prompt_i, cache=cache)``
prefills sequence i alone (a new id starts empty), then ``model(next_tokens, cache=cache)``
with (S, 1) tokens steps every sequence at its own position; ``attnmem.nn.sampling.generate``
does this for a list of prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..checks import check_positive_int
from .cache import LayerCache, ModelCache, buffers_nbytes, decode_step, register_kind

# A pool that must grow grows by at least this fraction of its blocks: few reallocations, and at
# most this much unused capacity beyond the blocks in use.
GROWTH = 1 / 32
TABLE_ENTRY_BYTES = 4  # a block id in an int32 block table


class BlockTable:
    """Which pool blocks hold each sequence's tokens, and the sequences the next call is for.

    Args:
        block_size: tokens per block.
        num_blocks: pool size, fixed (running out is an error); None grows it as needed.
        max_len: most tokens one sequence may hold; None: no limit.
    """

    def __init__(self, *, block_size: int = 16, num_blocks: int | None = None, max_len: int | None = None):
        check_positive_int("block_size", block_size)
        check_positive_int("num_blocks", num_blocks, allow_none=True)
        check_positive_int("max_len", max_len, allow_none=True)
        self.block_size, self.num_blocks, self.max_len = block_size, num_blocks, max_len
        self.blocks: list[list[int]] = []  # per sequence: pool block ids, in order
        self.lengths: list[int] = []  # per sequence: tokens held
        self.free: list[int] = []  # released block ids, reused first
        self.capacity = num_blocks or 0  # blocks every layer's pool must hold
        self.issued = 0  # block ids handed out so far (ids 0 .. issued - 1)
        self.active: list[int] | None = None  # None: every sequence, in id order

    def ids(self) -> list[int]:
        return list(range(len(self.lengths))) if self.active is None else self.active

    def check(self, batch: int, n: int) -> None:
        """ValueError when a call of ``batch`` rows of ``n`` tokens does not fit the selection."""
        if not self.lengths and self.active is None:  # a first call without a selection: one sequence a row
            self.blocks, self.lengths = [[] for _ in range(batch)], [0] * batch
        ids = self.ids()
        if batch != len(ids):
            raise ValueError(f"paged cache: the call has batch size {batch}, but {len(ids)} sequence(s) are "
                             f"selected ({ids}); select them with cache.sequences([...])")
        for s in ids:
            if self.max_len is not None and self.lengths[s] + n > self.max_len:
                raise ValueError(f"paged cache max_len={self.max_len} exceeded: sequence {s} holds "
                                 f"{self.lengths[s]} tokens, got {n} more")

    def reserve(self, n: int) -> None:
        """Give every selected sequence blocks for ``n`` more tokens (idempotent until ``advance``)."""
        for s in self.ids():
            need = math.ceil((self.lengths[s] + n) / self.block_size) - len(self.blocks[s])
            for _ in range(max(need, 0)):
                self.blocks[s].append(self._new_block())

    def _new_block(self) -> int:
        if self.free:
            return self.free.pop()
        if self.num_blocks is not None and self.issued == self.num_blocks:
            raise ValueError(f"paged cache is out of blocks: num_blocks={self.num_blocks} of {self.block_size} "
                             f"tokens are all in use (release finished sequences, or allocate more)")
        self.issued += 1
        if self.issued > self.capacity:
            self.capacity = max(self.issued, self.capacity + math.ceil(GROWTH * self.capacity))
        return self.issued - 1

    def slots(self, s: int, start: int, end: int, device: torch.device) -> Tensor:
        """Flat pool slots (end - start,) of sequence s's tokens start .. end - 1."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.blocks[s], dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(device)

    def advance(self, n: int) -> None:
        for s in self.ids():
            self.lengths[s] += n

    def positions(self, n: int, device: torch.device) -> Tensor:
        """(S, n) positions of the next n tokens of the selected sequences."""
        start = torch.tensor([self.lengths[s] for s in self.ids()], dtype=torch.long, device=device)
        return start[:, None] + torch.arange(n, device=device)

    def release(self, s: int) -> None:
        """Return sequence s's blocks to the pool; it then holds nothing (its id stays valid)."""
        self.free.extend(reversed(self.blocks[s]))
        self.blocks[s], self.lengths[s] = [], 0

    def tokens_held(self) -> int:
        return sum(self.lengths)

    def nbytes(self) -> int:
        return TABLE_ENTRY_BYTES * sum(len(b) for b in self.blocks)

    @contextmanager
    def sequences(self, ids: Sequence[int]) -> Iterator[None]:
        """Route the calls inside to these sequences (ids past the last start new, empty ones)."""
        ids = list(ids)
        if not ids or len(set(ids)) != len(ids) or any(not isinstance(s, int) or s < 0 for s in ids):
            raise ValueError(f"sequence ids must be distinct ints >= 0, got {ids!r}")
        while len(self.lengths) <= max(ids):
            self.blocks.append([])
            self.lengths.append(0)
        saved, self.active = self.active, ids
        try:
            yield
        finally:
            self.active = saved


@register_kind
class PagedKVCache(LayerCache):
    """One layer's pool of key/value blocks, addressed through a ``BlockTable``.

    Args:
        block_size, num_blocks: of the block table it builds when ``table`` is None (standalone
            use: the layer then advances the table itself after each call).
        table: a table shared with the other layers of a model (``PagedModelCache``).
        max_len: most tokens per sequence.

    Each sequence attends alone, prefill and decode steps alike: a layer's ``score_mod`` sees
    its tokens at their positions in that sequence, and batch index ``b = 0``.
    """

    kind = "paged"
    decodes_mods = ("score_mod", "sinks")

    def __init__(self, *, kv_heads: int, head_dim: int, block_size: int = 16, num_blocks: int | None = None,
                 max_len: int | None = None, table: BlockTable | None = None):
        super().__init__(kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)
        self.owns_table = table is None
        self.table = table or BlockTable(block_size=block_size, num_blocks=num_blocks, max_len=max_len)
        self.k: Tensor | None = None  # (capacity · block_size, Hkv, D): block b is rows b·bs .. (b+1)·bs - 1
        self.v: Tensor | None = None

    @classmethod
    def predict_nbytes(cls, *, batch: int, kv_heads: int, head_dim: int, seq_len: int | list[int], item: int,
                       block_size: int = 16) -> int:
        """One layer's bytes holding ``batch`` sequences of ``seq_len`` tokens each (or one
        length per sequence): whole blocks, no growth slack (as with ``num_blocks`` sized to fit),
        and the table's share of one layer."""
        lengths = seq_len if isinstance(seq_len, list) else [seq_len] * batch
        blocks = sum(math.ceil(n / block_size) for n in lengths)
        return blocks * block_size * 2 * kv_heads * head_dim * item

    @classmethod
    def model_cache(cls, *, layers: int, kv_heads: int, head_dim: int, max_len: int | None = None,
                    block_size: int = 16, num_blocks: int | None = None) -> PagedModelCache:
        table = BlockTable(block_size=block_size, num_blocks=num_blocks, max_len=max_len)
        return PagedModelCache([cls(kv_heads=kv_heads, head_dim=head_dim, table=table, max_len=max_len)
                                for _ in range(layers)], table)

    def _fit_pool(self, like: Tensor) -> None:
        rows = self.table.capacity * self.table.block_size
        if self.k is not None and self.k.shape[0] >= rows:
            return
        k = like.new_empty(rows, self.kv_heads, self.head_dim)  # (slots, Hkv, D)
        v = like.new_empty(rows, self.kv_heads, self.head_dim)
        if self.k is not None:
            k[: self.k.shape[0]], v[: self.v.shape[0]] = self.k, self.v
        self.k, self.v = k, v

    def _held(self, s: int, end: int) -> tuple[Tensor, Tensor]:
        """Sequence s's first ``end`` tokens as (1, Hkv, end, D) copies."""
        slots = self.table.slots(s, 0, end, self.k.device)
        return (self.k[slots].permute(1, 0, 2)[None], self.v[slots].permute(1, 0, 2)[None])  # (1, Hkv, end, D)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store new tokens (S, Hkv, n, D) of the selected sequences without attending."""
        self._write(k, v)
        if self.owns_table:
            self.table.advance(k.shape[2])

    def _write(self, k: Tensor, v: Tensor) -> list[int]:
        if k.dim() != 4 or k.shape != v.shape or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"k and v must have shape (S, {self.kv_heads}, n, {self.head_dim}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        S, _, n, _ = k.shape
        self.table.check(S, n)
        self.table.reserve(n)
        self._fit_pool(k)
        ids = self.table.ids()
        for row, s in enumerate(ids):
            start = self.table.lengths[s]
            slots = self.table.slots(s, start, start + n, k.device)
            self.k[slots] = k[row].transpose(0, 1)  # (n, Hkv, D)
            self.v[slots] = v[row].transpose(0, 1)
        return ids

    def attend(self, mha: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check_stateless_module(mha)
        ids = self._write(k, v)
        n = k.shape[2]
        outs = []
        for row, s in enumerate(ids):
            start = self.table.lengths[s]
            if start == 0:  # this sequence's prefill: the method's own path over its prompt
                outs.append(mha.attend(q[row:row + 1], k[row:row + 1], v[row:row + 1]))
            else:
                outs.append(decode_step(mha, q[row:row + 1], *self._held(s, start + n)))
        if self.owns_table:
            self.table.advance(n)
        self.length = self.table.tokens_held()
        return torch.cat(outs, dim=0)

    def nbytes(self) -> int:
        own = self.table.nbytes() if self.owns_table else 0
        return buffers_nbytes(self.k, self.v) + own


class PagedModelCache(ModelCache):
    """``ModelCache`` of paged layers sharing one ``BlockTable``; positions are per sequence."""

    def __init__(self, layers: list[LayerCache], table: BlockTable):
        super().__init__(layers, max_len=table.max_len)
        self.table = table

    def sequences(self, ids: Sequence[int]):
        """Context manager: route the model calls inside to these sequence ids."""
        return self.table.sequences(ids)

    def release(self, s: int) -> None:
        self.table.release(s)

    def check_model(self, model: Any, new_tokens: int) -> None:
        max_len, self.max_len = self.max_len, None  # per sequence, checked by the table
        try:
            super().check_model(model, new_tokens)
        finally:
            self.max_len = max_len

    def positions(self, batch: int, n: int, device: torch.device) -> Tensor:
        self.table.check(batch, n)
        return self.table.positions(n, device)

    def advance(self, n: int) -> None:
        self.table.advance(n)
        self.length = self.table.tokens_held()

    def tokens_held(self) -> int:
        return self.table.tokens_held()

    def nbytes(self) -> int:
        return super().nbytes() + self.table.nbytes()
