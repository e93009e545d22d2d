"""How a sequence is split across ranks: contiguous slices, zigzag, or balanced documents.

With a causal mask and contiguous slices, rank 0's queries see only its own keys while the
last rank's see every key: the last rank does P times the work of the first. The *zigzag*
layout cuts the sequence into ``2·P`` equal chunks and gives rank ``r`` chunks ``r`` and
``2P-1-r``, so every rank holds one early and one late chunk and does the same work::

    P = 4, 8 chunks:   0 1 2 3 4 5 6 7
    contiguous         0 0 1 1 2 2 3 3     (rank holding each chunk)
    zigzag             0 1 2 3 3 2 1 0

``shard``/``unshard`` move between a full sequence and the per-rank slices (no
communication); ``gather`` collects the slices of all ranks through ``all_gather``;
``positions`` gives the global position of every local token (for position embeddings).

Packed documents (causal attention inside each document only) unbalance both layouts: a
rank's work is the number of (query, key) pairs it computes, Σ over its queries of the
query's offset in its document + 1, and a rank that holds the end of a long document does
far more than one holding many short ones. ``documents(ids, P)`` balances that work: it cuts
every document into ``2P`` equal chunks and gives rank ``r`` chunks ``r`` and ``2P-1-r`` (the
zigzag of each document, whose work is the same on every rank, exactly), then hands the
``L mod 2P`` tokens left at the end of each document, one at a time, to the rank with the
least work so far (greedy; a token's work is its offset + 1). Every rank then does the mean
work up to about one token's worth. It returns a ``Partition``: the global positions each rank
holds (its permutation of the sequence), which ``shard``/``unshard``/``gather`` accept in
place of a layout name::

    ids        0 0 0 0 0 0 0 0 0 1 1 1      (P = 2: document 0 has 9 tokens, document 1 has 3)
    chunks     0 0 1 1 1 1 0 0 . . . .      (2P = 4 chunks of 2; token 8 and document 1 left over)
    greedy     . . . . . . . . 0 1 1 1      (each to the rank with less work so far: 27 and 24 pairs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")
# Layout names ``partition`` understands; "documents" needs the document ids.
PARTITIONS = ("contiguous", "zigzag", "documents")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def _check_world(world_size: int, rank: int) -> None:
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def check_zigzag_length(n: int, world_size: int) -> None:
    if n % (2 * world_size):
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2·world_size = {2 * world_size} equal chunks, "
            f"but the sequence length is {n}; pad it to a multiple of {2 * world_size} or use "
            "layout='contiguous'"
        )


def local_lengths(n: int, world_size: int, layout: str = "contiguous") -> list[int]:
    """Tokens each rank holds for a sequence of ``n``; contiguous slices may differ by one."""
    check_layout(layout)
    _check_world(world_size, 0)
    if layout == "zigzag":
        check_zigzag_length(n, world_size)
        return [n // world_size] * world_size
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def _chunk_ranges(n: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global ``[start, stop)`` ranges of the tokens rank ``rank`` holds, in local order."""
    if layout == "zigzag":
        check_zigzag_length(n, world_size)
        c = n // (2 * world_size)
        return [(rank * c, (rank + 1) * c), ((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)]
    lens = local_lengths(n, world_size, layout)
    start = sum(lens[:rank])
    return [(start, start + lens[rank])]


def shard(x: Tensor, world_size: int, rank: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` along ``dim`` (2 for (B, H, N, D)).

    Contiguous slices take ``torch.tensor_split``'s sizes (the first ``N % P`` ranks get one
    token more); zigzag needs ``N`` divisible by ``2·world_size``.

    Raises:
        ValueError: unknown layout, bad rank/world size, or a length zigzag cannot split.
    """
    if isinstance(layout, Partition):
        return layout.shard(x, rank, dim=dim)
    check_layout(layout)
    _check_world(world_size, rank)
    ranges = _chunk_ranges(x.shape[dim], world_size, rank, layout)
    parts = [x.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(parts: Sequence[Tensor], *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's part (``parts[r]`` from rank ``r``)."""
    if isinstance(layout, Partition):
        return layout.unshard(parts, dim=dim)
    check_layout(layout)
    if not parts:
        raise ValueError("unshard: parts must hold one tensor per rank, got none")
    if layout == "contiguous":
        return torch.cat(list(parts), dim)
    if any(p.shape[dim] % 2 for p in parts) or len({p.shape[dim] for p in parts}) != 1:
        raise ValueError(
            f"unshard: zigzag parts must have one even length along dim {dim}, got "
            f"{[p.shape[dim] for p in parts]}"
        )
    firsts = [p.chunk(2, dim)[0] for p in parts]
    seconds = [p.chunk(2, dim)[1] for p in reversed(parts)]
    return torch.cat(firsts + seconds, dim)


def positions(n: int, world_size: int, rank: int, *, layout: str = "contiguous",
              device: torch.device | str | None = None) -> Tensor:
    """(N_local,) int64 global positions of rank ``rank``'s tokens, in local order."""
    if isinstance(layout, Partition):
        return layout.positions[rank].to(device)
    check_layout(layout)
    _check_world(world_size, rank)
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in _chunk_ranges(n, world_size, rank, layout)])


def gather(x: Tensor, *, layout: str = "contiguous", group: dist.ProcessGroup | None = None,
           dim: int = 2) -> Tensor:
    """Every rank's part of the sequence, collected on every rank (``all_gather``).

    Parts may differ in length along ``dim`` (contiguous slices of an uneven sequence).
    """
    if not isinstance(layout, Partition):
        check_layout(layout)
    world = dist.get_world_size(group)
    length = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in lengths]
    x = x.contiguous()
    parts = []
    for n in sizes:
        shape = list(x.shape)
        shape[dim] = n
        parts.append(x.new_empty(shape))
    if len(set(sizes)) == 1:
        dist.all_gather(parts, x, group=group)
    else:
        # all_gather needs equal sizes: pad every part to the longest, then cut.
        longest = max(sizes)
        pad_shape = list(x.shape)
        pad_shape[dim] = longest
        padded = x.new_zeros(pad_shape)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        buffers = [x.new_empty(pad_shape) for _ in range(world)]
        dist.all_gather(buffers, padded, group=group)
        parts = [b.narrow(dim, 0, n) for b, n in zip(buffers, sizes)]
    return unshard(parts, layout=layout, dim=dim)


@dataclass(frozen=True, eq=False)
class Partition:
    """Which global positions every rank holds, in local order: a permutation of 0..N-1.

    ``positions[r]`` (N_r,) int64 are rank r's positions; ``permutation`` is their
    concatenation (the order of the sequence when the ranks' parts are concatenated).
    """

    positions: tuple[Tensor, ...]
    name: str = "partition"

    def __post_init__(self):
        if not self.positions:
            raise ValueError("a Partition needs the positions of at least one rank")
        perm = self.permutation
        if perm.dtype != torch.int64 or not torch.equal(perm.sort().values, torch.arange(perm.numel())):
            raise ValueError(f"a Partition's positions must be a permutation of 0..N-1 (int64), got {perm.numel()} "
                             "positions that are not")

    @property
    def world_size(self) -> int:
        return len(self.positions)

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.positions)

    @property
    def permutation(self) -> Tensor:
        return torch.cat(list(self.positions))

    @property
    def lengths(self) -> list[int]:
        return [p.numel() for p in self.positions]

    def shard(self, x: Tensor, rank: int, *, dim: int = 2) -> Tensor:
        _check_world(self.world_size, rank)
        self._check_length(x.shape[dim])
        return x.index_select(dim, self.positions[rank].to(x.device))

    def unshard(self, parts: Sequence[Tensor], *, dim: int = 2) -> Tensor:
        if len(parts) != self.world_size:
            raise ValueError(f"unshard: expected {self.world_size} parts (one per rank), got {len(parts)}")
        cat = torch.cat(list(parts), dim)  # the sequence in partition order
        self._check_length(cat.shape[dim])
        return torch.empty_like(cat).index_copy_(dim, self.permutation.to(cat.device), cat)

    def _check_length(self, n: int) -> None:
        if n != self.n:
            raise ValueError(f"this {self.name} partition is of a sequence of {self.n} tokens, got {n}")


def partition(layout: str | Partition, n: int, world_size: int, *, documents: Tensor | None = None) -> Partition:
    """The ``Partition`` of a layout name: "contiguous", "zigzag" or "documents" (needs
    ``documents``, the (N,) document id of every token; see ``documents``)."""
    if isinstance(layout, Partition):
        return layout
    if layout == "documents":
        if documents is None:
            raise ValueError("layout='documents' needs documents=, the (N,) document id of every token")
        return balanced_documents(documents, world_size)
    check_layout(layout)
    _check_world(world_size, 0)
    return Partition(tuple(positions(n, world_size, r, layout=layout) for r in range(world_size)), name=layout)


def document_starts(ids: Tensor) -> Tensor:
    """(N,) int64: the position where each token's document starts (ids packed: equal ids adjacent)."""
    ids = check_ids(ids)
    n = ids.numel()
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = ids[1:] != ids[:-1]
    first = torch.where(new, torch.arange(n), torch.zeros(n, dtype=torch.int64))
    return torch.cummax(first, 0).values


def check_ids(ids: Tensor) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"documents must be a (N,) integer tensor of document ids, got {got}")
    return ids.long().cpu()


def attention_pairs(part: Partition, documents: Tensor | None = None, *, causal: bool = True) -> list[int]:
    """Work of every rank: the (query, key) pairs its queries attend to.

    Causal: a query sees the keys from its document's start (0 without documents) to itself;
    non-causal with documents: its whole document; neither: all N keys.
    """
    n = part.n
    if documents is None:
        start = torch.zeros(n, dtype=torch.int64)
        end = torch.full((n,), n, dtype=torch.int64)
    else:
        ids = check_ids(documents)
        if ids.numel() != n:
            raise ValueError(f"documents has {ids.numel()} ids, the partition {n} tokens")
        start = document_starts(ids)
        end = n - document_starts(ids.flip(0)).flip(0)  # one past each token's document
    pos_all = torch.arange(n)
    seen = (pos_all + 1 - start) if causal else (end - start)  # (N,) keys each query sees
    return [int(seen[p].sum()) for p in part.positions]


def imbalance(work: Sequence[int]) -> float:
    """max / mean of the ranks' work (1.0 = perfectly balanced)."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def balanced_documents(documents: Tensor, world_size: int) -> Partition:
    """Partition packed documents so every rank does the same causal work (module docstring).

    Args:
        documents: (N,) document id of every token; a document is a run of equal ids.
        world_size: ranks P.

    Returns:
        A ``Partition``; within each rank, positions are in increasing order.
    """
    ids = check_ids(documents)
    _check_world(world_size, 0)
    n, chunks = ids.numel(), 2 * world_size
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])).flatten().tolist()
    bounds = list(zip(starts, starts[1:] + [n]))
    owner = torch.empty(n, dtype=torch.int64)
    work = [0] * world_size
    tokens = [0] * world_size
    for s, e in bounds:
        length = e - s
        c = length // chunks
        if c:
            # Zigzag inside the document: chunk r and 2P-1-r together cost the same on every rank.
            for r in range(world_size):
                owner[s + r * c:s + (r + 1) * c] = r
                owner[s + (chunks - 1 - r) * c:s + (chunks - r) * c] = r
                work[r] += c * (2 * world_size - 1) * c + c * (c + 1)
                tokens[r] += 2 * c
        for t in range(s + chunks * c, e):
            r = min(range(world_size), key=lambda i: (work[i], tokens[i]))
            owner[t] = r
            work[r] += t - s + 1
            tokens[r] += 1
    order = torch.argsort(owner, stable=True)  # positions grouped by rank, ascending within each
    return Partition(tuple(order.split(torch.bincount(owner, minlength=world_size).tolist())), name="documents")


def random_documents(n: int, low: int, high: int, *, seed: int = 0) -> Tensor:
    """(n,) ids of packed documents with lengths drawn uniformly from [low, high] (the last one
    cut at n): the test and benchmark input."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


__all__ = ["LAYOUTS", "PARTITIONS", "shard", "unshard", "gather", "positions", "local_lengths", "check_layout",
           "Partition", "partition", "balanced_documents", "attention_pairs", "imbalance", "document_starts",
           "random_documents", "check_ids"]
