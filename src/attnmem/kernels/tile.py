"""The two tile kernels: one call computes one segment's partial output and log-sum-exp.

``fused`` calls PyTorch's own CPU flash-attention operator (``aten._scaled_dot_product_flash_attention_for_cpu``
and its backward, which accept an external log-sum-exp); ``torch`` is plain matmul/exp code that runs
on any device and dtype. ``resolve_kernel`` is the one place that decides which one ``"auto"`` means.

The backward kernels of ``TILE_KERNELS`` return gradients in the accumulation dtype (float32 for
half precision; the fused one runs half-precision segments in float32), so callers add their
partial sums unrounded and cast once. The torch kernels also take a segment's ``TileMods``
(score_mod, dropout) and a ``delta`` replacing rowsum(dO ∘ O).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

if TYPE_CHECKING:
    from .mods import TileMods

KERNELS = ("auto", "fused", "torch")
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def fused_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def resolve_kernel(kernel: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The tile kernel a call runs: the option's own choice, or for "auto" the fused CPU operator
    where it takes the dtype, else plain PyTorch. The one place this is decided: the kernels
    and every memory model (``Method.memory_model``) ask it."""
    if kernel == "auto":
        dev = device.type if isinstance(device, torch.device) else str(device)
        if dev == "cpu" and dtype in FUSED_DTYPES and fused_available():
            return "fused"
        return "torch"
    return kernel


# --- tile kernels ---------------------------------------------------------------------------
# Shapes inside: q (B, Hkv, M, D) with M = G·Tq, k/v (B, Hkv, Tk, D), allowed (Bm, Hm, M, Tk),
# None (every pair allowed) or CAUSAL_TILE.


class _CausalTile:
    """A square tile on the diagonal of a causal mask: the kernel's own ``is_causal`` applies,
    so no mask tensor is built and the fused kernel skips the tile's upper half itself."""

    def __repr__(self) -> str:
        return "CAUSAL_TILE"


CAUSAL_TILE = _CausalTile()


def _causal_bool(q: Tensor, k: Tensor) -> Tensor:
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()


def _fused_bias(q: Tensor, allowed, tm: TileMods | None) -> Tensor | None:
    """The fused operator's additive ``attn_mask``: the tile's score bias (a ``"bias"``
    score_mod), with -inf where the mask disallows; None when neither applies."""
    mask = allowed if isinstance(allowed, Tensor) else None
    if tm is None:
        if mask is None:
            return None
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -math.inf)
    bias = tm.bias(q.dtype)  # (1, Hkv, M, Tk)
    return bias if mask is None else torch.where(mask, bias, -math.inf)


def _row_bias(allowed, tm: TileMods | None, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """The tile's bias as (row, shift) (``TileMods.row_bias``) on an unmasked tile, else None."""
    return tm.row_bias(dtype) if tm is not None and allowed is None else None


def fused_forward(q, k, v, allowed, scale, tm: TileMods | None = None):
    """One segment through the fused CPU operator; ``tm`` only for a ``"bias"`` score_mod."""
    row_bias = _row_bias(allowed, tm, q.dtype)
    if row_bias is not None and k.shape[-2] and q.shape[-2]:
        return _row_bias_forward(q, k, v, scale, *row_bias)
    causal = allowed is CAUSAL_TILE
    bias = _fused_bias(q, allowed, tm)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale
    )
    if isinstance(allowed, Tensor):
        # The operator reports lse = 0 for a row with no allowed key; make it -inf so the
        # merge gives it no weight.
        lse = lse.masked_fill(~allowed.any(-1).expand(lse.shape), -math.inf)
    return out, lse


