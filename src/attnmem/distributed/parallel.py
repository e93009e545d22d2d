"""``SequenceParallel``: how ``attnmem.nn`` modules split their sequence across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import layout as L
from .comm import gather_ints
from .hybrid import hybrid_partition, sequence_parallel_attention
from .linear import linear_context_parallel
from .ring import ring_attention
from .ulysses import ulysses_attention

SCHEMES = ("ring", "ulysses", "hybrid")
# Methods the ring computes exactly as written (exact softmax over all allowed pairs).
_EXACT = ("auto", "chunked", "reference", "sdpa")
_RING_OPTIONS = ("q_tile", "kv_tile", "kernel")


@dataclass(frozen=True)
class SequenceParallel:
    """A scheme, a layout and a process group for ``attnmem.nn`` modules.

    ``attnmem.nn.Transformer(..., sequence_parallel=True)`` uses ``SequenceParallel()`` (ring,
    zigzag, the world group); ``sequence_parallel="ulysses"`` / ``"hybrid"`` pick a scheme; pass
    an instance to choose everything. Each rank feeds its own tokens (``self.partition(N)
    .shard(tokens, rank, dim=1)``); position embeddings use the tokens' global positions.

    * ``"ring"``: ``ring_attention`` (exact softmax; ``method="linear"`` with causal runs
      ``linear_context_parallel`` instead, contiguous layout only);
    * ``"ulysses"``: ``ulysses_attention``, any method and its options;
    * ``"hybrid"``: ``sequence_parallel_attention`` on ``ulysses × ring`` ranks (default: the
      largest proper divisor of the world size that splits the heads, × the rest).

    Masks passed to the modules are masks of the whole sequence (global positions).
    ``heads_per_pass`` is the ring's (KV heads per pass: "ring" and the hybrid's ring);
    ``ulysses_heads_per_pass`` is Ulysses' (query heads per rank per pass, recomputed in the
    backward: "ulysses" and the hybrid's Ulysses level). ``query_blocks`` is Ulysses' and
    ``kv_blocks`` the ring's ("ring" and the hybrid's ring); None keeps each function's default.
    """

    scheme: str = "ring"
    layout: str = "zigzag"
    group: Any = None
    heads_per_pass: int | None = None
    ulysses_heads_per_pass: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    documents: Tensor | None = None
    query_blocks: int | None = None
    kv_blocks: int | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.layout not in L.PARTITIONS:
            raise ValueError(f"layout must be one of {', '.join(L.PARTITIONS)}, got {self.layout!r}")
        if self.layout == "documents" and self.documents is None:
            raise ValueError("layout='documents' needs documents=, the (N,) document id of every token")
        if (self.ulysses is not None or self.ring is not None) and self.scheme != "hybrid":
            raise ValueError(f"ulysses=/ring= set the grid of scheme='hybrid', got scheme={self.scheme!r}")
        if self.heads_per_pass is not None and self.scheme == "ulysses":
            raise ValueError("heads_per_pass= is the ring's; scheme='ulysses' takes ulysses_heads_per_pass=")
        if self.ulysses_heads_per_pass is not None and self.scheme == "ring":
            raise ValueError("ulysses_heads_per_pass= is Ulysses'; scheme='ring' takes heads_per_pass=")
        if self.query_blocks is not None and self.scheme != "ulysses":
            raise ValueError(f"query_blocks= is Ulysses'; scheme={self.scheme!r} takes kv_blocks=")
        if self.kv_blocks is not None and self.scheme == "ulysses":
            raise ValueError("kv_blocks= is the ring's; scheme='ulysses' takes query_blocks=")

    def grid(self, heads: int, kv_heads: int) -> tuple[int, int]:
        """(U, R) of the hybrid scheme for these heads."""
        world = dist.get_world_size(self.group)
        if self.ulysses is not None or self.ring is not None:
            u = self.ulysses or world // (self.ring or 1)
            return u, self.ring or world // u
        fits = [u for u in range(1, world + 1) if world % u == 0 and heads % u == 0
                and (kv_heads % u == 0 or u % kv_heads == 0)]
        proper = [u for u in fits if u < world] or fits
        u = max(proper)
        return u, world // u

    def partition(self, n: int, heads: int | None = None, kv_heads: int | None = None) -> L.Partition:
        """Where every rank's tokens lie in a sequence of ``n`` (``heads`` for the hybrid grid)."""
        world = dist.get_world_size(self.group)
        if self.scheme == "hybrid":
            u, r = self.grid(heads or world, kv_heads or heads or world)
            return hybrid_partition(self.layout, n, ulysses=u, ring=r, documents=self.documents)
        return L.partition(self.layout, n, world, documents=self.documents)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Any = None, method: str = "auto",
               scale: float | None = None, **options: Any) -> Tensor:
        if self.scheme == "ulysses":
            part = self._layout_for(q)
            return ulysses_attention(q, k, v, causal=causal, mask=mask, method=method, group=self.group,
                                     layout=part, scale=scale, heads_per_pass=self.ulysses_heads_per_pass,
                                     query_blocks=self.query_blocks, **options)
        if method == "linear" and self.scheme == "ring":
            return self._linear(q, k, v, causal, mask, options)
        if method not in _EXACT:
            raise ValueError(
                f"sequence_parallel={self.scheme!r} runs exact softmax attention (or, for 'ring', causal "
                f"method='linear'); method={method!r} is neither: use sequence_parallel='ulysses', which runs "
                "any method on the full sequence of H/P heads")
        unknown = sorted(set(options) - set(_RING_OPTIONS))
        if unknown:
            raise ValueError(f"sequence_parallel={self.scheme!r} takes only the options {', '.join(_RING_OPTIONS)}, "
                             f"got {', '.join(unknown)}")
        if self.scheme == "ring":
            return ring_attention(q, k, v, causal=causal, mask=mask, group=self.group, layout=self._layout_for(q),
                                  scale=scale, heads_per_pass=self.heads_per_pass, kv_blocks=self.kv_blocks or 1,
                                  **options)
        u, r = self.grid(q.shape[1], k.shape[1])
        return sequence_parallel_attention(q, k, v, ulysses=u, ring=r, layout=self.layout, causal=causal,
                                           mask=mask, documents=self.documents, group=self.group, scale=scale,
                                           heads_per_pass=self.heads_per_pass,
                                           ulysses_heads_per_pass=self.ulysses_heads_per_pass,
                                           kv_blocks=self.kv_blocks, **options)

    def _layout_for(self, q: Tensor) -> str | L.Partition:
        if self.layout != "documents":
            return self.layout
        return L.balanced_documents(self.documents, dist.get_world_size(self.group))

    def _linear(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Any, options: dict) -> Tensor:
        if not causal or mask is not None or self.layout != "contiguous":
            raise ValueError(
                "sequence-parallel method='linear' is causal linear attention over contiguous slices (the state "
                f"is scanned across ranks); got causal={causal}, mask={'set' if mask is not None else None}, "
                f"layout={self.layout!r}")
        unknown = sorted(set(options) - {"feature_map", "chunk"})
        if unknown:
            raise ValueError("sequence-parallel method='linear' takes feature_map= and chunk=, got "
                             f"{', '.join(unknown)}")
        return linear_context_parallel(q, k, v, group=self.group, **options)

    def positions(self, n_local: int, device: torch.device | str | None = None, *, heads: int | None = None,
                  kv_heads: int | None = None) -> Tensor:
        """(N_local,) global positions of this rank's tokens (every rank's length is gathered)."""
        every = gather_ints([n_local], self.group, torch.empty(0, device=device),
                            "exchanging sequence lengths with the other ranks")
        lengths = [row[0] for row in every]
        rank = dist.get_rank(self.group)
        if self.layout == "contiguous" and self.scheme != "hybrid":
            start = sum(lengths[:rank])
            return torch.arange(start, start + n_local, device=device)
        part = self.partition(sum(lengths), heads, kv_heads)
        if part.lengths != lengths:
            raise ValueError(f"the ranks hold {lengths} tokens, but the {self.layout} layout of {sum(lengths)} "
                             f"gives them {part.lengths}; shard with SequenceParallel.partition(N).shard")
        return part.positions[rank].to(device)
