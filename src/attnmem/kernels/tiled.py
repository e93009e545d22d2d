"""Exact attention in O(N) memory: the FlashAttention algorithm scheduled over block maps.

For each query tile, the key tiles the block map lists are grouped into *segments*: runs of
consecutive full tiles (no mask evaluated) and runs of partial tiles (the mask is evaluated on
that tile only). Each segment yields a partial output and its log-sum-exp; segments merge by
the online-softmax rule::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Only the output and the per-row log-sum-exp (B, H, N) are kept for the backward, which
recomputes each segment's probabilities from them: ``P = exp(S - lse)``, ``D = rowsum(dO ∘ O)``,
``dS = P ∘ (dP - D)``. Empty tiles are never touched, in either pass.

Two tile kernels (``tile.py``) compute a segment: ``fused`` calls PyTorch's own CPU flash-attention operator
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which accept an
external log-sum-exp), and ``torch`` is plain matmul/exp code that runs on any device and dtype.
Both are tested against the float64 reference.

GQA/MQA never copies K/V to Hq heads: the G query heads that share one KV head are stacked
along the sequence axis, ``(B, Hq, Tq, D) -> (B, Hkv, G·Tq, D)``, so one KV head serves them all.

Score modifications ride on the same schedule, still in O(N) memory (``mods.py``: score_mod and
dropout per tile, in both passes). Around any schedule (a ``Run``), ``run_exact`` adds:

* dropout's merge: with ``P = exp(S - lse)`` of the whole row, each segment's partial
  ``Σ exp(S - lse_seg) Z V`` merges by the same log-sum-exp rule (lse of the undropped P);
* sinks (one logit per query head) add ``exp(sink)`` to each row's denominator: they change only
  the final normalisation, ``lse' = logaddexp(lse, sink)``, ``out' = out · exp(lse - lse')``;
* the per-row lse as an output, with its gradient: ``∂lse/∂S = P``, so a gradient ``dlse`` only
  shifts the backward's ``D = rowsum(dO ∘ O)`` to ``D - dlse``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

from ..masks import And, KeyPadding, Mask, SlidingWindow, eval_mask
from . import native
from .autograd import LseAttention
from .banded import band_of, banded_backward, banded_forward
from .merge import merge_partials
from .mods import Mods, ScoreMod, TileMods, make_mods
from .segments import MAX_GATHER, MAX_SEGMENT, MIN_Q_TILE, Segment, block_rows, plan_segments
from .tile import (
    CAUSAL_TILE,
    NEGLIGIBLE,
    REACH_SLACK,
    TILE_KERNELS,
    acc_dtype,
    fused_backward,
    fused_forward,
    resolve_kernel,
)

# --- the tile schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallPlan:
    """How ``tiled_attention`` runs one call: its kernel, and whether the whole call is one
    kernel call (``single_call``; ``causal_call`` when that call uses the kernel's is_causal,
    ``grouped_causal`` when it is one is_causal call per KV head)."""

    kernel: str
    pure_causal: bool  # the mask is plain causal and G = 1: diagonal tiles use is_causal
    causal_call: bool
    grouped_causal: bool
    single_call: bool
    key_padding: KeyPadding | None
    # ``left`` of a causal sliding window run as one fused call per query segment
    # (``kernels.banded``), else None.
    band: int | None = None
    # The native softcap kernel's mask (left, right, key_valid: ``native_window``), for "softcap_native".
    window: tuple[int | None, int | None, Tensor | None] | None = None


def plan_call(kernel: str, *, device: str | torch.device, dtype: torch.dtype, mask: Mask | None,
              batch: int, nq: int, nk: int, q_heads: int, kv_heads: int, head_dim: int,
              mods: str | None = None, native: bool = True) -> CallPlan:
    """The one decision of how a call is computed, for the kernel (``TileContext``) and the
    memory models alike. ``mods``: None (no score_mod or dropout), or the ``Mods.fast`` kind of
    the active ones: "bias" (the fused operator with a per-tile bias, where it takes the dtype),
    "softcap" (its own torch-ops tile kernel), "" (the generic torch kernel). An explicit
    ``kernel="torch"`` always runs the generic torch kernel. ``native``: a softcap call may take
    the native kernel (``softcap_native_call``); False where the caller's rows are a subset."""
    kernel = mods_kernel(kernel, device, dtype, mods)
    window = native_window(mask) if kernel == "softcap" and native else None
    if window is not None and softcap_native_call(device=device, dtype=dtype, nq=nq, nk=nk):
        # One native call over everything (``kernels.native``): no tile loop, no per-tile tensors;
        # it computes only the key blocks each query block's window reaches.
        return CallPlan("softcap_native", False, False, False, True, None, window=window)
    fused = kernel == "fused"
    # Plain causal attention: partial tiles are square diagonal tiles (when aligned), which
    # the kernel's own is_causal handles. Stacked GQA rows would break its alignment.
    pure_causal = (isinstance(mask, SlidingWindow) and mask.left is None and mask.right == 0
                   and q_heads == kv_heads)
    # Without a mask, or with a plain causal mask on a square problem (where the kernel's
    # top-left alignment is also ours), the fused operator skips empty blocks and tiles
    # internally in O(N) memory: one call over everything is fastest (every extra call
    # pays the intra-op threads' synchronisation), and its outputs need no copying.
    causal_call = pure_causal and fused and nq == nk
    # Causal GQA, or causal & key padding, on a square problem: one fused call over every head
    # where the operator takes K/V with fewer heads (``native_gqa``), else one per KV head, its
    # G query heads against the KV head expanded to G heads (a stride-0 view, no copy); the
    # padding is a (B, 1, 1, Nk) additive bias (also a view when expanded), so the kernel's own
    # is_causal applies and no tile loop runs. Only the per-KV-head loop has expanded dK/dV
    # (transient, G heads at a time), so only it is bounded by ``grouped_causal_fits``.
    causal, padding = _causal_and_padding(mask)
    grouped_causal = (causal and fused and nq == nk
                      and ((q_heads > kv_heads
                            and (native_gqa()
                                 or grouped_causal_fits(batch, q_heads, kv_heads, nq, head_dim, dtype.itemsize)))
                           or (q_heads == kv_heads and padding is not None)))
    if mods is not None:
        # A tile's bias is a (G·Tq × Tk) tensor: one call over everything would be N².
        causal_call = grouped_causal = False
    single_call = (mask is None or causal_call or grouped_causal) and fused and mods is None
    band = band_of(mask)
    # A causal window on a square problem: one fused call per query segment over the keys it
    # sees (``kernels.banded``), where the operator takes the heads as they are. Half precision
    # keeps the tile loop, whose backward accumulates in float32.
    if (band is not None and fused and mods is None and nq == nk > 0 and dtype in (torch.float32, torch.float64)
            and (q_heads == kv_heads or native_gqa())):
        return CallPlan(kernel, False, False, False, False, band[1], band[0])
    return CallPlan(kernel, pure_causal, causal_call, grouped_causal, single_call, padding)