# A bias makes many probabilities of a row vanishingly small (ALiBi: exp(-slope·distance)), and
# those that land in float32's subnormal range (below 1.2e-38) make the backward's products
# run at a fraction of their speed (3x slower at N = 4096 with ALiBi's slopes, measured). The
# backward knows each row's lse, so it drops (sets to -inf in the bias) every pair whose
# probability is provably below exp(-NEGLIGIBLE): with |s_ij| <= scale·|q_i|·|k_j| (Cauchy-
# Schwarz), bias_ij < lse_i - scale·|q_i|·max_j |k_j| - NEGLIGIBLE bounds P_ij < exp(-NEGLIGIBLE);
# one floor per segment (the least over its rows) keeps it to one in-place pass. Each dropped
# pair changes a gradient by less than exp(-NEGLIGIBLE) = 9e-27 (float32) or 1e-87 (float64)
# of its other terms: far below the dtypes' own rounding, as flushing subnormals to zero is.
NEGLIGIBLE = {torch.float32: 60.0, torch.float64: 200.0}
# Slack on the Cauchy-Schwarz bound for the rounding of the norms and of the scores themselves.
REACH_SLACK = 1.01


def _drop_negligible_(bias: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float) -> Tensor:
    """``bias`` with -inf (in place) where the backward's probability is provably < exp(-NEGLIGIBLE)."""
    floor = (lse - _reach(q, k, scale)).amin() - NEGLIGIBLE[q.dtype]  # a 0-d tensor; lse is +inf on empty rows
    if is_fake(floor):
        return bias  # a memory trace (attnmem.estimate): no values, and the pass is in place
    return torch.nn.functional.threshold_(bias, float(floor), -math.inf)


