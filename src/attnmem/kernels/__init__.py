"""Exact attention kernels: the tiled FlashAttention schedule and the pieces others reuse.

- ``tiled``: ``tiled_attention`` (autograd), ``tiled_attention_lse`` (partial attention that also
  returns its log-sum-exp), ``tiled_backward_lse`` (gradients through one block of keys given
  the whole row's log-sum-exp) and ``TileContext``, the per-call plan both passes share.
- ``merge``: ``merge_partials``, the log-sum-exp merge of partial results, and ``merge``
  (``attnmem.merge``) over a list of them.
- ``mods``: score_mod, dropout and the tensors a score_mod captures (``Mods``, ``make_mods``).
- ``autograd``: ``LseAttention``, the autograd function that saves only out and lse.
- ``segments``: ``block_rows`` and ``plan_segments``, which keys each query tile computes.
- ``banded``: a causal sliding window as one fused-operator call per query segment over the keys
  it sees (``plan_call`` decides when).
- ``tile``: the two tile kernels (``fused`` CPU operator, ``torch``) and ``resolve_kernel``.
- ``flex``: the FlexAttention adapter (``flex_block_mask``, ``flex_attention``) for CUDA.
- ``native``: attnmem's own C++ CPU kernel (softcap), compiled on first use.
"""

from .autograd import LseAttention
from .flex import FLEX_TILE, flex_attention, flex_available, flex_block_mask, flex_safe
from .merge import merge, merge_partials
from .mods import Mods, ScoreMod, TileMods, captured_tensors, dropout_keep, fast_kind, make_mods
from .segments import MAX_GATHER, MAX_SEGMENT, MIN_Q_TILE, Segment, block_rows, plan_segments
from .tile import (
    CAUSAL_TILE,
    FUSED_DTYPES,
    KERNELS,
    TILE_KERNELS,
    acc_dtype,
    fused_available,
    fused_backward,
    fused_backward_acc,
    fused_forward,
    resolve_kernel,
    torch_backward,
    torch_forward,
)
from .tiled import (
    CallPlan,
    Run,
    TileContext,
    TiledRun,
    allowed_bool,
    apply_sinks,
    native_gqa,
    plan_call,
    row_dot,
    run_exact,
    tiled_attention,
    tiled_attention_lse,
    tiled_backward,
    tiled_backward_lse,
    tiled_forward,
)

__all__ = [
    "CAUSAL_TILE", "FLEX_TILE", "FUSED_DTYPES", "KERNELS", "MAX_GATHER", "MAX_SEGMENT", "MIN_Q_TILE",
    "TILE_KERNELS", "LseAttention", "Segment", "TileContext", "acc_dtype", "allowed_bool", "block_rows",
    "flex_attention", "flex_available", "flex_block_mask", "flex_safe", "fused_available",
    "fused_backward", "fused_forward", "merge_partials", "plan_segments", "resolve_kernel",
    "tiled_attention", "tiled_attention_lse", "tiled_backward", "tiled_backward_lse",
    "tiled_forward", "torch_backward", "torch_forward",
    "Mods", "ScoreMod", "TileMods", "captured_tensors", "dropout_keep", "fast_kind", "make_mods", "merge",
    "fused_backward_acc", "CallPlan", "native_gqa", "plan_call", "Run", "TiledRun", "apply_sinks", "row_dot",
    "run_exact",
]