def native_window(mask: Mask | None) -> tuple[int | None, int | None, Tensor | None] | None:
    """``mask`` as the native kernel's (left, right, key_valid): a window's bounds (None
    unbounded) and key padding's (Bm, Nk) flags (None: no padding). Taken: no mask, a
    ``SlidingWindow`` (causal, windows, their ``Band`` pieces), ``key_padding``, and an ``&`` of
    them (the tighter bound on each side; one key padding at most); None for any other mask."""
    if mask is None:
        return None, None, None
    if isinstance(mask, SlidingWindow):
        return mask.left, mask.right, None
    if isinstance(mask, KeyPadding):
        return None, None, mask.valid
    if isinstance(mask, And):
        a, b = native_window(mask.a), native_window(mask.b)
        if a is None or b is None or (a[2] is not None and b[2] is not None):
            return None

        def tighter(x: int | None, y: int | None) -> int | None:
            return y if x is None else x if y is None else min(x, y)

        return tighter(a[0], b[0]), tighter(a[1], b[1]), a[2] if a[2] is not None else b[2]
    return None


def softcap_native_call(*, device: str | torch.device, dtype: torch.dtype, nq: int, nk: int) -> bool:
    """Whether a softcap call whose mask the kernel takes (``native_window``) runs as one call of the
    native C++ kernel (``kernels.native``): on the CPU, float32 or float64, with the kernel
    built. Any other mask (dilated, a user function) keeps the tile loop of torch-ops softcap
    kernels, which also skips the tiles the mask leaves out."""
    dev = device.type if isinstance(device, torch.device) else str(device)
    if dev != "cpu" or dtype not in native.NATIVE_DTYPES or not nq or not nk:
        return False
    return native.available()


def mods_kernel(kernel: str, device: str | torch.device, dtype: torch.dtype, mods: str | None) -> str:
    """The tile kernel of a call with score modifications of fast kind ``mods`` (see ``plan_call``)."""
    if mods is None:
        return resolve_kernel(kernel, device, dtype)
    if kernel == "torch" or mods == "":
        return "torch"
    if mods == "softcap":
        return "softcap"
    # "bias": the operator adds the tile's bias in the inputs' dtype; half precision would round
    # it (ALiBi's slope·distance) before the add, so only float32/float64 take this path.
    fused = resolve_kernel(kernel, device, dtype) == "fused" and dtype in (torch.float32, torch.float64)
    return "fused" if fused else "torch"


# Most keys per segment of a tiled call with a score bias (both passes): the bias of one
# segment is a (B, Hq, Tq, BIAS_SEGMENT) float tensor, 8 MiB at Hq = 8, Tq = 256 in float32.
BIAS_SEGMENT = 1024
# A score_mod with a ``row_bias`` (ALiBi) under no mask or plain causal, without GQA: the bias
# of a tile off the diagonal is a row of keys (``TileMods.row_bias``), so the forward builds
# nothing per pair and only the backward's bias tile, (B, Hq, Tq, ROW_BIAS_SEGMENT), is made:
# larger tiles then pay off (fewer calls and merges), 32 MiB at Hq = 8, Tq = 512 in float32.
ROW_BIAS_Q_TILE = 512
ROW_BIAS_SEGMENT = 2048
# Most keys per segment of the softcap kernel: its (G·Tq × Tk) score, probability and dP tiles
# are transient, 8 MiB each at Hq = 8, Tq = 256 in float32. 1024 keys rather than 256 cut the
# per-tile calls four-fold: 1.73 rather than 2.07 x plain chunked at N = 8192 (fwd+bwd, quiet).
SOFTCAP_SEGMENT = 1024


