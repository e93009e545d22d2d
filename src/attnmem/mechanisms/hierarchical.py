"""Hierarchical attention (Zhu & Soricut 2021, H-Transformer-1D): near keys exact, far keys coarse.

The sequence is padded to ``Nr · 2^L`` (Nr = ``block``, ``L = ceil(log2(N / Nr))``). The score
matrix is split like an H-matrix::

    level 0 (fine)     each block of Nr queries attends exactly to its own block and to its
                       sibling (blocks 2j and 2j+1 see each other)
    level l = 1..L-1   queries and keys are averaged over runs of 2^l tokens (values averaged,
                       each coarse key weighted by how many real keys it stands for); the
                       sibling coarse blocks of Nr coarse tokens see each other

Every (query, key) pair is covered exactly once: pairs in neighbouring blocks at full
resolution, pairs further apart by one coarse score that stands for a 2^l × 2^l patch. The
levels are combined by one softmax normalisation over all of them::

    out_i = Σ_l Σ_J exp(q̃_I·k̃_J·scale) · c_J · ṽ_J  /  Σ_l Σ_J exp(q̃_I·k̃_J·scale) · c_J

(I, J: the coarse query and key at level l; c_J: real keys in J). Each query sees about
``Nr · (L + 2)`` coarse keys, so work and memory are O(N · Nr · log(N / Nr)) scores spread over
levels whose size halves: O(N) memory for a fixed block size. The causal variant keeps the
triangle inside each diagonal block and lets only block 2j+1 see block 2j at every level.
With ``N <= block`` there is only the diagonal block: exact attention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import acc_dtype
from ..memory.model import Footprint, Shape, outside
from ..registry import Capabilities, Inputs, Method, Style, register


def _coarsen(x: Tensor, count: Tensor, padded: bool) -> tuple[Tensor, Tensor]:
    """Average neighbouring pairs of real tokens. x (..., n, D), count (n,) -> (..., n/2, D), (n/2,)."""
    n = x.shape[-2]
    total = count.view(n // 2, 2).sum(-1)
    if not padded:
        return x.unflatten(-2, (n // 2, 2)).mean(-2), total
    summed = (x * count[:, None]).unflatten(-2, (n // 2, 2)).sum(-2)  # (..., n/2, D)
    return summed / total.clamp_min(1)[:, None], total


def _log_count(count: Tensor) -> Tensor:
    return torch.where(count > 0, count.log(), -math.inf)  # -inf rules padding out


def _sibling_scores(q: Tensor, k: Tensor, log_count: Tensor, nr: int, causal: bool, scale: float) -> Tensor:
    """Scores of each block against its sibling (2j <-> 2j+1), from views (no copy of q, k).

    q (..., n, D), k (..., n, D) -> (..., n / Nr, Nr, Nr); causal: the earlier block sees nothing.
    """
    pairs = q.shape[-2] // (2 * nr)
    qp, kp = q.unflatten(-2, (pairs, 2, nr)), k.unflatten(-2, (pairs, 2, nr))  # (..., pairs, 2, Nr, D)
    lc = log_count.view(pairs, 2, 1, nr)
    s_odd = torch.matmul(qp[..., 1, :, :], kp[..., 0, :, :].transpose(-1, -2)) * scale + lc[:, 0]
    if causal:
        s_even = torch.full_like(s_odd, -math.inf)
    else:
        s_even = torch.matmul(qp[..., 0, :, :], kp[..., 1, :, :].transpose(-1, -2)) * scale + lc[:, 1]
    return torch.stack([s_even, s_odd], -3).flatten(-4, -3)  # (..., nb, Nr, Nr)


def _sibling_values(p: Tensor, v: Tensor, nr: int) -> Tensor:
    """p (..., nb, Nr, Nr) against the sibling block's values of v (..., n, D) -> (..., n, D)."""
    pairs = v.shape[-2] // (2 * nr)
    pp, vp = p.unflatten(-3, (pairs, 2)), v.unflatten(-2, (pairs, 2, nr))
    num = torch.stack([torch.matmul(pp[..., 0, :, :], vp[..., 1, :, :]),
                       torch.matmul(pp[..., 1, :, :], vp[..., 0, :, :])], -3)  # (..., pairs, 2, Nr, D)
    return num.flatten(-4, -2)


