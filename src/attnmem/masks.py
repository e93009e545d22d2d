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

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Tile states. Only PARTIAL and FULL tiles appear in a block map.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockMap:
    """Which (query tile, key tile) pairs hold allowed pairs, in FlexAttention's layout.

    ``kv_indices[i, :kv_counts[i]]`` are the key tiles of query tile ``i`` (sorted ascending),
    ``kv_full[i, j]`` says whether that tile is fully allowed (no mask needs evaluating). The
    rest of each row is padding (index -1).
    """

    nq: int
    nk: int
    q_tile: int
    kv_tile: int
    kv_indices: Tensor  # (num_q_tiles, max_kv_tiles) int64
    kv_full: Tensor  # (num_q_tiles, max_kv_tiles) bool
    kv_counts: Tensor  # (num_q_tiles,) int64

    @property
    def num_q_tiles(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def num_kv_tiles(self) -> int:
        return math.ceil(self.nk / self.kv_tile) if self.nk else 0

    def density(self) -> float:
        """Fraction of all tiles that are computed (partial or full)."""
        total = self.num_q_tiles * self.num_kv_tiles
        return float(self.kv_counts.sum()) / total if total else 0.0

    def rows(self) -> list[list[tuple[int, bool]]]:
        """Per query tile, the list of ``(kv_tile, is_full)`` — one host transfer for all."""
        idx = self.kv_indices.tolist()
        full = self.kv_full.tolist()
        counts = self.kv_counts.tolist()
        return [list(zip(idx[i][: counts[i]], full[i][: counts[i]])) for i in range(len(counts))]

    def dense_states(self) -> Tensor:
        """(num_q_tiles, num_kv_tiles) int8 of EMPTY/PARTIAL/FULL — for tests and plots only."""
        states = torch.zeros(self.num_q_tiles, self.num_kv_tiles, dtype=torch.int8)
        for i, row in enumerate(self.rows()):
            for j, full in row:
                states[i, j] = FULL if full else PARTIAL
        return states


@dataclass(frozen=True)
class Grid:
    """The tiling a block map is built for: lengths, tile sizes, and the batch/head extent."""

    nq: int
    nk: int
    q_tile: int
    kv_tile: int
    batch: int = 1
    heads: int = 1

    @property
    def num_q_tiles(self) -> int:
        return math.ceil(self.nq / self.q_tile) if self.nq else 0

    @property
    def num_kv_tiles(self) -> int:
        return math.ceil(self.nk / self.kv_tile) if self.nk else 0

    def ranges(self, qi: Tensor, ki: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[qa, qb) × [ka, kb)`` position ranges of tile pairs; the last tile may be short."""
        qa, ka = qi * self.q_tile, ki * self.kv_tile
        return qa, torch.clamp(qa + self.q_tile, max=self.nq), ka, torch.clamp(ka + self.kv_tile, max=self.nk)


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
            states = _dense_tile_states(allowed, rows.shape[0], g.kv_tile)[0]  # (nkt,)
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


def _states(empty: Tensor, full: Tensor) -> Tensor:
    out = torch.full(empty.shape, PARTIAL, dtype=torch.int8)
    out[full] = FULL
    out[empty] = EMPTY
    return out


def _dense_tile_states(t: Tensor, q_tile: int, k_tile: int) -> Tensor:
    """(nqt, nkt) states of a (Bm, Hm, nq, nk) bool tensor, reduced over batch and heads."""
    bm, hm, nq, nk = t.shape
    pq, pk = (-nq) % q_tile, (-nk) % k_tile
    # Pad with -1, "no position": it counts neither as allowed nor as blocked.
    x = torch.nn.functional.pad(t.to(torch.int8), (0, pk, 0, pq), value=-1)
    x = x.reshape(bm, hm, (nq + pq) // q_tile, q_tile, (nk + pk) // k_tile, k_tile)
    x = x.permute(2, 4, 0, 1, 3, 5).flatten(2)  # (nqt, nkt, Bm·Hm·q_tile·k_tile)
    return _states(~(x == 1).any(-1), ~(x == 0).any(-1))


def ranges_to_candidates(first: Tensor, last: Tensor, nkt: int) -> Tensor:
    """Rows of consecutive tile indices ``first[i]..last[i]`` (inclusive), -1 padded."""
    first = first.clamp(min=0)
    last = last.clamp(max=nkt - 1)
    count = (last - first + 1).clamp(min=0)
    width = int(count.max()) if count.numel() else 0
    idx = first[:, None] + torch.arange(width)[None, :]
    return idx.masked_fill(torch.arange(width)[None, :] >= count[:, None], -1)


def union_candidates(ca: Tensor, cb: Tensor) -> Tensor:
    """Row-wise sorted union of two -1 padded candidate tables."""
    big = torch.iinfo(torch.int64).max
    both = torch.cat([ca, cb], 1)
    srt = torch.sort(both.masked_fill(both < 0, big), dim=1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    srt = torch.sort(srt.masked_fill(dup, big), dim=1).values
    width = int((srt != big).sum(1).max()) if srt.numel() else 0
    srt = srt[:, :width]
    return srt.masked_fill(srt == big, -1)


# --- structured masks -------------------------------------------------------------------


class SlidingWindow(Mask):
    """Query ``i`` sees key ``j`` iff ``-left <= j - (i + nk - nq) <= right``.

    ``None`` on a side means unbounded; ``SlidingWindow(None, 0)`` is causal.
    """

    def __init__(self, left: int | None, right: int | None, name: str | None = None):
        for arg, val in (("left", left), ("right", right)):
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"sliding_window: {arg} must be a non-negative int, got {val!r}")
        self.left, self.right = left, right
        self.name = name or f"sliding_window({left}, {right})"

    def _lo_hi(self) -> tuple[float, float]:
        lo = -math.inf if self.left is None else -self.left
        hi = math.inf if self.right is None else self.right
        return lo, hi

    def mask_fn(self, nq: int, nk: int) -> MaskMod:
        offset = nk - nq
        left, right = self.left, self.right

        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            allowed = torch.ones_like(rel, dtype=torch.bool)
            if left is not None:
                allowed = allowed & (rel >= -left)
            if right is not None:
                allowed = allowed & (rel <= right)
            return allowed

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        lo, hi = self._lo_hi()
        off = g.nk - g.nq
        # Query q sees keys [q + off + lo, q + off + hi]; both ends grow by one per query, so
        # the union over a query tile is the one interval from the first query's low end to
        # the last query's high end, and the intersection runs the other way round.
        first_q, last_q = (qa + off).double(), (qb - 1 + off).double()
        k_first, k_last = ka.double(), (kb - 1).double()
        empty = (last_q + hi < k_first) | (first_q + lo > k_last)
        full = (last_q + lo <= k_first) & (first_q + hi >= k_last)
        return _states(empty, full)

    def kv_tile_candidates(self, g):
        lo, hi = self._lo_hi()
        if math.isinf(lo) and math.isinf(hi):
            return None
        qa = torch.arange(g.num_q_tiles, dtype=torch.int64) * g.q_tile
        qb = torch.clamp(qa + g.q_tile, max=g.nq)
        off = g.nk - g.nq
        first = ((qa + off).double() + lo).clamp(-1, g.nk)
        last = ((qb - 1 + off).double() + hi).clamp(-1, g.nk)
        first_t = torch.div(first, g.kv_tile, rounding_mode="floor").long()
        last_t = torch.div(last, g.kv_tile, rounding_mode="floor").long()
        return ranges_to_candidates(first_t, last_t, g.num_kv_tiles)


def causal() -> SlidingWindow:
    """Causal mask, bottom-right aligned when ``nq != nk`` (see the module docstring)."""
    return SlidingWindow(None, 0, name="causal")


def sliding_window(left: int, right: int | None = None) -> SlidingWindow:
    """Keys at most ``left`` positions before and ``right`` after the (aligned) query.

    ``right`` defaults to ``left``; ``sliding_window(w, 0)`` is causal local attention.
    """
    if left is None:
        raise ValueError("sliding_window: left must be a non-negative int, got None")
    return SlidingWindow(left, left if right is None else right)


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
        cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

        def mask_mod(b, h, q_idx, kv_idx):
            dev = q_idx.device
            if dev not in cache:
                cache[dev] = (self.q_ids.to(dev), self.kv_ids.to(dev))
            qi, ki = cache[dev]
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
        return _states(empty, full)


def _tile_min_max(ids: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    pad = (-ids.shape[-1]) % tile
    # Repeating the last id leaves every tile's min and max unchanged.
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1) if pad else ids
    tiles = padded.reshape(ids.shape[0], -1, tile)
    return tiles.amin(-1), tiles.amax(-1)


def document(ids: Tensor, kv_ids: Tensor | None = None) -> Document:
    """Block-diagonal mask from document ids of shape (N,) or (B, N)."""
    return Document(ids, kv_ids)


class FromMod(Mask):
    """Any FlexAttention / attention-gym ``mask_mod(b, h, q_idx, kv_idx)``.

    Its block map evaluates the function one query tile at a time (O(N²) time, O(tile · N)
    memory); for long sequences prefer the structured masks, whose block maps cost O(tiles).
    """

    def __init__(self, mask_mod: MaskMod, name: str | None = None):
        if not callable(mask_mod):
            raise TypeError(f"from_mod: mask_mod must be callable, got {type(mask_mod).__name__}")
        self.fn = mask_mod
        self.name = name or getattr(mask_mod, "__name__", "mask_mod")

    def mask_fn(self, nq, nk):
        return self.fn


def from_mod(mask_mod: MaskMod, name: str | None = None) -> FromMod:
    """Wrap an attention-gym style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``."""
    return FromMod(mask_mod, name)


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
        t = self.tensor
        cache: dict[torch.device, Tensor] = {}

        def mask_mod(b, h, q_idx, kv_idx):
            if q_idx.device not in cache:
                cache[q_idx.device] = t.to(q_idx.device)
            m = cache[q_idx.device]
            pick = [i if size > 1 else torch.zeros_like(i)
                    for i, size in zip(torch.broadcast_tensors(b, h, q_idx, kv_idx), m.shape)]
            return m[pick[0], pick[1], pick[2], pick[3]]

        return mask_mod

    def tile_states(self, g, qi, ki):
        t = self.tensor.expand(*self.tensor.shape[:2], g.nq, g.nk).cpu()
        return _dense_tile_states(t, g.q_tile, g.kv_tile)[qi, ki]

    def to_dense(self, nq, nk, batch=1, heads=1):
        return self.tensor.expand(batch, heads, nq, nk).clone()


def dense(tensor: Tensor) -> Dense:
    """Wrap a dense bool tensor (True = attend) broadcastable to (B, H, Nq, Nk)."""
    return Dense(tensor)


class BlockSparse(Mask):
    """A block-level layout: ``layout[i, j]`` allows query block i to see key block j.

    Tile states come from 2-d prefix sums over the layout, so they cost O(blocks) whatever
    the tile size: a tile is empty when none of the blocks it touches is allowed and full
    when all are.
    """

    def __init__(self, layout: Tensor, block: int):
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool or layout.dim() != 2:
            raise TypeError("block_sparse: layout must be a 2-d bool tensor (query blocks, key blocks)")
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"block_sparse: block must be a positive int, got {block!r}")
        self.layout, self.block = layout.cpu(), block
        counts = torch.zeros(layout.shape[0] + 1, layout.shape[1] + 1, dtype=torch.int64)
        counts[1:, 1:] = self.layout.long().cumsum(0).cumsum(1)
        self._prefix = counts
        self.name = f"block_sparse(block={block}, density={self.layout.float().mean().item():.2f})"

    def check(self, batch, heads, nq, nk):
        need = (math.ceil(nq / self.block), math.ceil(nk / self.block))
        if tuple(self.layout.shape) != need:
            raise ValueError(
                f"block_sparse layout has shape {tuple(self.layout.shape)}, but Nq={nq}, Nk={nk} with "
                f"block={self.block} need {need}"
            )

    def mask_fn(self, nq, nk):
        cache: dict[torch.device, Tensor] = {}

        def mask_mod(b, h, q_idx, kv_idx):
            if q_idx.device not in cache:
                cache[q_idx.device] = self.layout.to(q_idx.device)
            return cache[q_idx.device][q_idx // self.block, kv_idx // self.block]

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        r0, r1 = qa // self.block, (qb - 1) // self.block + 1
        c0, c1 = ka // self.block, (kb - 1) // self.block + 1
        p = self._prefix
        allowed = p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]
        return _states(allowed == 0, allowed == (r1 - r0) * (c1 - c0))


def block_sparse(layout: Tensor, block: int) -> BlockSparse:
    """Mask from a (query blocks, key blocks) bool layout of ``block``-sized blocks."""
    return BlockSparse(layout, block)


def random_blocks(nq: int, nk: int, block: int, keep: float, seed: int = 0) -> BlockSparse:
    """A random block layout keeping about ``keep`` of the blocks, deterministic in ``seed``."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"random_blocks: keep must be in [0, 1], got {keep!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"random_blocks: block must be a positive int, got {block!r}")
    g = torch.Generator().manual_seed(seed)
    shape = (math.ceil(nq / block), math.ceil(nk / block))
    return BlockSparse(torch.rand(shape, generator=g) < keep, block)


class And(Mask):
    """Pairs allowed by both masks."""

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.name = f"({a!r} & {b!r})"

    def check(self, batch, heads, nq, nk):
        self.a.check(batch, heads, nq, nk)
        self.b.check(batch, heads, nq, nk)

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


class Or(Mask):
    """Pairs allowed by either mask."""

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self.name = f"({a!r} | {b!r})"

    def check(self, batch, heads, nq, nk):
        self.a.check(batch, heads, nq, nk)
        self.b.check(batch, heads, nq, nk)

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


def combine(causal_flag: bool, mask: Mask | None) -> Mask | None:
    """The effective mask of an attention call: ``causal`` and ``mask`` together."""
    if causal_flag and mask is not None:
        return causal() & mask
    if causal_flag:
        return causal()
    return mask


# --- sparse patterns: dilated windows, global tokens, BigBird, Sparse Transformer ---------------
# Each one computes its tile states and candidate key tiles from its structure, so a block
# map costs O(listed tiles), never N×N.


def _check_count(fn: str, arg: str, val: object, minimum: int = 0) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{fn}: {arg} must be an int {kind}, got {val!r}")
    return val


def _window_sides(fn: str, window: object) -> tuple[int, int]:
    """``(left, right)`` from ``w`` (symmetric) or ``(left, right)``; ValueError otherwise."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{fn}: window must be an int or (left, right), got {window!r}")
        return _check_count(fn, "window left", window[0]), _check_count(fn, "window right", window[1])
    w = _check_count(fn, "window", window)
    return w, w


class Dilated(Mask):
    """Longformer's dilated window: ``left`` keys before and ``right`` after, ``d`` apart.

    With ``rel = j - (i + nk - nq)`` (bottom-right aligned like ``SlidingWindow``), query i
    sees key j iff ``rel % d == 0`` and ``-left·d <= rel <= right·d``. ``dilation`` is one int
    or one int per query head (then indexed by the ``h`` of ``mask_mod``). ``d = 1`` is
    ``SlidingWindow(left, right)``.
    """

    def __init__(self, left: int, right: int, dilation: int | tuple[int, ...] = 1):
        _check_count("dilated", "left", left)
        _check_count("dilated", "right", right)
        dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,)
        if not dil:
            raise ValueError("dilated: dilation must be a positive int or one per head, got ()")
        for d in dil:
            _check_count("dilated", "dilation", d, minimum=1)
        self.left, self.right = left, right
        self.per_head = isinstance(dilation, (tuple, list))
        self.dilations = dil
        self.d_max = max(dil)
        self._span = SlidingWindow(left * self.d_max, right * self.d_max)
        self.name = f"dilated({left}, {right}, dilation={dilation})"

    def check(self, batch, heads, nq, nk):
        if self.per_head and len(self.dilations) != heads:
            raise ValueError(
                f"dilated: got {len(self.dilations)} per-head dilations for {heads} query heads"
            )

    def mask_fn(self, nq, nk):
        offset = nk - nq
        left, right = self.left, self.right
        table = torch.tensor(self.dilations, dtype=torch.int64)

        # No per-device cache in these mask_mods: FlexAttention traces them, and a cache is a
        # side effect it refuses. ``.to`` on the same device returns the tensor itself.
        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            if self.per_head:
                d = table.to(q_idx.device)[h]
            else:
                d = self.dilations[0]
            return (rel % d == 0) & (rel >= -left * d) & (rel <= right * d)

        return mask_mod

    def tile_states(self, g, qi, ki):
        states = self._span.tile_states(g, qi, ki)
        if self.d_max == 1:
            return states
        # Every key is d apart: a tile holding two neighbouring keys is never full.
        return torch.minimum(states, torch.full_like(states, PARTIAL))

    def kv_tile_candidates(self, g):
        return self._span.kv_tile_candidates(g)


def dilated(window: int | tuple[int, int], dilation: int | tuple[int, ...] = 1) -> Dilated:
    """Dilated window: ``window`` keys each side (or ``(left, right)``), ``dilation`` apart.

    ``dilation`` may be a tuple with one value per query head (Longformer uses different
    dilations on different heads).
    """
    left, right = _window_sides("dilated", window)
    return Dilated(left, right, dilation)


class GlobalTokens(Mask):
    """Global tokens: a query at a listed position sees every key, a key at a listed position
    is seen by every query (Longformer). Positions index queries and keys alike, from 0.

    Block map: query tiles holding a global query list every key tile; the others list only
    the key tiles holding a global key. In the padded ``BlockMap`` layout one global query
    makes every row num_kv_tiles wide, so ``queries=False`` (global keys only) exists for
    methods that compute the few global query rows apart (``longformer`` does): its block map
    is O(N/tile · g).
    """

    def __init__(self, positions, *, queries: bool = True, keys: bool = True):
        pos = torch.as_tensor(positions)
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.dim() > 1:
            raise TypeError(f"global_tokens: positions must be a sequence of ints, got {positions!r}")
        pos = pos.reshape(-1).long()
        if pos.numel() and int(pos.min()) < 0:
            raise ValueError(f"global_tokens: positions must be non-negative, got {pos.tolist()}")
        self.positions = torch.unique(pos)
        # One side alone serves methods that compute the global query rows separately.
        self.queries, self.keys = queries, keys
        self.name = f"global_tokens({len(self.positions)})"

    def check(self, batch, heads, nq, nk):
        if self.positions.numel() and int(self.positions.max()) >= max(nq, nk):
            raise ValueError(
                f"global_tokens: position {int(self.positions.max())} is outside the sequences "
                f"(Nq={nq}, Nk={nk})"
            )

    def _flags(self, n: int, side: bool = True) -> Tensor:
        flags = torch.zeros(n, dtype=torch.bool)
        if side:
            flags[self.positions[self.positions < n]] = True
        return flags

    def mask_fn(self, nq, nk):
        gq, gk = self._flags(nq, self.queries), self._flags(nk, self.keys)

        def mask_mod(b, h, q_idx, kv_idx):
            return gq.to(q_idx.device)[q_idx] | gk.to(q_idx.device)[kv_idx]

        return mask_mod

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        cq = _prefix(self._flags(g.nq, self.queries))
        ck = _prefix(self._flags(g.nk, self.keys))
        nq_glob, nk_glob = cq[qb] - cq[qa], ck[kb] - ck[ka]
        return _states((nq_glob == 0) & (nk_glob == 0), (nq_glob == qb - qa) | (nk_glob == kb - ka))

    def kv_tile_candidates(self, g):
        nqt, nkt = g.num_q_tiles, g.num_kv_tiles
        key_tiles = torch.unique(self.positions[self.positions < g.nk] // g.kv_tile)
        if not self.keys:
            key_tiles = key_tiles[:0]
        q_rows = torch.zeros(nqt, dtype=torch.bool)
        if self.queries:
            q_rows[torch.unique(self.positions[self.positions < g.nq] // g.q_tile)] = True
        if not bool(q_rows.any()):
            return key_tiles[None, :].expand(nqt, -1)
        all_tiles = torch.arange(nkt, dtype=torch.int64)[None, :].expand(nqt, nkt)
        some = torch.full((nqt, nkt), -1, dtype=torch.int64)
        some[:, : len(key_tiles)] = key_tiles
        return torch.where(q_rows[:, None], all_tiles, some)


def _prefix(flags: Tensor) -> Tensor:
    out = torch.zeros(flags.numel() + 1, dtype=torch.int64)
    out[1:] = flags.long().cumsum(0)
    return out


def global_tokens(positions, *, queries: bool = True, keys: bool = True) -> GlobalTokens:
    """Tokens at ``positions`` attend to everything (``queries``) and are attended by
    everything (``keys``)."""
    return GlobalTokens(positions, queries=queries, keys=keys)


def longformer(window: int | tuple[int, int], positions) -> Mask:
    """Longformer: a sliding window plus global tokens at ``positions``."""
    left, right = _window_sides("longformer", window)
    return SlidingWindow(left, right) | GlobalTokens(positions)


class BigBird(Mask):
    """BigBird's block pattern, in blocks of ``block`` positions counted from 0 in each sequence.

    Query block i sees key block j iff ``|i - j| <= window_blocks // 2`` (window), or either
    block is global (the first ⌈g/2⌉ and the last ⌊g/2⌋ blocks, ``g = global_blocks``), or j
    is one of the ``random_blocks`` blocks drawn for i. Random blocks are distinct, outside
    i's window and the global blocks, and a function of (seed, block counts) only.
    """

    def __init__(self, block: int = 64, window_blocks: int = 3, global_blocks: int = 2,
                 random_blocks: int = 3, seed: int = 0, *, global_queries: bool = True):
        _check_count("bigbird", "block", block, minimum=1)
        _check_count("bigbird", "window_blocks", window_blocks, minimum=1)
        if window_blocks % 2 == 0:
            raise ValueError(f"bigbird: window_blocks must be odd (the block and as many each side), "
                             f"got {window_blocks}")
        _check_count("bigbird", "global_blocks", global_blocks)
        _check_count("bigbird", "random_blocks", random_blocks)
        _check_count("bigbird", "seed", seed)
        self.block, self.radius = block, window_blocks // 2
        self.global_blocks, self.random_blocks, self.seed = global_blocks, random_blocks, seed
        # False leaves out the "global queries see everything" rows, for methods that compute
        # them apart (as GlobalTokens(queries=False)); the random draw does not change.
        self.global_queries = global_queries
        self._tables: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self.name = (f"bigbird(block={block}, window={window_blocks}, global={global_blocks}, "
                     f"random={random_blocks}, seed={seed})")

    def _global(self, nblocks: int) -> Tensor:
        flags = torch.zeros(nblocks, dtype=torch.bool)
        head = (self.global_blocks + 1) // 2
        flags[:head] = True
        tail = self.global_blocks // 2
        if tail:
            flags[max(nblocks - tail, 0):] = True
        return flags

    def tables(self, nq: int, nk: int) -> tuple[Tensor, Tensor, Tensor]:
        """(global query blocks, global key blocks, random key blocks (nqb, r) -1 padded)."""
        key = (nq, nk)
        if key not in self._tables:
            nqb, nkb = math.ceil(nq / self.block), math.ceil(nk / self.block)
            gq, gk = self._global(nqb), self._global(nkb)
            rnd = self._draw_random(gq, gk)
            if not self.global_queries:
                gq = torch.zeros_like(gq)
            self._tables[key] = (gq, gk, rnd)
        return self._tables[key]

    def global_query_rows(self, nq: int) -> Tensor:
        """Query positions in global blocks (int64, ascending)."""
        flags = self._global(math.ceil(nq / self.block))
        return torch.nonzero(flags.repeat_interleave(self.block)[:nq]).flatten()

    def _draw_random(self, gq: Tensor, gk: Tensor) -> Tensor:
        # Floyd's algorithm draws r distinct indices from the pool of allowed key blocks in
        # O(r) per query block, so the table costs O(N/block · r), never (N/block)².
        rng = random.Random(self.seed)
        nkb, r = len(gk), self.random_blocks
        global_keys = torch.nonzero(gk).flatten().tolist()
        table = torch.full((len(gq), r), -1, dtype=torch.int64)
        rows = []
        for i in range(len(gq)):
            excluded = sorted(set(range(max(i - self.radius, 0), min(i + self.radius + 1, nkb)))
                              | set(global_keys))
            pool = nkb - len(excluded)
            picked: list[int] = []
            if not gq[i] and pool > 0 and r > 0:
                chosen: set[int] = set()
                for top in range(pool - min(r, pool), pool):
                    t = rng.randint(0, top)
                    chosen.add(top if t in chosen else t)
                for t in sorted(chosen):
                    for e in excluded:  # the t-th block of the pool, skipping excluded ones
                        if e <= t:
                            t += 1
                    picked.append(t)
            rows.append(picked + [-1] * (r - len(picked)))
        if rows and r:
            table[:] = torch.tensor(rows, dtype=torch.int64)
        return table

    def mask_fn(self, nq, nk):
        gq, gk, rnd = self.tables(nq, nk)
        block, radius = self.block, self.radius

        def mask_mod(b, h, q_idx, kv_idx):
            dev = q_idx.device
            fq, fk, table = gq.to(dev), gk.to(dev), rnd.to(dev)
            qb, kb = q_idx // block, kv_idx // block
            allowed = ((kb - qb).abs() <= radius) | fq[qb] | fk[kb]
            for c in range(table.shape[1]):
                allowed = allowed | (table[qb, c] == kb)
            return allowed

        return mask_mod

    def tile_states(self, g, qi, ki):
        gq, gk, rnd = self.tables(g.nq, g.nk)
        qa, qb, ka, kb = g.ranges(qi, ki)
        r0, r1 = qa // self.block, (qb - 1) // self.block  # inclusive block ranges
        c0, c1 = ka // self.block, (kb - 1) // self.block
        rad = self.radius
        win_empty = (c0 > r1 + rad) | (c1 < r0 - rad)
        win_full = (c1 - r0 <= rad) & (r1 - c0 <= rad)
        pq, pk = _prefix(gq), _prefix(gk)
        n_gq, n_gk = pq[r1 + 1] - pq[r0], pk[c1 + 1] - pk[c0]
        glob_full = (n_gq == r1 - r0 + 1) | (n_gk == c1 - c0 + 1)
        # Random hits: the random blocks of every query block in the tile, against its key blocks.
        rows = r0[..., None] + torch.arange(int((r1 - r0).max()) + 1 if r0.numel() else 1)
        in_tile = rows <= r1[..., None]
        picks = rnd[rows.clamp(max=len(gq) - 1)]  # (..., rows, r)
        hit = (picks >= c0[..., None, None]) & (picks <= c1[..., None, None]) & in_tile[..., None]
        rand_any = hit.flatten(-2).any(-1)
        empty = win_empty & (n_gq == 0) & (n_gk == 0) & ~rand_any
        return _states(empty, win_full | glob_full)

    def kv_tile_candidates(self, g):
        gq, gk, rnd = self.tables(g.nq, g.nk)
        nqt, nkt, blk = g.num_q_tiles, g.num_kv_tiles, self.block
        qa = torch.arange(nqt, dtype=torch.int64) * g.q_tile
        qb = torch.clamp(qa + g.q_tile, max=g.nq)
        r0, r1 = qa // blk, (qb - 1) // blk
        first = ((r0 - self.radius).clamp(min=0) * blk) // g.kv_tile
        last = (((r1 + self.radius + 1) * blk).clamp(max=g.nk) - 1) // g.kv_tile
        cand = ranges_to_candidates(first, last, nkt)
        # Key tiles of the global key blocks, the same for every query tile.
        gk_tiles = self._key_tiles(torch.nonzero(gk).flatten()[None, :], g)
        cand = union_candidates(cand, gk_tiles.expand(nqt, -1))
        # Key tiles of the random blocks of every query block in the tile.
        rows = r0[:, None] + torch.arange(int((r1 - r0).max()) + 1 if nqt else 1)
        picks = rnd[rows.clamp(max=len(gq) - 1)].masked_fill(~(rows <= r1[:, None])[..., None], -1)
        cand = union_candidates(cand, self._key_tiles(picks.flatten(1), g))  # picks: (nqt, rows·r)
        # A query tile holding a global query block sees every key tile.
        pq = _prefix(gq)
        global_rows = (pq[r1 + 1] - pq[r0]) > 0
        if bool(global_rows.any()):
            every = torch.arange(nkt, dtype=torch.int64)[None, :].expand(nqt, nkt)
            cand = union_candidates(cand, every.masked_fill(~global_rows[:, None], -1))
        return cand


    def _key_tiles(self, blocks: Tensor, g: Grid) -> Tensor:
        """(R, n) key blocks (-1 = none) -> (R, n·span) key tiles they cover, -1 padded."""
        blk = self.block
        span = math.ceil(blk / g.kv_tile) + 1  # tiles one block can touch
        lo = (blocks * blk) // g.kv_tile
        hi = ((blocks * blk + blk).clamp(max=g.nk) - 1) // g.kv_tile
        tiles = lo[..., None] + torch.arange(span)  # (R, n, span)
        keep = (blocks[..., None] >= 0) & (tiles <= hi[..., None])
        return tiles.masked_fill(~keep, -1).flatten(-2)


def bigbird(block: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0, *, global_queries: bool = True) -> BigBird:
    """BigBird: block window + global blocks + random blocks, deterministic under ``seed``."""
    return BigBird(block, window_blocks, global_blocks, random_blocks, seed, global_queries=global_queries)


class Strided(Mask):
    """Sparse Transformer's *strided* pattern (both factors in one head): with
    ``rel = j - (i + nk - nq)``, query i sees key j iff ``|rel| < stride`` (the local factor)
    or ``rel % stride == 0`` (the strided factor). Add ``causal=True`` for the paper's form.

    The strided factor touches every key tile once ``stride <= kv_tile``, so its block map
    lists O(N²/tile²) tiles and its work is O(N²/stride · …) per tile row: memory stays O(N).
    """

    def __init__(self, stride: int):
        _check_count("strided", "stride", stride, minimum=1)
        self.stride = stride
        self._local = SlidingWindow(stride - 1, stride - 1)
        self.name = f"strided({stride})"

    def mask_fn(self, nq, nk):
        offset, s = nk - nq, self.stride

        def mask_mod(b, h, q_idx, kv_idx):
            rel = kv_idx - (q_idx + offset)
            return (rel.abs() < s) | (rel % s == 0)

        return mask_mod

    def tile_states(self, g, qi, ki):
        local = self._local.tile_states(g, qi, ki)
        qa, qb, ka, kb = g.ranges(qi, ki)
        off, s = g.nk - g.nq, self.stride
        rel_min, rel_max = ka - (qb - 1 + off), (kb - 1) - (qa + off)
        has_multiple = torch.div(rel_max, s, rounding_mode="floor") * s >= rel_min
        empty = (local == EMPTY) & ~has_multiple
        full = (local == FULL) | ((rel_min == rel_max) & has_multiple)
        return _states(empty, full)


def strided(stride: int) -> Strided:
    """Sparse Transformer strided pattern: the ``stride`` nearest keys plus every stride-th key."""
    return Strided(stride)


class Fixed(Mask):
    """Sparse Transformer's *fixed* pattern (both factors in one head): query i (aligned
    position ``p = i + nk - nq``) sees key j iff ``p // block == j // block`` (its own block)
    or ``j % block >= block - summary`` (the last ``summary`` keys of every block).
    """

    def __init__(self, block: int, summary: int = 1):
        _check_count("fixed", "block", block, minimum=1)
        _check_count("fixed", "summary", summary, minimum=1)
        if summary > block:
            raise ValueError(f"fixed: summary must be at most block={block}, got {summary}")
        self.block, self.summary = block, summary
        self.name = f"fixed(block={block}, summary={summary})"

    def mask_fn(self, nq, nk):
        offset, blk, first_summary = nk - nq, self.block, self.block - self.summary

        def mask_mod(b, h, q_idx, kv_idx):
            same = torch.div(q_idx + offset, blk, rounding_mode="floor") == kv_idx // blk
            return same | (kv_idx % blk >= first_summary)

        return mask_mod

    def _summaries_below(self, x: Tensor) -> Tensor:
        """How many summary keys lie in [0, x)."""
        return (x // self.block) * self.summary + (x % self.block - (self.block - self.summary)).clamp(min=0)

    def tile_states(self, g, qi, ki):
        qa, qb, ka, kb = g.ranges(qi, ki)
        off, blk = g.nk - g.nq, self.block
        q0 = torch.div(qa + off, blk, rounding_mode="floor")
        q1 = torch.div(qb - 1 + off, blk, rounding_mode="floor")
        k0, k1 = ka // blk, (kb - 1) // blk
        n_summary = self._summaries_below(kb) - self._summaries_below(ka)
        empty = ((q1 < k0) | (k1 < q0)) & (n_summary == 0)
        full = ((q0 == q1) & (k0 == k1) & (q0 == k0)) | (n_summary == kb - ka)
        return _states(empty, full)


def fixed(block: int, summary: int = 1) -> Fixed:
    """Sparse Transformer fixed pattern: own block plus the last ``summary`` keys of each block."""
    return Fixed(block, summary)


__all__ = [
    "BlockMap", "Grid", "Mask", "MaskMod", "EMPTY", "PARTIAL", "FULL",
    "causal", "sliding_window", "document", "from_mod", "dense", "combine", "as_mask", "eval_mask",
    "block_sparse", "random_blocks",
    "SlidingWindow", "Document", "FromMod", "Dense", "BlockSparse", "And", "Or",
    "ranges_to_candidates", "union_candidates",
    "dilated", "global_tokens", "longformer", "bigbird", "strided", "fixed",
    "Dilated", "GlobalTokens", "BigBird", "Strided", "Fixed",
]