class TileContext:
    """Everything about one tiled call that both passes need, computed once: the resolved
    kernel, the segment plans of the forward and the backward, and the bound ``mask_mod``."""

    def __init__(self, q, k, mask, scale, q_tile, kv_tile, kernel, mods: Mods | None = None,
                 q_pos: Tensor | None = None, head0: int = 0, reach: tuple[int, int] | None = None):
        self.B, self.Hq, self.nq, self.D = q.shape
        # q's heads are the call's heads head0, head0 + 1, ... (a score_mod reads global heads);
        # ``reach`` (distance, centre): key tiles farther than ``distance`` from every row's
        # centre key (query i's is key i + centre) are skipped (``reach_groups``).
        self.head0, self.reach = head0, reach
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.scale = scale
        # Active score modifications choose the kernel (``mods_kernel``): their fast kind or the torch kernel.
        self.mods = mods if mods is not None and mods.active else None
        # Global query positions of q's rows, when q holds a subset of the call's rows.
        self.q_pos = q_pos
        self.tiles = (q_tile, kv_tile)
        self.mask = mask
        call = plan_call(kernel, device=q.device, dtype=q.dtype, mask=mask, batch=self.B, nq=self.nq, nk=self.nk,
                         q_heads=self.Hq, kv_heads=self.Hkv, head_dim=self.D,
                         mods=self.mods.fast if self.mods is not None else None, native=q_pos is None)
        self.kernel, self.pure_causal, self.causal_call = call.kernel, call.pure_causal, call.causal_call
        self.grouped_causal, self.single_call = call.grouped_causal, call.single_call
        self.key_padding = call.key_padding
        self.key_valid = call.key_padding.valid if call.key_padding is not None else None
        self.band, self.native_window = call.band, call.window
        self.mask_mod = mask.mask_fn(self.nq, self.nk) if mask is not None else None
        self.device = q.device
        if self.band is not None or self.kernel == "softcap_native":
            # no block map: the band's segments are its own; the native kernel blocks internally
            self.plan = self.plan_bwd = None
            return
        fused = self.kernel == "fused"
        cap = {"fused": BIAS_SEGMENT, "softcap": SOFTCAP_SEGMENT}.get(self.kernel) if self.mods is not None else None
        if fused and cap is not None and self.row_bias_tiles(mask):
            q_tile, cap = max(q_tile, ROW_BIAS_Q_TILE), ROW_BIAS_SEGMENT
        if self.single_call:
            q_tile, kv_tile = max(q_tile, self.nq, 1), max(kv_tile, self.nk, 1)
        # The forward keeps only (Tq × D) per segment, so it merges freely; the backward's
        # per-segment dK/dV are transient, so its segments are capped.
        rows = block_rows(mask, self.nq, self.nk, q_tile, kv_tile, self.B, self.Hq)
        # The block rows and tile sizes the plans below come from (``reach_groups`` reads them).
        self.block_rows, self.block = rows, (q_tile, kv_tile)
        if reach is not None:
            rows = within_reach(rows, self.nq, q_tile, kv_tile, *reach)
        if cap is not None:
            # Both passes evaluate the score modification per segment: one cap for both.
            self.plan = plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=True, max_segment=cap)
            self.plan_bwd = self.plan
        else:
            self.plan = plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=fused, gather=MAX_GATHER)
            self.plan_bwd = (plan_segments(rows, self.nq, self.nk, q_tile, kv_tile, merge=True,
                                           max_segment=MAX_SEGMENT) if fused else self.plan)

    def row_bias_tiles(self, mask: Mask | None) -> bool:
        """Whether the larger tiles of a ``row_bias`` score_mod apply (see ``ROW_BIAS_Q_TILE``)."""
        declared = callable(getattr(self.mods.score_mod, "row_bias", None))
        return declared and self.G == 1 and self.q_pos is None and (mask is None or self.pure_causal)

    def q_view(self, x: Tensor, qa: int, qb: int) -> Tensor:
        """(B, Hq, Nq, ...) -> this tile as (B, Hkv, G·Tq, ...)."""
        t = x[:, :, qa:qb]
        return t.reshape(self.B, self.Hkv, self.G * (qb - qa), *x.shape[3:])

    def q_store(self, dst: Tensor, qa: int, qb: int, tile: Tensor) -> None:
        dst[:, :, qa:qb] = tile.reshape(self.B, self.Hq, qb - qa, *dst.shape[3:])

    def allowed(self, qa: int, qb: int, seg: Segment) -> Tensor | None:
        """The mask of one segment as (Bm, Hkv or 1, G·Tq, Tk) bools; None when unmasked."""
        if not seg.masked:
            return None
        if self.pure_causal and seg.contiguous:
            start, stop = seg.ranges[0]
            if qa + self.nk - self.nq == start and qb - qa == stop - start:
                return CAUSAL_TILE
        dev = self.device
        b = torch.arange(self.B, device=dev)[:, None, None, None]
        h = torch.arange(self.Hq, device=dev)[None, :, None, None]
        qi = torch.arange(qa, qb, device=dev)[:, None]
        ki = seg.positions(dev)[None, :]
        m = eval_mask(self.mask_mod, b, h, qi, ki)
        m = m.expand(*m.shape[:2], qb - qa, seg.size)  # (Bm, Hm, Tq, Tk)
        if m.shape[1] == 1:
            return m.repeat(1, 1, self.G, 1) if self.G > 1 else m  # (Bm, 1, G·Tq, Tk)
        m = m.expand(m.shape[0], self.Hq, *m.shape[2:])
        return m.reshape(m.shape[0], self.Hkv, self.G * (qb - qa), m.shape[-1])


    def tile_mods(self, qa: int, qb: int, seg: Segment) -> TileMods | None:
        return TileMods(self, qa, qb, seg) if self.mods is not None else None


