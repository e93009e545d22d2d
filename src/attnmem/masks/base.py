"""The ``Mask`` type and its algebra: ``&`` (``And``), ``|`` (``Or``) and the dense bool
tensor mask that ``mask & tensor`` wraps (``Dense``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import EMPTY, FULL, PARTIAL, BlockMap, Grid, MaskMod, dense_tile_states, union_candidates


class PerDevice:
    """Tensors a ``mask_mod`` reads, copied once to each device it is called on: the tile
    states evaluate it on the CPU, the kernels on the inputs' device, so one copy per call
    would repeat a host-device transfer for every tile. The first call on a device writes to
    this holder, a side effect FlexAttention's trace refuses: a mask using one stays out of
    ``kernels.flex.FLEX_SAFE``."""

    def __init__(self, *tensors: Tensor):
        self.tensors = tensors
        self.copies: dict[torch.device, tuple[Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, ...]:
        if device not in self.copies:
            self.copies[device] = tuple(t.to(device) for t in self.tensors)
        return self.copies[device]


class Mask:
    """Base class: subclasses define ``mask_fn`` and, where they can, the structural hooks."""

    name = "mask"

    # --- what subclasses provide -------------------------------------------------------
    def mask_fn(self, nq: int, nk: int) -> MaskMod:
        """The ``mask_mod(b, h, q_idx, kv_idx)`` of this mask for these sequence lengths."""
        raise NotImplementedError

    def tile_states(self, g: Grid, qi: Tensor, ki: Tensor) -> Tensor:
        """EMPTY/PARTIAL/FULL (int8) for the tile pairs ``(qi, ki)``, int64 tensors of one shape.

        Must be exact for EMPTY and FULL over every batch and head of ``g``; PARTIAL is always
        a safe answer. The default evaluates ``mask_fn`` one query tile at a time: O(N²) time
        but only O(tile · N) memory.
        """
        fn = self.mask_fn(g.nq, g.nk)
        out = torch.full(qi.shape, PARTIAL, dtype=torch.int8)
        b = torch.arange(g.batch)[:, None, None, None]
        h = torch.arange(g.heads)[None, :, None, None]
        keys = torch.arange(g.nk)[None, :]
        for t in torch.unique(qi).tolist():
            a = t * g.q_tile
            rows = torch.arange(a, min(a + g.q_tile, g.nq))[:, None]
            allowed = eval_mask(fn, b, h, rows, keys)
            allowed = allowed.expand(*allowed.shape[:2], rows.shape[0], g.nk)
            states = dense_tile_states(allowed, rows.shape[0], g.kv_tile)[0]  # (nkt,)
            sel = qi == t
            out[sel] = states[ki[sel]]
        return out

    def kv_tile_candidates(self, g: Grid) -> Tensor | None:
        """(num_q_tiles, C) key tiles that may be non-empty, -1 padded; None means all."""
        return None

    # --- derived ------------------------------------------------------------------------
    def block_map(self, nq: int, nk: int, q_tile: int, kv_tile: int | None = None, *,
                  batch: int = 1, heads: int = 1) -> BlockMap:
        """The block map of this mask for one tiling; never holds an N×N tensor."""
        kv_tile = kv_tile or q_tile
        if q_tile <= 0 or kv_tile <= 0:
            raise ValueError(f"tile sizes must be positive, got q_tile={q_tile}, kv_tile={kv_tile}")
        g = Grid(nq, nk, q_tile, kv_tile, batch, heads)
        nqt, nkt = g.num_q_tiles, g.num_kv_tiles
        cand = self.kv_tile_candidates(g)
        if cand is None:
            cand = torch.arange(nkt, dtype=torch.int64).expand(nqt, nkt)
        valid = cand >= 0
        safe = cand.clamp(min=0)
        if nqt == 0 or nkt == 0 or cand.shape[1] == 0:
            states = torch.zeros(nqt, cand.shape[1], dtype=torch.int8)
        else:
            qi = torch.arange(nqt, dtype=torch.int64)[:, None].expand_as(cand)
            states = self.tile_states(g, qi, safe)
        states = torch.where(valid, states, torch.zeros_like(states))
        keep = states != EMPTY
        counts = keep.sum(1)
        width = int(counts.max()) if nqt else 0
        # A stable sort moves kept tiles first and keeps them in ascending order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        idx = torch.gather(cand, 1, order)
        full = torch.gather(states, 1, order) == FULL
        pad = torch.arange(width)[None, :] >= counts[:, None]
        idx = idx.masked_fill(pad, -1)
        full = full.masked_fill(pad, False)
        return BlockMap(nq, nk, q_tile, kv_tile, idx.contiguous(), full.contiguous(), counts)

    def to_dense(self, nq: int, nk: int, batch: int = 1, heads: int = 1) -> Tensor:
        """Dense bool mask of shape (batch, heads, nq, nk); for the oracle and tests."""
        b = torch.arange(batch)[:, None, None, None]
        h = torch.arange(heads)[None, :, None, None]
        q = torch.arange(nq)[:, None]
        k = torch.arange(nk)[None, :]
        return eval_mask(self.mask_fn(nq, nk), b, h, q, k).expand(batch, heads, nq, nk).clone()

    def check(self, batch: int, heads: int, nq: int, nk: int) -> None:
        """Raise ValueError when this mask cannot apply to inputs of these sizes."""

    def __and__(self, other: Mask | Tensor) -> Mask:
        return And(self, as_mask(other, "other"))

    def __or__(self, other: Mask | Tensor) -> Mask:
        return Or(self, as_mask(other, "other"))

    def __repr__(self) -> str:
        return self.name


def eval_mask(fn: MaskMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Evaluate a mask_mod on broadcast indices; always a 4-d bool (Bm, Hm, Tq, Tk)."""
    m = torch.as_tensor(fn(b, h, q_idx, kv_idx), dtype=torch.bool, device=q_idx.device)
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def as_mask(m: object, arg: str = "mask") -> Mask:
    """A Mask from a Mask or a dense bool tensor; TypeError naming ``arg`` otherwise."""
    if isinstance(m, Mask):
        return m
    if isinstance(m, Tensor):
        return dense(m)
    raise TypeError(
        f"{arg} must be None, a bool tensor or an attnmem.masks.Mask, got {type(m).__name__}"
    )



