"""FlexAttention adapter: attnmem's block maps as FlexAttention ``BlockMask``s (CUDA path).

The same ``mask_mod`` and block map that the tiled kernel schedules on CPU go to
``torch.nn.attention.flex_attention`` on CUDA, so empty tiles are skipped there as well.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import masks as M

# FlexAttention's kernels tile by 128 × 128 on CUDA.
FLEX_TILE = 128


@functools.cache
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# Masks whose mask_mod FlexAttention can trace (no side effects such as per-device caches).
FLEX_SAFE = (M.SlidingWindow, M.Dilated, M.GlobalTokens, M.BigBird, M.Strided, M.Fixed)


def flex_safe(mask: M.Mask) -> bool:
    if isinstance(mask, M.Combined):
        return flex_safe(mask.a) and flex_safe(mask.b)
    return isinstance(mask, FLEX_SAFE)


def flex_block_mask(bm: M.BlockMap, mask_mod: M.MaskMod, device: torch.device | str = "cpu"):
    """FlexAttention ``BlockMask`` from an attnmem ``BlockMap``.

    FlexAttention keeps partial and full tiles apart: ``kv_num_blocks``/``kv_indices`` list the
    tiles whose ``mask_mod`` must run, ``full_kv_num_blocks``/``full_kv_indices`` those that run
    unmasked; each (B=1, H=1, num_q_tiles[, num_kv_tiles]) int32, listed tiles first, ascending.
    """
    from torch.nn.attention.flex_attention import BlockMask

    valid = bm.kv_indices >= 0

    def pack(sel: Tensor) -> tuple[Tensor, Tensor]:
        counts = sel.sum(1)
        # A stable sort moves the selected tiles first, in their ascending order.
        order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices
        idx = torch.gather(bm.kv_indices.clamp(min=0), 1, order)
        # FlexAttention's index tables are num_kv_tiles wide (its to_dense relies on it).
        idx = torch.nn.functional.pad(idx, (0, bm.num_kv_tiles - idx.shape[1]))
        idx = idx.masked_fill(torch.arange(idx.shape[1])[None, :] >= counts[:, None], 0)
        return (counts.to(torch.int32)[None, None].to(device),
                idx.to(torch.int32)[None, None].contiguous().to(device))  # (1, 1, nqt[, nkt])

    kv_num, kv_idx = pack(valid & ~bm.kv_full)
    full_num, full_idx = pack(valid & bm.kv_full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm.q_tile, bm.kv_tile),
                                    mask_mod=mask_mod, seq_lengths=(bm.nq, bm.nk))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: M.Mask | None, scale: float,
                   tile: int = FLEX_TILE, score_mod=None) -> Tensor:  # pragma: no cover - needs CUDA
    """Exact attention under ``mask`` through FlexAttention (CUDA), over attnmem's block map.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with ``Hq % Hkv == 0``.
        mask: a mask that ``flex_safe`` accepts (its ``mask_mod`` is traced by FlexAttention),
            or None (every pair).
        scale: multiplier of QKᵀ.
        tile: the block size of the block mask (FlexAttention's kernels tile by 128 on CUDA).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``, passed through
            unchanged (attnmem's score_mods have that signature). Untested here: this
            project's machines have no GPU.

    Returns:
        (B, Hq, Nq, D); rows with no key come back as zeros.
    """
    nq, nk = q.shape[2], k.shape[2]
    block_mask = None
    if mask is not None:
        bm = mask.block_map(nq, nk, tile, tile, batch=q.shape[0], heads=q.shape[1])
        block_mask = flex_block_mask(bm, mask.mask_fn(nq, nk), q.device)
    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            enable_gqa=q.shape[1] != k.shape[1])