def within_reach(rows: list[list[tuple[int, bool]]], nq: int, q_tile: int, kv_tile: int,
                 reach: int, centre: int) -> list[list[tuple[int, bool]]]:
    """``block_rows`` without the key tiles farther than ``reach`` positions from every row's
    centre key (query i's is key i + ``centre``): a tile is kept whole when any of its keys is
    within reach of any of the query tile's rows."""
    kept = []
    for i, row in enumerate(rows):
        lo = i * q_tile + centre - reach  # the least key within reach of the tile's first row
        hi = min((i + 1) * q_tile, nq) - 1 + centre + reach  # the greatest, of its last row
        kept.append([(j, full) for j, full in row if (j + 1) * kv_tile - 1 >= lo and j * kv_tile <= hi])
    return kept


def allowed_bool(c: TileContext, qa: int, qb: int, seg: Segment) -> Tensor | None:
    """``c.allowed`` as a bool tensor (or None), for code with its own tile kernel."""
    a = c.allowed(qa, qb, seg)
    if a is CAUSAL_TILE:
        return torch.ones(qb - qa, seg.size, dtype=torch.bool, device=c.device).tril()
    return a


# Without native GQA, one head group's expanded dQ, dK, dV and their copies are about six
# (B, G, N, D) buffers, transient in the backward. Past this many bytes they would outweigh the
# inputs themselves (1 GiB each at N = 2**20, B = 1, G = 4, D = 64), so the tile loop, whose
# working set is a few tiles, runs instead: the per-KV-head loop is a speed path for moderate N
# only. The one call of native GQA has no such buffers and is not bounded.
GROUPED_CAUSAL_MAX_BYTES = 256 * 2**20


def grouped_causal_fits(batch: int, q_heads: int, kv_heads: int, seq_len: int, head_dim: int,
                        itemsize: int) -> bool:
    """Without native GQA, whether causal GQA runs as one fused call per KV head (else tile by
    tile); ``plan_call`` asks this, for the kernel and its memory model both."""
    group_bytes = batch * (q_heads // kv_heads) * seq_len * head_dim * itemsize
    return 6 * group_bytes <= GROUPED_CAUSAL_MAX_BYTES


def _causal_and_padding(mask: Mask | None) -> tuple[bool, KeyPadding | None]:
    """(plain causal?, its key padding) for ``causal()`` and ``causal() & key_padding(valid)``."""
    def plain_causal(m):
        return isinstance(m, SlidingWindow) and m.left is None and m.right == 0

    if plain_causal(mask):
        return True, None
    if isinstance(mask, And):
        for a, b in ((mask.a, mask.b), (mask.b, mask.a)):
            if plain_causal(a) and isinstance(b, KeyPadding):
                return True, b
    return False, None


def _bnhd_zeros(q: Tensor, c: TileContext) -> Tensor:
    """Zeros of shape (B, Hq, Nq, D) laid out as (B, Nq, Hq, D) in memory, as SDPA's own output:
    a caller's ``out.transpose(1, 2)`` to (B, Nq, Hq·D) (every transformer's output projection)
    is then a view, not a copy saved beside the output that the backward keeps."""
    return q.new_zeros(c.B, c.nq, c.Hq, c.D).transpose(1, 2)  # (B, Hq, Nq, D), strides of (B, Nq, Hq, D)


def _head_groups(c: TileContext, k: Tensor, v: Tensor):
    """(query heads, keys, values) per call: all heads at once without GQA, else each KV head
    expanded (a stride-0 view) to its G query heads, (B, G, N, D)."""
    if c.G == 1:
        yield slice(None), k, v
        return
    for j in range(c.Hkv):
        expand = (-1, c.G, -1, -1)
        yield slice(j * c.G, (j + 1) * c.G), k[:, j:j + 1].expand(*expand), v[:, j:j + 1].expand(*expand)


def _key_bias(c: TileContext, q: Tensor, heads: int):
    """The key padding as an additive (B, heads, Nq, Nk) bias, a view of (B, 1, 1, Nk); or CAUSAL_TILE."""
    if c.key_valid is None:
        return CAUSAL_TILE
    valid = c.key_valid.to(q.device)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, -math.inf)  # (Bm, Nk)
    return bias[:, None, None, :].expand(c.B, heads, c.nq, c.nk)


@functools.cache
def native_gqa() -> bool:
    """Whether the CPU flash operator takes K/V with fewer heads than Q (torch >= 2.5 does, in
    both passes): then causal GQA is one call, as SDPA's ``enable_gqa``, with no head loop.

    The answer is cached at the first call, which may come inside ``attnmem.estimate``'s trace
    or a memory measurement: the probe runs outside every dispatch mode, on real tensors, so
    it is the real kernels that answer and no mode sees (or counts) its tensors."""
    with _disable_current_modes():
        q, kv = torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, True)
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(out, q, kv, kv, out, lse, 0.0, True)
        except RuntimeError:
            return False
    return True


