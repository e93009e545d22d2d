"""Communication wrappers shared by the sequence-parallel schemes, with a byte counter.

Every payload a scheme sends goes through ``send_recv`` (point-to-point, the ring),
``all_to_all`` (Ulysses) or ``all_gather`` (the linear-attention scan). Each adds the bytes
*this rank puts on the wire* to the active ``Traffic`` counters (``count_traffic()``):

* point-to-point: the bytes of every tensor sent;
* ``all_to_all``: the parts addressed to the other ranks (the part a rank keeps is not sent);
* ``all_gather``: ``(P-1)`` times the local tensor — the volume of a ring all-gather
  (gloo's algorithm) and of a direct one alike.

The shape handshakes (a few int64 per rank and call) are counted too, under ``"handshake"``,
so the total is every byte these wrappers move.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class SequenceParallelError(RuntimeError):
    """A peer failed, exited or timed out while this rank waited on it."""


@dataclass
class Traffic:
    """Bytes this rank sent while the counter was active, by kind of payload."""

    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: int = 0

    @property
    def sent_bytes(self) -> int:
        return sum(self.by_kind.values())

    @property
    def payload_bytes(self) -> int:
        """Everything but the shape handshakes."""
        return self.sent_bytes - self.by_kind.get("handshake", 0)

    def add(self, kind: str, nbytes: int) -> None:
        self.by_kind[kind] += int(nbytes)
        self.messages += 1


_ACTIVE: list[Traffic] = []


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the bytes this rank sends through attnmem's sequence-parallel schemes.

    ``with count_traffic() as t: ...; t.sent_bytes``. Counters nest (each sees everything
    sent while it is active).
    """
    t = Traffic()
    _ACTIVE.append(t)
    try:
        yield t
    finally:
        _ACTIVE.remove(t)


def record(kind: str, nbytes: int) -> None:
    for t in _ACTIVE:
        t.add(kind, nbytes)


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def peer_errors(rank: int, world: int, what: str, scheme: str = "sequence-parallel attention",
                error: type[RuntimeError] = SequenceParallelError):
    """Turn a backend error (peer gone, timeout) into one error naming the rank and the step."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, SequenceParallelError):
            raise
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise error(
            f"{scheme}: rank {rank} of {world} failed while {what}: {first} (usually a peer that "
            f"failed, exited or did not answer within the process group's timeout)"
        ) from e


def wait_all(works: Sequence[Any], rank: int, world: int, what: str, scheme: str = "sequence-parallel attention",
             error: type[RuntimeError] = SequenceParallelError) -> None:
    with peer_errors(rank, world, what, scheme, error):
        for w in works:
            if not isinstance(w, Tensor):
                w.wait()


def meta_device(group: Any, like: Tensor) -> torch.device:
    """Where small bookkeeping tensors live: the GPU for NCCL, the CPU for gloo."""
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def all_gather(x: Tensor, group: Any, what: str, *, kind: str = "handshake",
               scheme: str = "sequence-parallel attention",
               error: type[RuntimeError] = SequenceParallelError) -> list[Tensor]:
    """Every rank's ``x`` (all of one shape), in group-rank order; counted as (P-1)·|x|."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    every = [torch.empty_like(x) for _ in range(world)]
    with peer_errors(rank, world, what, scheme, error):
        work = dist.all_gather(every, x, group=group, async_op=True)
    wait_all([work], rank, world, what, scheme, error)
    record(kind, (world - 1) * nbytes(x))
    return every


def gather_ints(values: Sequence[int], group: Any, like: Tensor, what: str,
                scheme: str = "sequence-parallel attention",
                error: type[RuntimeError] = SequenceParallelError) -> list[list[int]]:
    """All-gather a short row of ints from every rank: the handshake of a call."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=meta_device(group, like))
    return [t.tolist() for t in all_gather(mine, group, what, scheme=scheme, error=error)]


@dataclass(frozen=True)
class Rows:
    """``source.index_select(dim, index)`` as a part of ``all_to_all``: gathered straight into
    the send buffer, so the part never exists as a tensor of its own."""

    source: Tensor
    dim: int
    index: Tensor

    @property
    def shape(self) -> torch.Size:
        shape = list(self.source.shape)
        shape[self.dim] = self.index.numel()
        return torch.Size(shape)

    def numel(self) -> int:
        return self.shape.numel()

    def copy_into(self, dst: Tensor) -> None:
        torch.index_select(self.source, self.dim, self.index, out=dst)


def all_to_all(parts: Sequence[Tensor | Rows], recv_shapes: Sequence[Sequence[int]], group: Any, what: str,
               *, kind: str, scheme: str = "sequence-parallel attention") -> list[Tensor]:
    """Send ``parts[s]`` to group rank ``s``; return the tensors received, one per rank.

    One ``all_to_all_single`` over flat buffers, so the parts may differ in size (uneven
    sequence slices); a part may be ``Rows`` (gathered positions). gloo and NCCL both
    implement it. Counts the bytes of the parts sent to the other ranks.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes_in = [p.numel() for p in parts]
    like = parts[0].source if isinstance(parts[0], Rows) else parts[0]
    # Each part is copied straight into its place in one flat buffer: ``cat`` of reshaped
    # strided slices would hold a copy of every part and the buffer at once.
    send = like.new_empty(sum(sizes_in))  # (Σ numel,): part s for rank s
    for piece, part in zip(send.split(sizes_in), parts):
        if isinstance(part, Rows):
            part.copy_into(piece.view(part.shape))
        else:
            piece.view(part.shape).copy_(part)
    sizes_out = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = send.new_empty(sum(sizes_out))
    with peer_errors(rank, world, what, scheme):
        work = dist.all_to_all_single(recv, send, sizes_out, sizes_in, group=group, async_op=True)
    wait_all([work], rank, world, what, scheme)
    record(kind, (send.numel() - sizes_in[rank]) * send.element_size())
    return [piece.view(tuple(shape)) for piece, shape in zip(recv.split(sizes_out), recv_shapes)]


def check_initialised(scheme: str) -> None:
    """RuntimeError unless torch.distributed is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{scheme} needs torch.distributed initialised: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first"
        )


def global_rank(group: Any, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


__all__ = ["Traffic", "count_traffic", "SequenceParallelError", "all_to_all", "all_gather", "gather_ints"]