def _row_max(*scores: Tensor) -> Tensor:
    """Detached row max over several score blocks; 0 for rows with nothing allowed. The combined
    output does not depend on it, so its gradient would be zero anyway."""
    m = torch.stack([s.detach().amax(-1) for s in scores]).amax(0)
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def hierarchical_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 32, causal: bool = False,
                           scale: float | None = None) -> Tensor:
    """H-Transformer-1D attention.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D), ``Hq % Hkv == 0`` (self-attention: one N).
        block: Nr, the block size; a power of two.
        causal: the causal variant.
        scale: multiplier of QKᵀ; default ``1/sqrt(D)``.

    Returns:
        (B, Hq, N, D).
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if N == 0:
        return q.new_zeros(q.shape)
    acc = acc_dtype(q.dtype)
    nr = min(block, N)
    levels = max(0, math.ceil(math.log2(N / nr)))
    n_pad = nr * 2**levels
    pad = n_pad - N
    qs = q.to(acc).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D): query heads sharing a KV head
    ks, vs = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)  # (B, Hkv, 1, N, D)
    if pad:
        qs, ks, vs = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qs, ks, vs))
    count = (torch.arange(n_pad, device=q.device) < N).to(acc)  # real tokens (n_pad,)
    log_count = _log_count(count)
    nb = n_pad // nr

    # Level 0: each query block against its own block and its sibling, at full resolution,
    # under one row max so that both share one numerator.
    qb = qs.unflatten(-2, (nb, nr))  # (B, Hkv, G, nb, Nr, D)
    kb, vb = ks.unflatten(-2, (nb, nr)), vs.unflatten(-2, (nb, nr))
    own_bias = log_count.view(nb, 1, nr)
    if causal:
        tri = torch.ones(nr, nr, dtype=torch.bool, device=q.device).tril()
        own_bias = own_bias.masked_fill(~tri, -math.inf)  # (nb, Nr, Nr)
    s_own = torch.matmul(qb, kb.transpose(-1, -2)) * scale + own_bias  # (B, Hkv, G, nb, Nr, Nr)
    if nb > 1:
        s_sib = _sibling_scores(qs, ks, log_count, nr, causal, scale)
        row_max = _row_max(s_own, s_sib)  # (B, Hkv, G, nb, Nr)
        p_own, p_sib = torch.exp(s_own - row_max[..., None]), torch.exp(s_sib - row_max[..., None])
        num = torch.matmul(p_own, vb).flatten(-3, -2) + _sibling_values(p_sib, vs, nr)  # (..., n_pad, D)
        den = p_own.sum(-1) + p_sib.sum(-1)
    else:
        row_max = _row_max(s_own)
        p_own = torch.exp(s_own - row_max[..., None])
        num, den = torch.matmul(p_own, vb).flatten(-3, -2), p_own.sum(-1)
    terms = [(0, num, row_max.flatten(-2), den.flatten(-2))]  # (..., n, D), (..., n), (..., n)

    # Levels 1..L-1: coarse sibling blocks (level l has n_pad / 2^l tokens, Nr per block).
    qc, kc, vc, cc = qs, ks, vs, count
    for lvl in range(1, levels):
        qc, _ = _coarsen(qc, cc, pad > 0)
        kc, _ = _coarsen(kc, cc, pad > 0)
        vc, cc = _coarsen(vc, cc, pad > 0)
        s_sib = _sibling_scores(qc, kc, _log_count(cc), nr, causal, scale)  # (..., nb_l, Nr, Nr)
        row_max = _row_max(s_sib)
        p_sib = torch.exp(s_sib - row_max[..., None])
        terms.append((lvl, _sibling_values(p_sib, vc, nr), row_max.flatten(-2), p_sib.sum(-1).flatten(-2)))

    # One normalisation over all levels: weights exp(m_l - LSE) at full resolution.
    lse_parts = []
    for lvl, _, row_max, den in terms:
        # clamp_min keeps log's gradient finite where den = 0; where() discards that branch.
        log_den = den.clamp_min(torch.finfo(den.dtype).tiny).log()
        lse_l = torch.where(den > 0, row_max + log_den, -math.inf)  # (B, Hkv, G, n_l)
        lse_parts.append(lse_l.repeat_interleave(2**lvl, dim=-1))
    lse = torch.logsumexp(torch.stack(lse_parts), 0)  # (B, Hkv, G, n_pad)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = None
    for (lvl, num, row_max, den), _ in zip(terms, lse_parts):
        n_l = num.shape[-2]
        w = torch.exp(row_max.repeat_interleave(2**lvl, dim=-1) - lse)  # (B, Hkv, G, n_pad)
        w = torch.where(den.repeat_interleave(2**lvl, dim=-1) > 0, w, torch.zeros_like(w))
        term = (w.view(*w.shape[:-1], n_l, 2**lvl, 1) * num.unsqueeze(-2)).flatten(-3, -2)  # (..., n_pad, D)
        out = term if out is None else out + term
    out = out[..., :N, :].reshape(B, Hq, N, D)  # (B, Hq, N, D)
    return out.to(q.dtype)


def _run_means(x: Tensor, level: int) -> Tensor:
    """Each token replaced by the mean of its run of 2^level tokens (a short last run: its mean)."""
    out, r = torch.empty_like(x), 2**level
    for a in range(0, x.shape[-2], r):
        out[..., a:a + r, :] = x[..., a:a + r, :].mean(-2, keepdim=True)
    return out


def hierarchical_definition(q: Tensor, k: Tensor, v: Tensor, *, block: int, causal: bool, scale: float) -> Tensor:
    """The H-matrix on the full N×N matrix: pair (i, j) is scored at the finest level l where
    their blocks of block·2^l tokens are siblings (level 0 also covers i, j in one block), with
    queries and keys averaged over runs of 2^l; then one softmax over each row."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, N, D)
    n = q.shape[-2]
    i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    bi, bj = i // block, j // block
    level = torch.full((n, n), -1, device=q.device)
    level[(bi == bj) | ((bi ^ 1) == bj)] = 0
    for lvl in range(1, max(n, 2).bit_length() + 1):
        level[(level < 0) & (((bi >> lvl) ^ 1) == (bj >> lvl))] = lvl
    s = torch.zeros(q.shape[:-1] + (n,), dtype=q.dtype, device=q.device)  # (B, Hq, N, N)
    for lvl in range(int(level.max()) + 1 if n else 0):
        s = torch.where(level == lvl, _run_means(q, lvl) @ _run_means(k, lvl).transpose(-1, -2) * scale, s)
    if causal:
        s = s.masked_fill(j > i, -math.inf)
    return torch.softmax(s, -1) @ v


