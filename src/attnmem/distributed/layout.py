"""How a sequence is split across ranks: contiguous slices or the zigzag layout.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


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
    check_layout(layout)
    _check_world(world_size, rank)
    ranges = _chunk_ranges(x.shape[dim], world_size, rank, layout)
    parts = [x.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(parts: Sequence[Tensor], *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's part (``parts[r]`` from rank ``r``)."""
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
    check_layout(layout)
    _check_world(world_size, rank)
    return torch.cat([torch.arange(a, b, device=device)
                      for a, b in _chunk_ranges(n, world_size, rank, layout)])


def gather(x: Tensor, *, layout: str = "contiguous", group: dist.ProcessGroup | None = None,
           dim: int = 2) -> Tensor:
    """Every rank's part of the sequence, collected on every rank (``all_gather``).

    Parts may differ in length along ``dim`` (contiguous slices of an uneven sequence).
    """
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


__all__ = ["LAYOUTS", "shard", "unshard", "gather", "positions", "local_lengths", "check_layout"]