def _grouped_causal_forward(c: TileContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if native_gqa():
        # One call over every head; its output is (B, Hq, N, D) laid out as (B, N, Hq, D).
        out, lse = _causal_call(q, k, v, _key_bias(c, q, c.Hq), c.scale, backward=False)
        lse = lse.to(acc_dtype(q.dtype))  # (B, Hq, N)
    else:
        out = _bnhd_zeros(q, c)  # (B, Hq, N, D)
        lse = torch.empty(c.B, c.Hq, c.nq, dtype=acc_dtype(q.dtype), device=q.device)  # (B, Hq, N)
        for heads, k_g, v_g in _head_groups(c, k, v):
            allowed = _key_bias(c, q, k_g.shape[1])
            o_g, l_g = _causal_call(q[:, heads], k_g, v_g, allowed, c.scale, backward=False)
            out[:, heads] = o_g
            lse[:, heads] = l_g
    if c.key_valid is not None:
        # A query before a row's first real key sees nothing: lse -inf (the kernel reports 0).
        seen = c.key_valid.to(q.device).cumsum(-1) > 0  # (Bm, N): some real key at or before
        lse.masked_fill_(~seen[:, None, :], -math.inf)
    return out, lse


def _grouped_causal_backward(c: TileContext, dout, q, k, v, out, lse_b):
    if native_gqa():
        return _causal_call(q, k, v, _key_bias(c, q, c.Hq), c.scale, backward=True, dout=dout, out=out, lse=lse_b)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for j, (heads, k_g, v_g) in enumerate(_head_groups(c, k, v)):
        allowed = _key_bias(c, q, k_g.shape[1])
        dq_g, dk_g, dv_g = _causal_call(q[:, heads], k_g, v_g, allowed, c.scale, backward=True,
                                        dout=dout[:, heads], out=out[:, heads], lse=lse_b[:, heads])
        dq[:, heads] = dq_g
        if c.G == 1:
            dk.copy_(dk_g)
            dv.copy_(dv_g)
        else:
            dk[:, j] = dk_g.sum(1)  # (B, G, N, D) -> (B, N, D): the G heads that read KV head j
            dv[:, j] = dv_g.sum(1)
    return dq, dk, dv


def _causal_call(q, k, v, allowed, scale, *, backward, dout=None, out=None, lse=None):
    """The fused operator with its own ``is_causal`` and, optionally, an additive key bias."""
    if allowed is CAUSAL_TILE:
        if backward:
            return fused_backward(dout, q, k, v, out, lse, CAUSAL_TILE, scale)
        return fused_forward(q, k, v, CAUSAL_TILE, scale)
    if backward:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, attn_mask=allowed, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=allowed,
                                                                      scale=scale)


