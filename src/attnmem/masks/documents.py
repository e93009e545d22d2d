"""Document masks for packed sequences: queries see keys of their own document only."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Mask, PerDevice
from .blocks import states_from


class Document(Mask):
    """Queries attend only to keys of the same document (packed sequences).

    ``q_ids``/``kv_ids`` have shape (N,) or (B, N). Tiles whose id ranges are disjoint are
    skipped and tiles inside one document run unmasked; sorted ids (packing) give the most
    skipping, unsorted ids stay correct.
    """

    def __init__(self, q_ids: Tensor, kv_ids: Tensor | None = None):
        for arg, ids in (("ids", q_ids), ("kv_ids", kv_ids)):
            if ids is None:
                continue
            if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"document: {arg} must be an integer tensor of shape (N,) or (B, N)")
            if ids.dim() not in (1, 2):
                raise ValueError(f"document: {arg} must have shape (N,) or (B, N), got {tuple(ids.shape)}")
        self.q_ids = q_ids.long().cpu()
        self.kv_ids = self.q_ids if kv_ids is None else kv_ids.long().cpu()
        self.name = "document"

    def check(self, batch, heads, nq, nk):
        self._check_lengths(nq, nk)
        for ids in (self.q_ids, self.kv_ids):
            if ids.dim() == 2 and ids.shape[0] not in (1, batch):
                raise ValueError(f"document ids of shape {tuple(ids.shape)} do not match batch {batch}")

    def _check_lengths(self, nq, nk):
        if self.q_ids.shape[-1] != nq or self.kv_ids.shape[-1] != nk:
            raise ValueError(
                f"document mask was built for {self.q_ids.shape[-1]} queries and "
                f"{self.kv_ids.shape[-1]} keys, but the inputs have Nq={nq}, Nk={nk}"
            )

    def mask_fn(self, nq, nk):
        self._check_lengths(nq, nk)
        held = PerDevice(self.q_ids, self.kv_ids)

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = held.on(q_idx.device)
            qv = qi[q_idx] if qi.dim() == 1 else qi[b if qi.shape[0] > 1 else 0, q_idx]
            kv = ki[kv_idx] if ki.dim() == 1 else ki[b if ki.shape[0] > 1 else 0, kv_idx]
            return qv == kv

        return mask_mod

    def tile_states(self, g, qi, ki):
        q_min, q_max = _tile_min_max(self.q_ids.reshape(-1, g.nq), g.q_tile)  # (Bm, nqt)
        k_min, k_max = _tile_min_max(self.kv_ids.reshape(-1, g.nk), g.kv_tile)  # (Bm, nkt)
        qmn, qmx, kmn, kmx = q_min[:, qi], q_max[:, qi], k_min[:, ki], k_max[:, ki]
        # Disjoint id ranges are surely empty and one shared id surely full; anything else
        # (overlapping ranges, unsorted ids) is the safe PARTIAL.
        empty = ((qmx < kmn) | (kmx < qmn)).all(0)
        full = ((qmn == qmx) & (kmn == kmx) & (qmn == kmn)).all(0)
        return states_from(empty, full)


def _tile_min_max(ids: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    pad = (-ids.shape[-1]) % tile
    # Repeating the last id leaves every tile's min and max unchanged.
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1) if pad else ids
    tiles = padded.reshape(ids.shape[0], -1, tile)
    return tiles.amin(-1), tiles.amax(-1)


def document(ids: Tensor, kv_ids: Tensor | None = None) -> Document:
    """Block-diagonal mask from document ids of shape (N,) or (B, N)."""
    return Document(ids, kv_ids)