class Dense(Mask):
    """A bool tensor broadcastable to (B, H, Nq, Nk), True = attend."""

    def __init__(self, tensor: Tensor):
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.bool:
            got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise TypeError(f"mask must be a bool tensor (True = attend), got {got}")
        if not 1 <= tensor.dim() <= 4:
            raise ValueError(
                f"mask must have 1 to 4 dims broadcastable to (B, H, Nq, Nk), got shape {tuple(tensor.shape)}"
            )
        self.tensor = tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))  # (Bm, Hm, Nq, Nk)
        self.name = "dense"

    def check(self, batch, heads, nq, nk):
        want = (batch, heads, nq, nk)
        if any(have not in (1, need) for have, need in zip(self.tensor.shape, want)):
            raise ValueError(
                f"mask of shape {tuple(self.tensor.shape)} does not broadcast to (B, H, Nq, Nk) = {want}"
            )

    def mask_fn(self, nq, nk):
        held = PerDevice(self.tensor)

        def mask_mod(b, h, q_idx, kv_idx):
            (m,) = held.on(q_idx.device)
            pick = [i if size > 1 else torch.zeros_like(i)
                    for i, size in zip(torch.broadcast_tensors(b, h, q_idx, kv_idx), m.shape)]
            return m[pick[0], pick[1], pick[2], pick[3]]

        return mask_mod

    def tile_states(self, g, qi, ki):
        t = self.tensor.expand(*self.tensor.shape[:2], g.nq, g.nk).cpu()
        return dense_tile_states(t, g.q_tile, g.kv_tile)[qi, ki]

    def to_dense(self, nq, nk, batch=1, heads=1):
        return self.tensor.expand(batch, heads, nq, nk).clone()


def dense(tensor: Tensor) -> Dense:
    """Wrap a dense bool tensor (True = attend) broadcastable to (B, H, Nq, Nk)."""
    return Dense(tensor)



class Combined(Mask):
    """Two masks joined by a set operation (``And``, ``Or``); each is checked for the shapes."""

    symbol = ""

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.name = f"({a!r} {self.symbol} {b!r})"

    def check(self, batch, heads, nq, nk):
        self.a.check(batch, heads, nq, nk)
        self.b.check(batch, heads, nq, nk)


class And(Combined):
    """Pairs allowed by both masks."""

    symbol = "&"

    def mask_fn(self, nq, nk):
        fa, fb = self.a.mask_fn(nq, nk), self.b.mask_fn(nq, nk)
        return lambda b, h, q, k: fa(b, h, q, k) & fb(b, h, q, k)

    def tile_states(self, g, qi, ki):
        # EMPTY < PARTIAL < FULL: both full is full, either empty is empty.
        return torch.minimum(self.a.tile_states(g, qi, ki), self.b.tile_states(g, qi, ki))

    def kv_tile_candidates(self, g):
        ca, cb = self.a.kv_tile_candidates(g), self.b.kv_tile_candidates(g)
        if ca is None or cb is None:
            return cb if ca is None else ca
        # Either side's candidates are a superset of the intersection: take the narrower.
        return ca if ca.shape[1] <= cb.shape[1] else cb


class Or(Combined):
    """Pairs allowed by either mask."""

    symbol = "|"

    def mask_fn(self, nq, nk):
        fa, fb = self.a.mask_fn(nq, nk), self.b.mask_fn(nq, nk)
        return lambda b, h, q, k: fa(b, h, q, k) | fb(b, h, q, k)

    def tile_states(self, g, qi, ki):
        # Either full is full, both empty is empty; two partial tiles stay (safely) partial.
        return torch.maximum(self.a.tile_states(g, qi, ki), self.b.tile_states(g, qi, ki))

    def kv_tile_candidates(self, g):
        ca, cb = self.a.kv_tile_candidates(g), self.b.kv_tile_candidates(g)
        if ca is None or cb is None:
            return None
        return union_candidates(ca, cb)