def tiled_forward(c: TileContext, q: Tensor, k: Tensor, v: Tensor,
                  dest: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Nq, D) in q's dtype and per-row lse (B, Hq, Nq) in the accumulation dtype.

    ``dest``: (out, lse) to write into (zeros and -inf, e.g. views of a larger call's heads),
    for a call that runs the tile loop (the head groups of ``reach_groups``)."""
    if c.kernel == "softcap_native":  # one call; ``dest`` is only for the fused kernel's head groups
        assert dest is None, "the native softcap kernel runs no head groups"
        left, right, valid = c.native_window
        return native.softcap_forward(q, k, v, c.scale, c.mods.score_mod.softcap, left=left, right=right,
                                      key_valid=valid)
    fwd = TILE_KERNELS[c.kernel][0]
    acc = acc_dtype(q.dtype)
    if c.grouped_causal and c.nq:
        return _grouped_causal_forward(c, q, k, v)
    if c.band is not None and c.nq:
        return banded_forward(q, k, v, left=c.band, scale=c.scale, q_tile=c.tiles[0], padding=c.key_padding)
    if c.single_call and c.nq and c.nk:
        whole = CAUSAL_TILE if c.causal_call else None
        o_all, lse = fwd(c.q_view(q, 0, c.nq), k, v, whole, c.scale)  # (B, Hkv, G·Nq, ·)
        # Without GQA a view: the operator's output is (B, N, H, D) in memory. Stacked GQA rows
        # cannot be viewed so; they stay (B, Hq, N, D)-contiguous rather than pay a copy of the
        # output here (a caller that needs (B, N, H, D), as HF does, copies once itself).
        out = o_all.reshape(c.B, c.Hq, c.nq, c.D)
        return out, lse.to(acc).reshape(c.B, c.Hq, c.nq)
    if dest is not None:
        out, lse = dest
    else:
        out = _bnhd_zeros(q, c)
        lse = torch.full((c.B, c.Hq, c.nq), -math.inf, dtype=acc, device=q.device)  # (B, Hq, Nq)
    for qa, qb, segs in c.plan:
        if not segs:
            continue  # nothing to attend: zeros, lse -inf
        q_t = c.q_view(q, qa, qb)  # (B, Hkv, G·Tq, D)
        o_t = l_t = None
        for seg in segs:
            tm = c.tile_mods(qa, qb, seg)
            o_s, l_s = fwd(q_t, seg.take(k), seg.take(v), c.allowed(qa, qb, seg), c.scale,
                           *((tm,) if tm is not None else ()))
            l_s = l_s.to(acc)
            if o_t is None:
                o_t, l_t = (o_s, l_s) if len(segs) == 1 else (o_s.to(acc), l_s)
            else:
                o_t, l_t = merge_partials(o_t, l_t, o_s, l_s)
        c.q_store(out, qa, qb, o_t.to(q.dtype))
        c.q_store(lse, qa, qb, l_t)
    return out, lse


def _add_all(total: list[Tensor | None], parts: Sequence[Tensor | None]) -> list[Tensor | None]:
    if not total:
        total = [None] * len(parts)
    return [t if g is None else (g.clone() if t is None else t.add_(g)) for t, g in zip(total, parts)]


def tiled_backward(c: TileContext, dout, q, k, v, out, lse, *, delta: Tensor | None = None,
                   cast: bool = True, dest: tuple[Tensor, Tensor, Tensor] | None = None):
    """dq, dk, dv (and, when ``c.mods`` has captured tensors, their gradients as a 4th item).

    ``dest``: zero (dq, dk, dv) in the accumulation dtype to add into, for a call that runs the
    tile loop (the head groups of ``reach_groups``).

    Every partial sum is added in the accumulation dtype (float32 for half precision) and cast
    once, at the end, unless ``cast`` is False (callers adding several passes cast themselves).
    ``delta`` (B, Hq, Nq) replaces rowsum(dO ∘ O): ``D - dlse`` when the lse has a gradient.
    """
    if delta is not None and c.kernel == "fused":
        # The fused operator computes D itself: the torch kernel, on the original tiles.
        c = TileContext(q, k, c.mask, c.scale, *c.tiles, "torch", c.mods, c.q_pos, c.head0, c.reach)
    kernel = c.kernel
    bwd = TILE_KERNELS[kernel][1] if kernel in TILE_KERNELS else None
    acc = acc_dtype(q.dtype)
    # A row that attends to nothing has lse -inf; +inf makes every recomputed P exactly 0.
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    if kernel == "fused":
        lse_b = lse_b.float() if q.dtype in (torch.bfloat16, torch.float16) else lse_b.to(q.dtype)
    d_captured: list[Tensor | None] = []
    if kernel == "softcap_native":
        assert dest is None, "the native softcap kernel runs no head groups"
        left, right, valid = c.native_window
        dq, dk, dv = native.softcap_backward(dout, q, k, v, out, lse_b, c.scale, c.mods.score_mod.softcap,
                                             left=left, right=right, key_valid=valid, delta=delta)
    elif c.grouped_causal and c.nq:
        dq, dk, dv = _grouped_causal_backward(c, dout, q, k, v, out, lse_b)
    elif c.band is not None and c.nq:
        dq, dk, dv = banded_backward(dout, q, k, v, out, lse_b, left=c.band, scale=c.scale, q_tile=c.tiles[0],
                                     padding=c.key_padding)
    elif c.single_call and kernel == "fused" and c.nq and c.nk:
        dq, dk, dv, _ = bwd(c.q_view(dout, 0, c.nq), c.q_view(q, 0, c.nq), k, v,
                            c.q_view(out, 0, c.nq), c.q_view(lse_b, 0, c.nq),
                            CAUSAL_TILE if c.causal_call else None, c.scale)
        dq, dk, dv = dq.reshape(q.shape), dk, dv
    else:
        plan = c.plan_bwd
        if dest is not None:
            dq, dk, dv = dest
        else:
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qa, qb, segs in plan:
            if not segs:
                continue
            q_t, do_t, o_t = c.q_view(q, qa, qb), c.q_view(dout, qa, qb), c.q_view(out, qa, qb)
            l_t = c.q_view(lse_b, qa, qb)
            d_t = c.q_view(delta, qa, qb) if delta is not None else None
            dq_t = None
            for seg in segs:
                ks, vs = seg.take(k), seg.take(v)
                tm = c.tile_mods(qa, qb, seg)
                extra = (tm, d_t) if tm is not None or d_t is not None else ()
                dq_s, dk_s, dv_s, dc = bwd(do_t, q_t, ks, vs, o_t, l_t, c.allowed(qa, qb, seg), c.scale, *extra)
                dq_t = dq_s.to(acc) if dq_t is None else dq_t.add_(dq_s)
                seg.add_into(dk, dk_s)
                seg.add_into(dv, dv_s)
                if dc:
                    d_captured = _add_all(d_captured, dc)
            c.q_store(dq, qa, qb, dq_t)
    if cast:
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if c.mods is not None and c.mods.captured:
        return dq, dk, dv, d_captured or [None] * len(c.mods.captured)
    return dq, dk, dv


def row_dot(a: Tensor, b: Tensor, dtype: torch.dtype, rows: int = 1024) -> Tensor:
    """rowsum(a ∘ b) over D, (B, H, N, D) -> (B, H, N) in ``dtype``, a block of rows at a
    time so that no (B, H, N, D) temporary is made."""
    out = torch.empty(a.shape[:-1], dtype=dtype, device=a.device)
    for r in range(0, a.shape[2], rows):
        out[:, :, r:r + rows] = (a[:, :, r:r + rows].to(dtype) * b[:, :, r:r + rows].to(dtype)).sum(-1)
    return out


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Renormalise for one sink logit per query head: ``lse' = logaddexp(lse, sink_h)``,
    ``out' = out·exp(lse - lse')`` (in place on ``out``). Rows with no key keep out = 0."""
    s = sinks.detach().to(lse.dtype).view(1, -1, 1)  # (1, Hq, 1)
    new = torch.logaddexp(lse, s.expand_as(lse))
    w = torch.exp(lse - new)  # exp(-inf) = 0 where nothing was attended
    out.mul_(w.unsqueeze(-1).to(out.dtype))
    return out, new


class Run:
    """A schedule of exact attention: ``forward -> (out, lse)`` and its backward. The
    autograd function below adds sinks and the lse's gradient around any such schedule."""

    def forward(self, q, k, v) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, delta):
        raise NotImplementedError


