"""Attention masks as small named functions, with block maps that never build N×N.

A mask says which (query, key) pairs may attend (``True`` = attend, SDPA's convention). Every
mask offers three views of itself:

* ``mask_fn(nq, nk)`` — a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``
  bound to the sequence lengths (needed for the bottom-right causal alignment below). It is
  evaluated on broadcast index tensors, one tile at a time.
* ``block_map(nq, nk, q_tile, kv_tile)`` — for each query tile, the key tiles that are
  *partial* (some pairs allowed) or *full* (all pairs allowed); *empty* tiles are left out.
  Structured masks compute it from their structure in O(number of listed tiles); it never
  holds an N×N tensor.
* ``to_dense(nq, nk)`` — the dense bool tensor, for the ``reference`` oracle and small tests.

Causal alignment when ``nq != nk`` is **bottom-right**, as in FlashAttention ≥ 2.1 and KV-cache
decoding: the last query sees the last key. Query ``i`` sees key ``j`` iff
``j <= i + (nk - nq)``::

    nq = 2, nk = 5           nq = 5, nk = 2
      k: 0 1 2 3 4             k: 0 1
    q0   1 1 1 1 0           q0   0 0    <- rows with nothing to attend return zeros
    q1   1 1 1 1 1           q1   0 0
                             q2   0 0
                             q3   1 0
                             q4   1 1

Masks combine with ``&`` and ``|``; ``from_mod`` wraps any attention-gym style ``mask_mod``.
"""


from .base import And, Combined, Dense, Mask, Or, as_mask, dense, eval_mask
from .bigbird_blocks import BigBird, bigbird
from .blocks import EMPTY, FULL, PARTIAL, BlockMap, Grid, MaskMod, ranges_to_candidates, union_candidates
from .custom import FromMod, from_mod
from .dilated_window import Dilated, dilated
from .documents import Document, document
from .global_attention import GlobalTokens, global_tokens, longformer, streaming
from .layouts import BlockSparse, block_sparse, random_blocks
from .padding import KeyPadding, key_padding
from .sparse_transformer import Fixed, Strided, fixed, strided
from .window import Band, SlidingWindow, causal, combine, sliding_window

__all__ = [
    "BlockMap", "Grid", "Mask", "MaskMod", "EMPTY", "PARTIAL", "FULL",
    "causal", "sliding_window", "document", "key_padding", "KeyPadding", "from_mod", "dense", "combine",
    "as_mask", "eval_mask",
    "block_sparse", "random_blocks",
    "SlidingWindow", "Band", "Document", "FromMod", "Dense", "BlockSparse", "And", "Or", "Combined",
    "ranges_to_candidates", "union_candidates",
    "dilated", "global_tokens", "longformer", "bigbird", "strided", "fixed", "streaming",
    "Dilated", "GlobalTokens", "BigBird", "Strided", "Fixed",
]
