"""Key padding: keys marked invalid (padding tokens) are attended by no query."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Mask
from .blocks import Grid, states_from


class KeyPadding(Mask):
    """Keys marked invalid are attended by no query: ``valid`` (B, Nk) or (Nk,) bool.

    The block map comes from per-tile counts of valid keys (one prefix sum, O(B·N + tiles)):
    a key tile with no valid key in any batch row is empty, one whose keys are all valid in
    every batch row is full. Combined with ``causal()`` or a window by ``&``, full tiles of the
    window stay full wherever no padding falls, so only tiles holding padding are evaluated.
    """

    def __init__(self, valid: Tensor):
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
            raise TypeError(f"key_padding: valid must be a bool tensor of shape (B, Nk) or (Nk,), got {got}")
        if valid.dim() not in (1, 2):
            raise ValueError(f"key_padding: valid must have shape (B, Nk) or (Nk,), got {tuple(valid.shape)}")
        self.valid = valid.reshape(-1, valid.shape[-1])  # (Bm, Nk)
        # Tile states are computed on the host; the mask_mod reads the tensor where it lives.
        self._counts = _prefix_rows(self.valid.cpu())  # (Bm, Nk + 1)
        self.name = "key_padding"

    def check(self, batch, heads, nq, nk):
        if self.valid.shape[-1] != nk:
            raise ValueError(f"key_padding: valid covers {self.valid.shape[-1]} keys, but the inputs have Nk={nk}")
        if self.valid.shape[0] not in (1, batch):
            raise ValueError(f"key_padding: valid has {self.valid.shape[0]} rows, but the batch is {batch}")

    def mask_fn(self, nq, nk):
        valid = self.valid

        def mask_mod(b, h, q_idx, kv_idx):
            rows = valid.to(kv_idx.device)
            picked = rows[b if rows.shape[0] > 1 else torch.zeros_like(b), kv_idx]
            return picked & (q_idx >= 0)

        return mask_mod

    def all_valid(self, starts: list[int], stops: list[int]) -> list[bool]:
        """Per range ``[starts[i], stops[i])``: whether all its keys are valid in every batch row
        (from the host prefix counts: no device sync, a few operators for all ranges)."""
        a, b = torch.tensor(starts, dtype=torch.int64), torch.tensor(stops, dtype=torch.int64)
        return (self._counts[:, b] - self._counts[:, a] == b - a).all(0).tolist()

    def empty_rows(self, left: int) -> Tensor:
        """(Bm, Nk) bools, on the host: queries of a square problem whose window ``[q - left, q]``
        holds no valid key."""
        stop = torch.arange(1, self._counts.shape[1])
        return self._counts[:, stop] == self._counts[:, (stop - 1 - left).clamp_min(0)]

    def _tile_counts(self, g: Grid, ki: Tensor) -> tuple[Tensor, Tensor]:
        ka = ki * g.kv_tile
        kb = torch.clamp(ka + g.kv_tile, max=g.nk)
        return self._counts[:, kb] - self._counts[:, ka], kb - ka  # (Bm, ...), (...)

    def tile_states(self, g, qi, ki):
        n_valid, size = self._tile_counts(g, ki)
        return states_from((n_valid == 0).all(0), (n_valid == size).all(0))

    def kv_tile_candidates(self, g):
        tiles = torch.arange(g.num_kv_tiles, dtype=torch.int64)
        n_valid, _ = self._tile_counts(g, tiles)
        some = (n_valid > 0).any(0)
        if bool(some.all()):
            return None
        return tiles[some][None, :].expand(g.num_q_tiles, -1)


def _prefix_rows(flags: Tensor) -> Tensor:
    out = torch.zeros(flags.shape[0], flags.shape[1] + 1, dtype=torch.int64)
    out[:, 1:] = flags.long().cumsum(1)
    return out


def key_padding(valid: Tensor) -> KeyPadding:
    """Key padding: ``valid`` (B, Nk) bool, True = a real key; padded keys are never attended."""
    return KeyPadding(valid)