# A bias that decays with distance (ALiBi: ``-m_h·|i + offset - j|``, 0 at the row's centre key
# i + offset and falling by m_h a key away from it) makes the far keys of a steep head
# negligible. Every score of query i is bounded by R_h = scale·max|q|·max|k| of its head
# (Cauchy-Schwarz), and the centre key, which every row sees (its diagonal under a causal mask),
# has logit >= -R_h: a key d away has probability at most exp(2·R_h - m_h·d) of the centre's.
# Past reach_h = (2·R_h + NEGLIGIBLE) / m_h every pair is below exp(-NEGLIGIBLE) of its row's
# sum (9e-27 in float32), far below the dtype's rounding, as ``tile._drop_negligible_`` drops
# pairs inside a tile. ``TiledRun`` then skips, head by head, the key tiles that lie wholly
# beyond reach of a query tile: at N = 8192 an ALiBi head of slope 1/2 computes bands of a few
# hundred keys instead of whole rows. Memory only goes down (fewer tiles, over fewer heads at a
# time); memory estimates, which have no values to bound R with, are those of the whole rows.


def reach_groups(c: TileContext, q: Tensor, k: Tensor) -> list[tuple[slice, TileContext]] | None:
    """The heads of a call with a decaying bias (a score_mod declaring ``decay() -> (rates,
    offset)``) in runs of equal skipped tiles, each with its own ``TileContext``; None when no
    tile can be skipped or the call is not one this applies to: the fused kernel's row-bias
    tiles (no mask or plain causal, no GQA), and a centre key every row sees with bias 0."""
    decay = getattr(c.mods.score_mod, "decay", None) if c.mods is not None and c.mods.fast == "bias" else None
    if (decay is None or c.kernel != "fused" or not c.row_bias_tiles(c.mask) or not c.nq or not c.nk
            or is_fake(q) or is_fake(k)):
        return None
    rates, offset = decay()
    if rates.numel() != c.Hq:
        return None
    centre_seen = (offset == c.nk - c.nq) if c.mask is not None else (0 <= offset and c.nq + offset <= c.nk)
    if not centre_seen:
        return None
    acc = acc_dtype(q.dtype)
    with torch.no_grad():
        bound = (q.detach().to(acc).norm(dim=-1).amax((0, 2)) * k.detach().to(acc).norm(dim=-1).amax((0, 2))
                 * (abs(c.scale) * REACH_SLACK))  # (Hq,): R_h
        margin = 2 * bound.double() + NEGLIGIBLE[acc]
        rates = rates.detach().to(device=margin.device, dtype=torch.float64)
        reach = torch.where(rates > 0, (margin / rates).ceil(), math.inf).tolist()  # one host read (CPU only)
    q_tile, kv_tile = c.block
    whole = [tuple(r) for r in c.block_rows]
    heads: list[tuple[int | None, list]] = []
    for h in range(c.Hq):
        r = int(reach[h]) if math.isfinite(reach[h]) and reach[h] < c.nq + c.nk else None
        rows = whole if r is None else [tuple(x) for x in within_reach(c.block_rows, c.nq, q_tile, kv_tile, r, offset)]
        heads.append((r, rows))
    groups: list[tuple[int, int]] = []  # [first, stop) runs of heads with the same tiles
    for h in range(c.Hq):
        if groups and heads[h][1] == heads[groups[-1][0]][1]:
            groups[-1] = (groups[-1][0], h + 1)
        else:
            groups.append((h, h + 1))
    if len(groups) == 1 and heads[0][1] == whole:
        return None
    out = []
    for a, b in groups:
        reaches = [heads[h][0] for h in range(a, b)]
        r = None if None in reaches else max(reaches)
        out.append((slice(a, b), TileContext(q[:, a:b], k[:, a:b], c.mask, c.scale, *c.tiles, c.kernel, c.mods,
                                             c.q_pos, c.head0 + a, None if r is None else (r, offset))))
    return out


