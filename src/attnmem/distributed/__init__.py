"""Past one machine: sequence-parallel ring attention on torch.distributed.

``ring_attention`` runs exact attention over a sequence split across the ranks of a process
group (gloo on CPU, NCCL on CUDA, launched with ``torchrun``); ``shard``/``unshard``/``gather``
move a sequence into and out of the ``contiguous`` or load-balanced ``zigzag`` layout.
"""

from .layout import LAYOUTS, gather, local_lengths, positions, shard, unshard
from .ring import RingAttentionError, SequenceParallel, ring_attention

__all__ = [
    "ring_attention", "RingAttentionError", "SequenceParallel",
    "LAYOUTS", "shard", "unshard", "gather", "positions", "local_lengths",
]
