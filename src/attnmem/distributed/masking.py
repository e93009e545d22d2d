"""Global masks seen from one rank: at its tokens' global positions, for a slice of heads.

A sequence-parallel call takes the mask of the WHOLE sequence (global positions, all heads);
each local attention call sees only some positions (ring: my queries × a visiting block, in
any layout) or some heads (Ulysses: H/P heads of the full sequence). These wrappers evaluate
the global ``mask_mod`` at the right indices, so any attnmem mask works unchanged.
"""

from __future__ import annotations

from torch import Tensor

from .. import masks as M
from ..masks.base import PerDevice


class AtPositions(M.Mask):
    """``mask`` (over a sequence of ``n``) restricted to queries at global positions ``q_pos``
    and keys at ``k_pos``: local pair (i, j) is allowed iff global pair (q_pos[i], k_pos[j]) is.

    Its block map evaluates the mask per tile (``Mask.tile_states``'s default): exact, in
    O(tile · N_local) memory.
    """

    def __init__(self, mask: M.Mask, q_pos: Tensor, k_pos: Tensor, n: int):
        self.inner, self.n = mask, n
        self.q_pos, self.k_pos = q_pos.long(), k_pos.long()
        self.name = f"{mask.name}@positions"

    def mask_fn(self, nq: int, nk: int) -> M.MaskMod:
        if (nq, nk) != (self.q_pos.numel(), self.k_pos.numel()):
            raise ValueError(f"AtPositions built for {self.q_pos.numel()}×{self.k_pos.numel()} pairs, "
                             f"used for {nq}×{nk}")
        fn = self.inner.mask_fn(self.n, self.n)
        held = PerDevice(self.q_pos, self.k_pos)

        def mask_mod(b, h, q_idx, kv_idx):
            qp, kp = held.on(q_idx.device)
            return fn(b, h, qp[q_idx], kp[kv_idx])

        return mask_mod


def _head_dependent(mask: M.Mask) -> bool:
    if isinstance(mask, M.Dense):
        return mask.tensor.shape[1] > 1
    if isinstance(mask, M.Combined):
        return _head_dependent(mask.a) or _head_dependent(mask.b)
    # A user's mask_mod may read h; the structured masks are the same for every head.
    return isinstance(mask, M.FromMod) or not isinstance(
        mask, (M.SlidingWindow, M.Document, M.BlockSparse, M.Dilated, M.GlobalTokens, M.BigBird, M.Strided,
               M.Fixed))


def heads_slice(mask: M.Mask | None, start: int, stop: int) -> M.Mask | None:
    """The mask for heads ``start:stop`` of the global heads, re-indexed from 0.

    Head-independent masks come back unchanged (so methods keep their structured paths); a
    dense mask is sliced; a ``mask_mod`` that may read ``h`` gets ``h + start``.
    """
    if mask is None or not _head_dependent(mask):
        return mask
    if isinstance(mask, M.Dense):
        return M.Dense(mask.tensor[:, start:stop])  # (Bm, stop-start, Nq, Nk)
    if isinstance(mask, M.And):
        return M.And(heads_slice(mask.a, start, stop), heads_slice(mask.b, start, stop))
    if isinstance(mask, M.Or):
        return M.Or(heads_slice(mask.a, start, stop), heads_slice(mask.b, start, stop))
    return _HeadOffset(mask, start)


class _HeadOffset(M.Mask):
    """A mask whose head index is shifted by ``start`` (local head h is global head h + start)."""

    def __init__(self, mask: M.Mask, start: int):
        self.inner, self.start = mask, start
        self.name = f"{mask.name}[heads {start}:]"

    def mask_fn(self, nq: int, nk: int) -> M.MaskMod:
        fn = self.inner.mask_fn(nq, nk)
        return lambda b, h, q_idx, kv_idx: fn(b, h + self.start, q_idx, kv_idx)