@dataclass(frozen=True)
class HierarchicalOptions:
    """block: Nr, the block size of the finest level (a power of two, default 32)."""

    block: int = 32

    def __post_init__(self):
        b = self.block
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b & (b - 1):
            raise ValueError(f"block must be a positive power of two, got {b!r}")


@register
class Hierarchical(Method):
    name = "hierarchical"
    style = Style("#e377c2", "h")
    family = "hierarchical"
    exact = False
    memory = "O(B·H·N·(D + Nr·log(N/Nr))) over halving levels: O(N) for a fixed block Nr"
    summary = "H-Transformer-1D: exact near-diagonal blocks, coarsened far blocks at log2(N/Nr) levels"
    Options = HierarchicalOptions
    caps = Capabilities(mask=False)

    def extra_reasons(self, inp: Inputs, opts):
        if inp.nq != inp.nk:
            return [f"is self-attention only (Nq={inp.nq} != Nk={inp.nk})"]
        return []

    check_options = {"block": 4}

    def forward(self, inp: Inputs, opts: HierarchicalOptions) -> Tensor:
        return hierarchical_attention(inp.q, inp.k, inp.v, block=opts.block, causal=inp.causal, scale=inp.scale)

    def definition(self, inp: Inputs, opts: HierarchicalOptions) -> Tensor:
        return hierarchical_definition(inp.q, inp.k, inp.v, block=opts.block, causal=inp.causal, scale=inp.scale)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return outside(hierarchical_footprint(s, opts))

    def memory_model(self, s: Shape, opts) -> Footprint:
        return hierarchical_footprint(s, opts)


# --- memory model -----------------------------------------------------------------------------
# Each closed form returns the bytes of one call beyond its inputs (forward, +
# ``out.sum().backward()`` when ``s.training``) or, outside its domain, the reason (a str); the
# terms are read off the code above and checked against the fake-tensor trace
# (tests/test_estimate*.py). Notation: B batch, H = Hq query heads, Hkv key/value heads, N
# sequence length, D head dim, s bytes per element; Q = B·H·N·D·s, KV = B·Hkv·N·D·s.


# Below this many levels (N ≤ 8·block) the peak falls on moments the closed form does not model
# (up to 90 % off at one block); such calls are small and their traces short: they are traced.
_HIER_MIN_LEVELS = 4