def _reach(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale·|q_i|·max_j |k_j|`` (B, Hkv, M), with slack: bounds every |s_ij| (Cauchy-Schwarz)."""
    return q.norm(dim=-1) * (k.norm(dim=-1).amax(-1, keepdim=True) * (abs(scale) * REACH_SLACK))


# A tile whose bias is a row of keys minus a per-query shift (``TileMods.row_bias``: ALiBi off
# the diagonal) runs the forward with the (1, Hkv, 1, Tk) row as a broadcast attn_mask: softmax
# ignores a per-row constant, so only the lse moves, by -shift, and nothing per pair is built.
# Keys the row makes negligible against the tile's nearest key are dropped (-inf) per head.
# The backward recomputes P against the row's whole lse, whose shift spans slope·Tq across the
# tile's rows: with the row alone, far rows would see subnormal probabilities, which slow the
# operator's products several-fold. So it builds the exact bias ``row - shift`` (one pass per
# pair) and drops its negligible pairs as ``_drop_negligible_`` does (one more, in place).


def _row_bias_forward(q, k, v, scale, row, shift):
    # Against the tile's own nearest key (row 0, score >= -reach) a key with row value r has
    # relative weight <= exp(2·reach + r): below exp(-NEGLIGIBLE) it changes this tile's sum
    # by less than the dtype's rounding.
    reach = _reach(q, k, scale).amax(-1).amax(0)  # (Hkv,)
    floor = -(2 * reach + NEGLIGIBLE[q.dtype]).view(1, -1, 1, 1)  # (1, Hkv, 1, 1)
    row = row.masked_fill_(row < floor, -math.inf)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=row, scale=scale)
    return out, lse - shift


def _row_bias_backward(dout, q, k, v, out, lse, scale, row, shift):
    bias = _drop_negligible_(row - shift.unsqueeze(-1), q, k, lse, scale)  # (1, Hkv, M, Tk)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)


def fused_backward(dout, q, k, v, out, lse, allowed, scale, tm: TileMods | None = None):
    row_bias = _row_bias(allowed, tm, q.dtype)
    if row_bias is not None and k.shape[-2] and q.shape[-2]:
        return _row_bias_backward(dout, q, k, v, out, lse, scale, *row_bias)
    bias = _fused_bias(q, allowed, tm)
    if tm is not None and k.shape[-2] and q.shape[-2]:
        bias = _drop_negligible_(bias, q, k, lse, scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, allowed is CAUSAL_TILE, attn_mask=bias, scale=scale
    )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_forward(q, k, v, allowed, scale, tm: TileMods | None = None):
    """One segment in plain PyTorch; out and lse in the accumulation dtype."""
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    if tm is not None and tm.mods.score_mod is not None:
        s = tm.scores(s)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = s.sub_(row_max).exp_()
    row_sum = p.sum(-1, keepdim=True)
    keep = tm.keep(acc) if tm is not None else None
    if keep is not None:
        p.mul_(keep)  # the lse above stays that of the undropped probabilities
    out = torch.matmul(p, v.to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
    lse = (row_max + row_sum.log()).squeeze(-1)  # -inf where nothing was allowed
    return out, lse


def torch_backward(dout, q, k, v, out, lse, allowed, scale, tm: TileMods | None = None, delta=None):
    """Gradients of one segment in the accumulation dtype, and those of the score_mod's
    captured tensors. ``delta`` (B, Hkv, M), when given, replaces rowsum(dO ∘ O)."""
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(qa, ka.transpose(-1, -2)).mul_(scale)  # (B, Hkv, M, Tk)
    graph = None
    if tm is not None and tm.mods.score_mod is not None:
        with torch.enable_grad():
            s_raw = s.requires_grad_()
            s_mod = tm.scores(s_raw)
        graph = (s_raw, s_mod)
        s = s_mod.detach().clone()  # the graph may need s_mod's values (tanh does)
    if allowed is not None:
        s.masked_fill_(~allowed, -math.inf)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    keep = tm.keep(acc) if tm is not None else None
    dv = torch.matmul((p if keep is None else p * keep).transpose(-1, -2), da)
    dp = torch.matmul(da, va.transpose(-1, -2))
    if keep is not None:
        dp.mul_(keep)
    delta = (da * out.to(acc)).sum(-1, keepdim=True) if delta is None else delta.to(acc).unsqueeze(-1)
    ds = p.mul_(dp.sub_(delta))
    d_captured: tuple[Tensor | None, ...] = ()
    if graph is not None:
        s_raw, s_mod = graph
        grads = torch.autograd.grad(s_mod, (s_raw, *tm.mods.captured), ds, allow_unused=True)
        ds, d_captured = grads[0], grads[1:]
    dq = torch.matmul(ds, ka).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    return dq, dk, dv, d_captured


def torch_tile_bytes(*, batch_heads: int, rows: int, keys: int, head_dim: int, itemsize: int,
                     causal_tile: bool = False, mask_bytes: int = 0,
                     keep: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The memory of one call of ``torch_forward`` / ``torch_backward`` (no score_mod; dropout
    through ``keep``): (forward, backward) peak bytes alive inside the call beyond its arguments, its
    outputs included, read off the two functions line by line. The memory models of every tiled
    method on this kernel (``mechanisms.sparse_memory``) add what their loop keeps around it.

    ``batch_heads`` = B·Hkv, ``rows`` = M = G·Tq stacked query rows, ``keys`` = n; in the
    accumulation dtype (a bytes: 4, 8 for float64) ta = e·M·D·a is a query tile, tk = e·n·D·a
    a key tile, S = e·M·n·a the score tile, r = e·M·a one value per row; ``cast``: the inputs'
    dtype is not the accumulation one (bfloat16, float16), so q, k, v, dO tiles are copied to
    float32 first. ``causal_tile``: the diagonal tile builds its own (M × n) bools;
    ``mask_bytes``: the bools of the segment's mask, whose negation is made once per pass.

    Forward: S with the float32 q and k (the scores' matmul), or with the negated mask, or with
    row max and sum, the float32 v and the output (ta), then the lse's log and sum (2·r).
    Backward: the float32 q, dO, k, v (2·ta + 2·tk) and S, then (with dV = tk and dP = S)
    either the float32 O and dO∘O (rowsum(dO∘O)) or dQ (ta) and dK (tk) beside the rowsum (r).

    ``keep``: with dropout, (the peak while ``TileMods.keep`` builds the factor Z, Z's own
    bytes), ``kernels.mods.dropout_keep_bytes``. Z is built beside S and the row max and sum
    in the forward (then held while the output is computed), beside S in the backward, where
    it stays to the end beside P and dP (P∘Z for dV is an S-sized temporary, freed before dP).
    """
    cast, ta, tk, sc, r, bools, neg = _tile_symbols(batch_heads, rows, keys, head_dim, itemsize, causal_tile,
                                                    mask_bytes)
    making, z = keep
    fwd = sc + max(cast * (ta + tk), neg, 2 * r + making, 2 * r + z + ta + max(cast * tk, 2 * r))
    operands = cast * (2 * ta + 2 * tk)
    bwd = operands + max(sc + neg, sc + making, 2 * sc + z + tk + max(cast * ta + ta, ta + r),
                         2 * sc + z + 2 * tk + ta + r)
    return bools + fwd, bools + bwd


def _tile_symbols(e: int, m: int, n: int, d: int, itemsize: int, causal_tile: bool,
                  mask_bytes: int) -> tuple[bool, int, int, int, int, int, int]:
    """The symbols of the plain tile kernels' closed forms: (cast, ta, tk, S, r, bools, neg) for
    e = B·Hkv, m rows, n keys, head dim d; ta a query tile, tk a key tile, S the score tile, r
    one value per row, all in the accumulation dtype (``cast``: half inputs); ``bools`` the
    causal tile's mask, ``neg`` the mask the scores are filled with."""
    a = 8 if itemsize == 8 else 4
    bools = m * n if causal_tile else 0
    return itemsize != a, e * m * d * a, e * n * d * a, e * m * n * a, e * m * a, bools, bools or mask_bytes


def softcap_tile_bytes(*, batch_heads: int, rows: int, keys: int, head_dim: int, itemsize: int,
                       causal_tile: bool = False, mask_bytes: int = 0) -> tuple[int, int]:
    """``torch_tile_bytes`` of ``softcap_forward`` / ``softcap_backward``, read off them line by
    line (same symbols: ta a query tile, tk a key tile, S the score tile, r one value per row,
    all in the accumulation dtype; ``cast`` for half inputs).

    Forward: the scaled query tile (ta; half: its float32 copy first, and the keys' tk) beside
    T = tanh(S); P = exp(cap·T - cap) overwrites T; the row sum (r) and its underflow flags (one
    byte a row), the output (ta; half: the float32 values, tk) and the clamped sum or the lse's
    two terms (2r). Backward: the float32 q, dO, k, v (half: 2·ta + 2·tk), the scaled query tile
    beside T, then G = 1 - T² (a second S), -lse (r) or the negated mask beside them while P
    overwrites T; dV (tk), the float32 O and dO∘O and their rowsum D (ta + ta + r); [dO, -D]
    (ta + r, with -D: r) and [V, 1] (tk + e·n·a); dP - D = a third S; then, P, G and the two
    widened tiles freed, dQ (ta) and dK (tk).
    """
    cast, ta, tk, sc, r, bools, neg = _tile_symbols(batch_heads, rows, keys, head_dim, itemsize, causal_tile,
                                                    mask_bytes)
    fwd = max(cast * 2 * ta, ta + cast * tk + sc, sc + neg,
              sc + r + batch_heads * rows + ta + max(cast * tk, 2 * r))
    operands = cast * (2 * ta + 2 * tk)
    col = batch_heads * keys * (8 if itemsize == 8 else 4)  # e·n·a: the widened V's extra column
    # (the widened tiles' stage, 2·S + tk + ta + 3r, and the dQ/dK stage after the frees, S + 2·tk + ta + r,
    # lie below the third S's)
    bwd = operands + max(ta + sc, 2 * sc + max(r, neg), 2 * sc + tk + cast * ta + ta + r,
                         3 * sc + 2 * tk + ta + 2 * r + col)
    return bools + max(bools, fwd), bools + max(bools, bwd)


def fused_bias_tile_bytes(*, batch_heads: int, kv_heads: int, rows: int, keys: int, head_dim: int,
                          itemsize: int, bias: tuple[int, int], masked: bool, row: bool) -> tuple[int, int]:
    """The memory of one call of ``fused_forward`` / ``fused_backward`` with a ``"bias"``
    score_mod (float32 / float64 inputs: the operator adds the bias in their dtype), beside its
    arguments, its outputs included, read off the code: (forward, backward) bytes.

    ``batch_heads`` = B·Hkv (e), ``rows`` = M = G·Tq, ``keys`` = n; t = e·M·D·a the output (or
    dQ) tile, tk = e·n·D·a a dK (or dV) tile, r = e·M·a one value per row; ``bias`` = (peak
    while the score_mod's ``additive_bias`` builds it, its (1, Hkv, M, n) result b);
    ``masked``: the segment's mask is a bool tensor (not the kernel's own causal tile), so the
    bias is copied with -inf where it disallows (2·b at the ``where``) and the forward's lse
    masked once more (r); ``row``: ALiBi's broadcast row of keys (``_row_bias_forward``): the
    forward builds only the row and the per-query shift (Hkv·(M + n)·a), then the bound on the
    scores (``_reach``: the rows' and keys' norms) and out + lse + the shifted lse (t + 2r); the
    backward builds b as ``row - shift``. Every backward bounds its scores the same way beside
    b (``_drop_negligible_``: the norms, then the reach and lse - reach, 2r) and ends with dQ,
    dK, dV (t + 2·tk).
    """
    e, m, n, a = batch_heads, rows, keys, itemsize
    t, tk, r = e * m * head_dim * a, e * n * head_dim * a, e * m * a
    building, b = bias
    reach = max(r + e * n * a + 2 * e * a, 2 * r)
    end = t + 2 * tk
    if row:
        small = kv_heads * (m + n) * a
        return small + max(reach, t + 2 * r), small + b + max(reach, end)
    fwd = max(building, 2 * b * masked, b + t + r + r * masked)
    bwd = max(building, 2 * b * masked, b + reach, b + end)
    return fwd, bwd


def fused_backward_acc(dout, q, k, v, out, lse, allowed, scale, tm=None, delta=None):
    """The fused backward with gradients in the accumulation dtype: half-precision segments
    run in float32, so no partial sum is rounded to bfloat16 before it is added."""
    assert delta is None, "the fused operator computes rowsum(dO ∘ O) itself: no dlse"
    assert tm is None or tm.mods.fast == "bias", "the fused operator takes only a bias score_mod"
    if q.dtype in (torch.bfloat16, torch.float16):
        q, k, v, dout, out = (t.float() for t in (q, k, v, dout, out))
    dq, dk, dv = fused_backward(dout, q, k, v, out, lse.to(q.dtype), allowed, scale, tm)
    return dq, dk, dv, ()


# --- softcap: score' = cap·tanh(s/cap), its derivative written out ---------------------------
# With t = tanh(s/cap): P = exp(cap·t - lse), and dS_raw = dS' · (1 - t²). The scale and 1/cap
# fold into the (Tq × D) query tile, so the (M × Tk) score tile sees one tanh and one fused
# multiply-add before its exp, and the backward records no autograd graph.
#
# The elementwise passes over the (M × Tk) tile (8 MiB at Hq = 8, 256 × 1024 in float32, more
# than this CPU's L2), not the products, are what softcap adds, so the kernel makes few:
# * the forward needs no row max: t ≤ 1, so cap·t − cap ≤ 0 and exp never overflows with the
#   fixed reference cap. Only where 2·cap exceeds SOFTCAP_SAFE (the widest span exp keeps in
#   normal numbers) can a row's terms underflow; a tile with a row whose sum falls below
#   SOFTCAP_TINY, that row allowed some key, runs again with the row max (``_softcap_forward_max``);
# * the backward's dP − D comes out of the product itself: [dO, −D]·[V, 1]ᵀ, a 65th column
#   (D = 64) that costs the product nothing measurable, where ``baddbmm`` with −D as its input
#   ran per batch and copied −D into the tile first; and 1 − t² is one ``addcmul`` beside T, so
#   dS' · (1 − t²) is two in-place products. aten's in-place ``tanh_backward`` took 1.3–1.7 ms
#   over the 8 MiB tile, an in-place product 0.5–0.8 ms, an exp 0.34 ms (session 9, Intel Xeon).
SOFTCAP_SAFE = {torch.float32: 80.0, torch.float64: 700.0}
# A row sum at or above these lost at most 0.1 ε of itself to underflow: each of up to 10**6
# terms (keys in one tile) below the smallest normal number is off by at most that number
# (1.2e-38, 2.2e-308), and 10**6 · 1.2e-38 / 1e-24 = 1.2e-8, 10**6 · 2.2e-308 / 1e-280 = 2.2e-22.
SOFTCAP_TINY = {torch.float32: 1e-24, torch.float64: 1e-280}


def _softcap_scores(q, k, allowed, scale, cap, acc):
    """t = tanh(scale·q·kᵀ / cap), -inf where ``allowed`` is False: (B, Hkv, M, Tk)."""
    t = torch.matmul(q.to(acc) * (scale / cap), k.to(acc).transpose(-1, -2)).tanh_()
    if allowed is not None:
        t.masked_fill_(~allowed, -math.inf)
    return t


def _softcap_forward_max(q, k, v, allowed, scale, cap, acc):
    """The forward with the row max as the exp's reference: any cap, any row."""
    t = _softcap_scores(q, k, allowed, scale, cap, acc)
    t_max = t.amax(-1, keepdim=True)
    t_max = torch.where(torch.isinf(t_max), torch.zeros_like(t_max), t_max)
    p = torch.add(t_max * -cap, t, alpha=cap).exp_()  # exp(cap·(t - t_max))
    row_sum = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
    lse = (t_max * cap + row_sum.log()).squeeze(-1)  # -inf where nothing was allowed
    return out, lse


def softcap_forward(q, k, v, allowed, scale, tm: TileMods):
    cap = tm.mods.score_mod.softcap
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
    t = _softcap_scores(q, k, allowed, scale, cap, acc)
    p = torch.add(t.new_full((), -cap), t, alpha=cap, out=t).exp_()  # exp(cap·t - cap), in place
    row_sum = p.sum(-1, keepdim=True)
    if 2 * cap > SOFTCAP_SAFE[acc]:  # terms may have underflowed: rows whose sum is too small run again
        low = row_sum < SOFTCAP_TINY[acc]
        # (a row with no key allowed sums to exactly 0 and is exact as it is)
        if bool(low.any()) and (allowed is None or bool((low & allowed.any(-1, keepdim=True)).any())):
            del t, p
            return _softcap_forward_max(q, k, v, allowed, scale, cap, acc)
    out = torch.matmul(p, v.to(acc)).div_(row_sum.clamp_min(torch.finfo(acc).tiny))
    lse = (row_sum.log() + cap).squeeze(-1)  # -inf where nothing was allowed
    return out, lse


def softcap_backward(dout, q, k, v, out, lse, allowed, scale, tm: TileMods, delta=None):
    cap = tm.mods.score_mod.softcap
    allowed = _causal_bool(q, k) if allowed is CAUSAL_TILE else allowed
    acc = acc_dtype(q.dtype)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    t = torch.matmul(qa * (scale / cap), ka.transpose(-1, -2)).tanh_()  # (B, Hkv, M, Tk)
    g = torch.addcmul(t.new_ones(()), t, t, value=-1)  # 1 - t², the tanh's derivative
    p = torch.add(lse.unsqueeze(-1).neg(), t, alpha=cap, out=t)  # cap·t - lse, over t
    if allowed is not None:
        p.masked_fill_(~allowed, -math.inf)
    p.exp_()
    dv = torch.matmul(p.transpose(-1, -2), da)
    delta = (da * out.to(acc)).sum(-1, keepdim=True) if delta is None else delta.to(acc).unsqueeze(-1)
    # dP - D = [dO, -D]·[V, 1]ᵀ: one product with a 65th column, no pass over the tile
    d_aug = torch.cat([da, delta.neg()], -1)  # (B, Hkv, M, D + 1)
    v_aug = torch.cat([va, va.new_ones(()).expand(*va.shape[:-1], 1)], -1)  # (B, Hkv, Tk, D + 1)
    ds = torch.matmul(d_aug, v_aug.transpose(-1, -2)).mul_(p).mul_(g)  # dS_raw = P ∘ (dP - D) ∘ (1 - t²)
    del p, g, d_aug, v_aug
    dq = torch.matmul(ds, ka).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), qa).mul_(scale)
    return dq, dk, dv, ()


TILE_KERNELS = {"fused": (fused_forward, fused_backward_acc), "torch": (torch_forward, torch_backward),
                "softcap": (softcap_forward, softcap_backward)}
