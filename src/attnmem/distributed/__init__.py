"""Past one machine: sequence parallelism on torch.distributed.

* ``ring_attention`` — key/value blocks travel round a ring (Liu et al. 2023);
* ``ulysses_attention`` — all-to-all from sequence shards to head shards (DeepSpeed-Ulysses),
  any attnmem method locally;
* ``sequence_parallel_attention`` — both on a U × R grid (USP);
* ``linear_context_parallel`` — causal linear attention with its state scanned across ranks.

``shard``/``unshard``/``gather`` move a sequence into and out of the ``contiguous`` or
load-balanced ``zigzag`` layout or any ``Partition`` (``balanced_documents`` for packed
documents); ``count_traffic`` counts the bytes each rank sends, ``traffic`` predicts them.
gloo on CPU is tested; NCCL is the same code, untested here.
"""

from .comm import SequenceParallelError, Traffic, count_traffic
from .hybrid import ProcessGrid, hybrid_partition, process_grid, sequence_parallel_attention
from .layout import (
    LAYOUTS,
    PARTITIONS,
    Partition,
    attention_pairs,
    balanced_documents,
    gather,
    imbalance,
    local_lengths,
    partition,
    positions,
    shard,
    unshard,
)
from .linear import linear_context_parallel
from .parallel import SCHEMES, SequenceParallel
from .ring import RingAttentionError, ring_attention
from .ulysses import ulysses_attention

__all__ = [
    "ring_attention", "ulysses_attention", "sequence_parallel_attention", "linear_context_parallel",
    "RingAttentionError", "SequenceParallelError", "SequenceParallel", "ProcessGrid", "process_grid",
    "SCHEMES", "LAYOUTS", "PARTITIONS", "Partition", "partition", "balanced_documents", "hybrid_partition",
    "attention_pairs", "imbalance", "shard", "unshard", "gather", "positions", "local_lengths",
    "Traffic", "count_traffic",
]
