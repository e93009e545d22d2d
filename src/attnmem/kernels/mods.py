"""Score modifications of the tiled kernel: ``score_mod``, dropout, and the tensors a score_mod captures.

* ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's signature, raw indices) is called
  once per tile on the tile's scores (B, Hq, Tq, Tk) and broadcastable index tensors, after the
  scale and before the mask. The backward recomputes it per tile under autograd and pulls the
  tile's dS back through it with ``torch.autograd.grad``: into the raw scores and into every
  tensor the score_mod captures that requires grad (found once per call by ``captured_tensors``).
* dropout acts on the normalised probabilities, ``out = (P ∘ Z) V`` with ``Z ∈ {0, 1/(1-p)}``.
  ``Z`` is a counter-based hash of (seed, b, h, q_idx, kv_idx) (``dropout_keep``), so both
  passes regenerate it per tile, whatever the tiling, and nothing is stored.

Two kinds of score_mod have a fast path (``Mods.fast``, chosen by ``fast_kind``), used when
nothing captured needs a gradient and there is no dropout:

* ``"bias"``: an additive bias of the indices alone (ALiBi, a fixed T5 table), declared by an
  ``additive_bias(h, q_idx, kv_idx, dtype)`` method (returning a new tensor). Each segment's
  bias is built once per pass as a small float tile and handed to the fused CPU operator as
  its ``attn_mask``: no Python call per score, no autograd, the operator's own kernel. The
  backward drops provably negligible pairs from it (``tile.NEGLIGIBLE``).
* ``"softcap"``: ``cap·tanh(s/cap)``, declared by a float ``softcap`` attribute. It needs the
  scores themselves, so a dedicated torch-ops tile kernel computes it with its derivative
  written out (``1 - tanh²``) instead of recording autograd per tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .tile import acc_dtype

if TYPE_CHECKING:
    from .segments import Segment
    from .tiled import TileContext

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
_M32 = 0xFFFFFFFF
# Dropout draws 24-bit uniforms: keep iff u >= round(p·2²⁴), an exact probability.
_DROP_BITS = 24


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons), a 32-bit integer hash with full avalanche, on int64 tensors
    holding values in [0, 2³²). The products wrap past 2⁶³ but their low 32 bits are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(seed: int, p: float, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The dropout factor ``Z`` at broadcast (b, h, q_idx, kv_idx): 0 (dropped) or ``1/keep``.

    ``u = hash(seed, b, h, q_idx, kv_idx) >> 8`` is a 24-bit uniform from a counter-based hash
    (``_mix32`` chained over the indices), dropped iff ``u < t`` with ``t = round(p·2²⁴)``; the
    kept factor ``2²⁴ / (2²⁴ - t)`` is the exact inverse of the keep probability, so
    ``E[Z] = 1`` (unbiased inverted dropout). Any tile of any call regenerates its own part.
    """
    t = round(p * 2 ** _DROP_BITS)
    x = _mix32(torch.tensor(seed & _M32, device=b.device) ^ ((seed >> 32) & _M32))
    x = _mix32(x ^ b)
    x = _mix32(x ^ h)
    x = _mix32(x ^ q_idx)
    x = _mix32(x ^ ((kv_idx * 0x9E3779B1) & _M32))
    keep = (x >> (32 - _DROP_BITS)) >= t
    return keep * (2 ** _DROP_BITS / (2 ** _DROP_BITS - t))


def dropout_keep_bytes(pairs: int, rows: int, acc_itemsize: int) -> tuple[int, int]:
    """The memory of ``TileMods.keep`` on a tile of ``pairs`` (query, key) pairs and ``rows``
    query rows (B·Hq·Tq): (peak while it runs, the factor Z it returns), read off
    ``dropout_keep``. The hash runs on int64 at the full (B, Hq, Tq, Tk) shape once the keys
    join: each ``_mix32`` step holds its input, a shift or product and the result (3 · 8 bytes
    a pair) while the (B, Hq, Tq, 1) hash of the rows before it is still bound (8 a row). Z is
    float32 (4 a pair); for float64 its copy (8 a pair) is made beside it."""
    z = pairs * acc_itemsize
    return max(24 * pairs + 8 * rows, 4 * pairs + z if acc_itemsize != 4 else 0), z


class _Collect(TorchFunctionMode):
    """Records the tensors requiring grad that a function reads but did not make."""

    def __init__(self, made: list[Tensor]):
        super().__init__()
        self.made = {id(t) for t in made}
        self.keep_alive = list(made)
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in self.made:
                self.found.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.made.add(id(t))
                self.keep_alive.append(t)
        return out


def captured_tensors(score_mod: ScoreMod, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The tensors requiring grad that ``score_mod`` reads (a learned bias table, a slope
    parameter), found by one call on a 1×1 probe; they become inputs of the autograd function,
    so their gradients flow as FlexAttention's do."""
    probe = [torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)] + [
        torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device) for _ in range(4)]
    mode = _Collect(probe)
    with torch.no_grad(), mode:
        score_mod(*probe)
    return tuple(mode.found.values())


@dataclass(frozen=True)
class Mods:
    """What changes the scores or probabilities of one call (all optional).

    score_mod: FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    captured: the tensors the score_mod reads that need gradients (``captured_tensors``).
    dropout_p, dropout_seed: dropout on the normalised probabilities (``dropout_keep``).
    fast: ``fast_kind`` of the call ("bias", "softcap" or "" for the generic path).
    """

    score_mod: ScoreMod | None = None
    captured: tuple[Tensor, ...] = field(default=(), repr=False)
    dropout_p: float = 0.0
    dropout_seed: int = 0
    fast: str = ""

    @property
    def active(self) -> bool:
        return self.score_mod is not None or self.dropout_p > 0