def hierarchical_footprint(s: Shape, opts) -> Footprint | str:
    """Nr = min(block, N), L = ⌈log₂(N/Nr)⌉ levels over the padded length P = Nr·2^L;
    at full resolution Qp = B·H·P·D·s (one padded query-sized tensor), KVp = B·Hkv·P·D·s,
    SC = B·H·P·Nr·s (one level-0 score set), R = B·H·P·s (one vector of P rows); level l
    holds P/2^l tokens, so its tensors are 2^−l of level 0's and γ = Σ_{l=1}^{L−1} 2^−l.

    Training: saved = O (Qp: the unpadded output is a view of it) + level 0 (p_own, p_sib: 2·SC; its numerator: Qp)
    + γ·(coarse q, k, v, the numerator: 4·Qp; p_sib: SC) + (3L + 5)·R (per-level
    log-sum-exps expanded to P rows, their stack and the weights exp(m_l − LSE)); with
    G = Hq/Hkv > 1 the broadcast matmuls keep K and V expanded to the H heads instead of
    views: + 4·Qp at level 0 (own block and sibling halves of K and V; 3.5·Qp causal, where
    only one sibling half of K is used) and −γ·Qp/2 causal at the coarse levels; with
    padding (P > N) + the padded copies of q, k, v (Qp + 2·KVp, or Qp with G > 1).
    Transient: the larger of (a) the level-0 backward, where besides the output (and, held
    by the level-0 matmuls, the expanded K, V and the padded copies) 8.5·Qp of gradients are
    in flight (dQ of the own block and of both sibling halves as full-size select_backward
    buffers — one half fewer, 7.5·Qp, causal — the coarse level's dQ, dK, the running dV,
    dK) and one score gradient (SC); (b) the final accumulation of the output (saved + 2·Qp
    + level 0's raw scores SC, still a local), or with padding the start of the backward
    (saved + 3·Qp).
    Forward only: both level-0 score sets (2·SC), every level's numerator ((1 + γ)·Qp), the
    running sum of the output with the current term (3·Qp), (2L + 5)·R, the last level's
    coarse q, k, v and two score sets (2^−(L−1) of level 0's), the causal block bias (P·Nr·s),
    + the padded copies.
    O(N·(D + Nr) + N·L) memory. None (traced) below 4 levels (N ≤ 8·Nr); within 5 % of the
    trace from 5 levels on, up to 5.5 % at 4 levels (checked for Nr = 16, 32, 64)."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    nr = min(opts.block, n)
    levels = max(0, math.ceil(math.log2(n / nr)))
    if levels < _HIER_MIN_LEVELS:
        return f"below {_HIER_MIN_LEVELS} levels (N <= 8·block) the peak is not modelled (traced)"
    p = nr * 2**levels
    if s.half:
        return _half_footprint(s, opts, padded=p > n)
    qp, kvp, sc, r = b * h * p * d * e, b * hkv * p * d * e, b * h * p * nr * e, b * h * p * e
    gamma = 1 - 2.0 ** -(levels - 1) if levels > 1 else 0.0
    padded = p > n
    gqa = h != hkv
    if not s.training:
        pads = qp + 2 * kvp if padded else 0
        # The last level's coarse q, k, v and scores are still locals; so is the causal bias.
        last = (qp + 2 * kvp + 2 * sc) * 2.0 ** -(levels - 1) if levels > 1 else 0.0
        bias = p * nr * e if s.causal else 0
        return Footprint(0, int(2 * sc + (1 + gamma) * qp + 3 * qp + (2 * levels + 5) * r + last) + bias + pads)
    level0 = 2 * sc + qp
    coarse = gamma * (4 * qp + sc)
    extra = 0.0
    if gqa:
        extra = (3.5 if s.causal else 4) * qp - (gamma * qp / 2 if s.causal else 0)
    if padded:
        extra += qp + (0 if gqa else 2 * kvp)
    saved = int(qp + level0 + coarse + (3 * levels + 5) * r + extra)
    # Level 0's p and numerator are freed by then; the expanded K, V (G > 1) and the padded
    # copies are still held by the level-0 matmuls.
    held = ((3.5 if s.causal else 4) * qp if gqa else 0) + ((qp + (0 if gqa else 2 * kvp)) if padded else 0)
    # Causal: the earlier sibling half of q gets no gradient (its scores are constant -inf).
    level0_backward = qp + held + (7.5 if s.causal else 8.5) * qp + sc
    # The last level's term being added to the running output (forward), or the first
    # gradients of the output (backward: dout·w, dout·num and, padded, the unsliced dout).
    # In the forward, the function's locals (level 0's raw scores among them) are alive too.
    accumulate = saved + max(2 * qp + sc, 3 * qp if padded else 0)
    return Footprint(saved, int(max(level0_backward, accumulate)) - saved)


def _half_footprint(s: Shape, opts, padded: bool) -> Footprint:
    """Half precision: ``hierarchical_attention`` casts q, k, v to float32 first and runs every
    level in float32, so its memory is the float32 call's (the form above at 4 bytes) plus those
    float32 copies (Q32 + 2·KV32, held by autograd); padded, the padding takes the copies' place
    (the float32 form already counts the padded copies). The output is cast back, so the saved
    output is the input dtype's (Q32 − Q fewer bytes). Checked against the trace in bfloat16
    and float16 (tests/memory/test_estimate_dtypes.py)."""
    s32 = dataclasses.replace(s, itemsize=4, dtype="float32")
    full = hierarchical_footprint(s32, opts)
    assert isinstance(full, Footprint)  # the same levels as this call
    copies = 0 if padded else s32.q_bytes + 2 * s32.kv_bytes
    saved = full.saved + copies - (s32.q_bytes - s.q_bytes) if s.training else 0
    return Footprint(saved, full.saved + full.transient + copies - saved)