class TiledRun(Run):
    """One ``TileContext`` over the whole call; with a decaying bias, its heads in groups that
    skip the key tiles beyond their reach (``reach_groups``)."""

    def __init__(self, c: TileContext):
        self.c = c
        self.groups: list[tuple[slice, TileContext]] | None = None

    @property
    def mods(self) -> Mods | None:
        return self.c.mods

    def forward(self, q, k, v):
        self.groups = reach_groups(self.c, q, k)
        if self.groups is None:
            return tiled_forward(self.c, q, k, v)
        c = self.c
        out = _bnhd_zeros(q, c)
        lse = torch.full((c.B, c.Hq, c.nq), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)  # (B, Hq, Nq)
        for hs, g in self.groups:
            tiled_forward(g, q[:, hs], k[:, hs], v[:, hs], dest=(out[:, hs], lse[:, hs]))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, delta):
        if self.groups is None:
            grads = tiled_backward(self.c, dout, q, k, v, out, lse, delta=delta)
            return (*grads[:3], list(grads[3]) if len(grads) > 3 else [])
        acc = acc_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        for hs, g in self.groups:
            tiled_backward(g, dout[:, hs], q[:, hs], k[:, hs], v[:, hs], out[:, hs], lse[:, hs],
                           delta=None if delta is None else delta[:, hs], cast=False,
                           dest=(dq[:, hs], dk[:, hs], dv[:, hs]))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), []


class _ExactAttention(torch.autograd.Function):
    """out, lse of a ``_Run``, with optional sinks; inputs: q, k, v, sinks, *captured."""

    @staticmethod
    def forward(ctx, run: Run, n_captured: int, q, k, v, sinks, *captured):
        out, lse = run.forward(q, k, v)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
        ctx.run, ctx.n_captured = run, n_captured
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        none = (None,) * (6 + ctx.n_captured)
        if dout is None and dlse is None:
            return none
        acc = lse.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        delta = None
        if dlse is not None or (sinks is not None and ctx.needs_input_grad[5]):
            delta = row_dot(dout, out, acc)  # (B, Hq, Nq)
            if dlse is not None:
                delta = delta - dlse.to(acc)
        dq, dk, dv, d_captured = ctx.run.backward(dout, q, k, v, out, lse,
                                                  delta if dlse is not None else None)
        d_sinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            # ∂out/∂sink = -p_sink·out and ∂lse/∂sink = p_sink, with p_sink = exp(sink - lse').
            p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)  # (B, Hq, Nq)
            d_sinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
        d_captured = list(d_captured) + [None] * (ctx.n_captured - len(d_captured))
        return (None, None, dq, dk, dv, d_sinks, *d_captured)


def run_exact(run: Run, q: Tensor, k: Tensor, v: Tensor, *, sinks: Tensor | None = None,
              mods: Mods | None = None, return_lse: bool = False):
    """Apply a schedule through the autograd function: out, or (out, lse) with ``return_lse``."""
    captured = mods.captured if mods is not None else ()
    out, lse = _ExactAttention.apply(run, len(captured), q, k, v, sinks, *captured)
    return (out, lse) if return_lse else out


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                    q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto",
                    score_mod: ScoreMod | None = None, sinks: Tensor | None = None,
                    dropout_p: float = 0.0, dropout_seed: int | torch.Generator | None = None,
                    return_lse: bool = False):
    """Exact softmax attention over the block map of ``mask`` (None = all pairs).

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with ``Hq % Hkv == 0``.
        mask: the effective mask (causal included), or None.
        scale: multiplier of QKᵀ.
        q_tile, kv_tile: tile sizes of the block map.
        kernel: "auto", "fused" (CPU operator) or "torch" (plain PyTorch, any device); a
            score_mod or dropout runs its fast path (``mods_kernel``) or the torch kernel.
        score_mod, sinks (Hq,), dropout_p, dropout_seed, return_lse: as ``attnmem.attention``.

    Returns:
        (B, Hq, Nq, D), or ``(out, lse)`` with lse (B, Hq, Nq); rows with nothing to attend are
        zeros.
    """
    mods = make_mods(score_mod, dropout_p, dropout_seed, q)
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel, mods)
    if mods is None and sinks is None and not return_lse:
        # The plain call (no sinks, mods or lse): the fewest moving parts on the hot path.
        return LseAttention.apply(q, k, v, c, tiled_forward, tiled_backward)
    return run_exact(TiledRun(c), q, k, v, sinks=sinks, mods=mods, return_lse=return_lse)


def tiled_attention_lse(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, scale: float,
                        q_tile: int = 256, kv_tile: int = 256, kernel: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    """Forward only, also returning the per-row log-sum-exp (B, Hq, Nq); for ring attention
    and other callers that merge partial results themselves."""
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return tiled_forward(c, q, k, v)


def tiled_backward_lse(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       mask: Mask | None, scale: float, q_tile: int = 256, kv_tile: int = 256,
                       kernel: str = "auto", cast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through one block of keys, given the output and log-sum-exp of the WHOLE row.

    For ring attention and other callers that split the keys: with ``out`` (B, Hq, Nq, D) and
    ``lse`` (B, Hq, Nq) merged over all key blocks, the probabilities this block recomputes are
    the global ones, so ``dq`` is this block's share of the full dq (sum the shares over the
    blocks) and ``dk``/``dv`` (B, Hkv, Nk, D) are this block's full gradients from these queries.
    With ``cast=False`` they stay in the accumulation dtype (float32 for half precision).
    """
    c = TileContext(q, k, mask, scale, max(q_tile, MIN_Q_TILE), kv_tile, kernel)
    return tiled_backward(c, dout, q, k, v, out, lse, cast=cast)