class TileMods:
    """The score_mod and dropout of one tile: global indices of its rows and keys, and the
    reshapes between the kernels' stacked (B, Hkv, G·Tq, Tk) and (B, Hq, Tq, Tk)."""

    def __init__(self, c: TileContext, qa: int, qb: int, seg: Segment):
        self.mods, self.c = c.mods, c
        dev = c.device
        rows = torch.arange(qa, qb, device=dev) if c.q_pos is None else c.q_pos[qa:qb]
        self.b = torch.arange(c.B, device=dev)[:, None, None, None]
        self.h = torch.arange(c.head0, c.head0 + c.Hq, device=dev)[None, :, None, None]
        self.q_idx = rows[None, None, :, None]
        self.kv_idx = seg.positions(dev)[None, None, None, :]
        self.tq, self.tk = qb - qa, seg.size
        self.qa, self.seg = qa, seg

    @staticmethod
    def index_bytes(batch: int, heads: int, rows: int, keys: int) -> int:
        """Bytes of the int64 indices one ``TileMods`` holds (b, h, q_idx, kv_idx)."""
        return 8 * (batch + heads + rows + keys)

    def scores(self, s: Tensor) -> Tensor:
        c = self.c
        s4 = s.view(c.B, c.Hq, self.tq, self.tk)  # (B, Hq, Tq, Tk)
        out = self.mods.score_mod(s4, self.b, self.h, self.q_idx, self.kv_idx)
        if not isinstance(out, Tensor):
            raise TypeError(f"score_mod must return a tensor, got {type(out).__name__}")
        out = out.to(s.dtype).expand(s4.shape)
        return out.reshape(s.shape)  # (B, Hkv, G·Tq, Tk)

    def bias(self, dtype: torch.dtype) -> Tensor:
        """The additive bias of a ``"bias"`` score_mod on this tile, (1, Hkv, G·Tq, Tk)."""
        c = self.c
        bias = self.mods.score_mod.additive_bias(self.h, self.q_idx, self.kv_idx, dtype)
        bias = bias.expand(1, c.Hq, self.tq, self.tk)  # (1, Hq, Tq, Tk)
        # Contiguous, and never a score_mod's own buffer: the fused backward fills it in place.
        return bias.reshape(1, c.Hkv, c.G * self.tq, self.tk).contiguous()  # (1, Hkv, G·Tq, Tk)

    def row_bias(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """A ``"bias"`` score_mod's bias on this tile as ``row - shift``, a (1, Hkv, 1, Tk) row of
        keys (a broadcast ``attn_mask`` of the fused operator, nothing per pair to build) and a
        (1, Hkv, Tq) shift per query that moves the tile's lse; None where the score_mod
        declares no ``row_bias`` or the tile does not allow one (stacked GQA rows, a subset of
        query rows, keys straddling a query's diagonal)."""
        c = self.c
        row_bias = getattr(self.mods.score_mod, "row_bias", None)
        if row_bias is None or c.G > 1 or c.q_pos is not None:
            return None
        kv_first = min(a for a, _ in self.seg.ranges)
        kv_last = max(b for _, b in self.seg.ranges) - 1
        return row_bias(self.h, self.qa, self.qa + self.tq - 1, self.kv_idx, kv_first, kv_last, dtype)

    def keep(self, dtype: torch.dtype) -> Tensor | None:
        if not self.mods.dropout_p:
            return None
        c = self.c
        z = dropout_keep(self.mods.dropout_seed, self.mods.dropout_p, self.b, self.h, self.q_idx, self.kv_idx)
        return z.to(dtype).expand(c.B, c.Hq, self.tq, self.tk).reshape(c.B, c.Hkv, c.G * self.tq, self.tk)


def fast_kind(score_mod: ScoreMod | None, captured: tuple[Tensor, ...], dropout_p: float) -> str:
    """Which fast path a call's score modifications take: "bias" (``additive_bias`` declared),
    "softcap" (a float ``softcap`` declared), or "" (generic: autograd per tile). A captured
    tensor needing a gradient, or dropout, takes the generic path, which computes both."""
    if score_mod is None or captured or dropout_p:
        return ""
    if callable(getattr(score_mod, "additive_bias", None)):
        return "bias"
    if isinstance(getattr(score_mod, "softcap", None), float):
        return "softcap"
    return ""


def make_mods(score_mod: ScoreMod | None, dropout_p: float, dropout_seed: int | torch.Generator | None,
              q: Tensor) -> Mods | None:
    """``Mods`` of one call: the score_mod's captured tensors, the dropout seed resolved (a
    Generator or None draws one, from it or from torch's global generator)."""
    if score_mod is None and not dropout_p:
        return None
    seed = 0
    if dropout_p:
        if isinstance(dropout_seed, int) and not isinstance(dropout_seed, bool):
            seed = dropout_seed
        else:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=dropout_seed).item())
    captured = captured_tensors(score_mod, acc_dtype(q.dtype), q.device) if score_mod is not None else ()
    return Mods(score_mod, captured, float(dropout_p), seed, fast_kind(score_mod, captured, dropout_p))
