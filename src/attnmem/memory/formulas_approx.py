"""Closed-form memory of the approximate methods: ``linear``, ``performer``, ``nystrom``,
``hierarchical`` (``linformer`` and ``recurrent_memory``: formulas_memory.py; ``knn_memory`` is traced).

Each ``@formula`` returns ``(saved, transient)`` bytes (inputs excluded) for one call,
forward + ``out.sum().backward()`` when ``shape.training``. The terms are read off the code
of each method (which buffers exist, and when) and checked against the fake-tensor trace
(tests/test_estimate.py); they follow the options (features, chunk, landmarks, segment, ...),
never fitted constants. Small terms (a few vectors of N floats, scalar losses) are left out
where a docstring says so.

Notation: B batch, H = Hq query heads, Hkv key/value heads, N sequence length, D head dim,
s bytes per element; Q = B·H·N·D·s (one query-sized tensor), KV = B·Hkv·N·D·s.
"""

from __future__ import annotations

import math

from .estimate import Shape, _lse_bytes, formula

# One Python-level operator call per this many (forward + backward) operators of one chunk or
# segment: rough counts of a trace's operator calls (``trace_work``), enough to decide between
# tracing and the closed form.
_KERNEL_OPS_PER_CHUNK = 60


def _grads(s: Shape) -> int:
    """dQ + dK + dV."""
    return s.q_bytes + 2 * s.kv_bytes


# --- linear, performer -----------------------------------------------------------------------


def _kernel(s: Shape, feats: int, chunk: int, favor: bool) -> tuple[int, int]:
    """Memory of ``kernel_attention`` (mechanisms/linear.py) with F = ``feats`` features per
    row and chunks of C = min(chunk, N) rows; nc = ⌈N/C⌉ chunks. ``favor``: FAVOR+ features
    (performer), whose map exp(Wx − |x|²/2 − c) holds more (C, F) buffers than elu + 1 and
    whose projection W (F×D) is kept for the backward."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    f = 1 if favor else 0
    c = min(chunk, n)
    nc = math.ceil(n / c)
    out, den = s.q_bytes, b * h * n * e
    state = b * hkv * (feats * d + feats) * e  # S (F×D) and z (F) per key/value head
    cf, cd = b * h * c * feats * e, b * h * c * d * e  # one chunk of φ(Q); of output rows
    kf, kd = b * hkv * c * feats * e, b * hkv * c * d * e  # one chunk of φ(K); of key rows
    cc = b * h * c * c * e  # the C×C products of one causal chunk
    row = b * h * c * e  # a chunk's denominators
    proj = f * (feats * d * e + b * hkv * e)  # W·scale^½ and the key shift, held by the features
    if not s.training:
        if not s.causal:
            return 0, out + den + state + (3 + (f if nc > 1 else 0)) * cf + cd + row + proj
        # The states list grows chunk by chunk: full chunks' states are alive at the last one.
        work = 2 * cc + 2 * cf + cd + c * c + row + (c * c if h != hkv else 0)
        return 0, out + den + (n // c) * state + work + proj
    saved = out + den + (nc * state if s.causal else state) + proj
    if not s.causal:
        # The query pass holds 7 chunk buffers (elu) or 10 and a clamp mask (FAVOR+); the final
        # key pass 9 (over B·Hkv rows).
        q_pass = (4 + 3 * f) * cf + 3 * cd + f * cf // e
        k_pass = 5 * kf + 4 * kd
        return saved, _grads(s) + 2 * state + max(q_pass, k_pass) + 2 * row
    # Causal backward: dV is written inside enable_grad, so its autograd history keeps, for
    # every chunk, φ(Q_c), φ(K_c) (expanded to the H query heads under GQA), dNum_c, the C×C
    # causal mask and the running state R.
    fk_kept = cf if h != hkv else kf
    kept = cf + fk_kept + cd + c * c + b * hkv * feats * d * e
    if nc == 1:  # one chunk: no running state R, nothing kept beyond the chunk itself
        # Either at the scores (3 C×C buffers) or inside the feature map's backward.
        work = c * c + max(3 * cc + (3 + 2 * f) * cf + cd, 2 * cc + (6 + 2 * f) * cf + 2 * cd + f * cf // e)
    else:  # the last chunk of the reverse walk, with R
        work = 4 * cc + (4 + 2 * f) * cf + (2 if h != hkv else 4) * cd + c * c + 2 * row
    return saved, _grads(s) + int((n - c) / c * kept) + work + b * hkv * feats * d * e


def _kernel_work(s: Shape, chunk: int) -> int:
    return _KERNEL_OPS_PER_CHUNK * math.ceil(s.seq_len / min(chunk, s.seq_len)) * (2 if s.causal else 1)


@formula("linear", trace_work=lambda s, o: _kernel_work(s, o.chunk))
def _linear(s: Shape, opts) -> tuple[int, int]:
    """φ = elu + 1 (F = D features), C = min(chunk, N), nc = ⌈N/C⌉; a chunk buffer is B·H·C·D
    elements, a state S, z is B·Hkv·(F·D + F). Training: saved = O + den (B·H·N) + one state
    (nc states, causal). Non-causal transient = dQ + dK + dV + 2 states + max(7 chunk buffers
    of the query pass, 9 of the key pass over B·Hkv rows). Causal transient = dQ + dK + dV +
    (N − C)/C · (φ(Q_c), φ(K_c), dNum_c, the C×C mask, R) — kept alive by dV's autograd history,
    which dV gets from being written under enable_grad — + 4 C×C score buffers + 8 chunk
    buffers. Forward only: O + den + the states so far + 2 C×C buffers + 3 chunk buffers
    (causal), or + 4 chunk buffers. Linear in N for a fixed chunk."""
    return _kernel(s, s.head_dim, opts.chunk, False)


@formula("performer", trace_work=lambda s, o: _kernel_work(s, o.chunk))
def _performer(s: Shape, opts) -> tuple[int, int]:
    """As ``linear`` with F = m = ``features`` random features, C = min(chunk, N), plus the
    projection W·scale^½ (m×D, saved) and FAVOR+'s extra (C, m) buffers (exp, its shifted
    logits; 2 more per chunk in the causal backward, 3 and a clamp mask in the non-causal
    query pass). Written from the code before the perf branch's backward changes: re-check."""
    return _kernel(s, opts.features, opts.chunk, True)


# --- nystrom ---------------------------------------------------------------------------------

# A trace of nystrom makes about 1,800 operator calls (forward + backward, 6 iterations), nearly
# all in the Newton–Schulz steps and independent of N: it stays cheap, so "auto" traces it.
_NYSTROM_OPS_PER_ITERATION = 300


@formula("nystrom", trace_work=lambda s, o: _NYSTROM_OPS_PER_ITERATION * o.pinv_iterations)
def _nystrom(s: Shape, opts) -> tuple[int, int] | None:
    """m = min(landmarks, N) landmarks, it = pinv_iterations; MM = B·H·m²·s (one landmark
    kernel), MD = B·H·m·D·s (one landmark row block), L(n) = one log-sum-exp per row of n.
    Both N×m factors run as exact fused attention (saving output + lse), so nothing is N×m.

    Training: saved = O + L(N) + (6·it + 2)·MM (the kernel, Z₀, and per Newton–Schulz step
    AZ, 7I − AZ, 15I − AZ(…), 13I − AZ(…), Z/4 and the new Z) + 4·MD (Q̃, K̃ repeated to the
    H heads, attention(Q̃, K, V) and W) + L(m). Transient = MD + the larger of two backward
    moments: attention(Q̃, K, V)'s backward (dQ of the final factor + its dK, dV + the copy
    AccumulateGrad makes of one: Q + 3·KV), and the segment means' backward at the end
    (O + dQ + the broadcast dQ̃ and its sum: 3·Q, + dK + dV, minus what was saved).
    Forward only: the larger of the pseudo-inverse's first step (Q̃, K̃ (Hkv heads), K̃
    repeated, 7 MM buffers, 3 m×m identities) and the final factor (O + L(N) + 4·MD + the
    kernel). Not for conv_kernel > 0 (module form: traced). Linear in N."""
    if opts.conv_kernel:
        return None
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    m = min(opts.landmarks, n)
    mm, md, md_kv = b * h * m * m * e, b * h * m * d * e, b * hkv * m * d * e
    lse_n = _lse_bytes(s)
    lse_m = lse_n * m // n
    if not s.training:
        pinv = 2 * md + md_kv + 7 * mm + 3 * m * m * e
        final = s.q_bytes + lse_n + 3 * md + md_kv + mm
        return 0, max(pinv, final)
    saved = s.q_bytes + lse_n + (6 * opts.pinv_iterations + 2) * mm + 4 * md + lse_m
    p1 = s.q_bytes + 3 * s.kv_bytes
    p2 = 4 * s.q_bytes + 2 * s.kv_bytes - saved
    return saved, md + max(p1, p2)


# --- hierarchical ----------------------------------------------------------------------------

# Below this many levels (N ≤ 8·block) the peak falls on moments the closed form does not model
# (up to 90 % off at one block); such calls are small and their traces short: they are traced.
_HIER_MIN_LEVELS = 4
# Operator calls per level in a trace (forward + backward; about 4,300 for 7 levels).
_HIER_OPS_PER_LEVEL = 600


def _hierarchical_work(s: Shape, opts) -> int:
    levels = max(0, math.ceil(math.log2(s.seq_len / min(opts.block, s.seq_len))))
    return _HIER_OPS_PER_LEVEL * (levels + 1) * (1 if s.training else 0.3)


@formula("hierarchical", trace_work=_hierarchical_work)
def _hierarchical(s: Shape, opts) -> tuple[int, int]:
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
        return None
    p = nr * 2**levels
    qp, kvp, sc, r = b * h * p * d * e, b * hkv * p * d * e, b * h * p * nr * e, b * h * p * e
    gamma = 1 - 2.0 ** -(levels - 1) if levels > 1 else 0.0
    padded = p > n
    gqa = h != hkv
    if not s.training:
        pads = qp + 2 * kvp if padded else 0
        # The last level's coarse q, k, v and scores are still locals; so is the causal bias.
        last = (qp + 2 * kvp + 2 * sc) * 2.0 ** -(levels - 1) if levels > 1 else 0.0
        bias = p * nr * e if s.causal else 0
        return 0, int(2 * sc + (1 + gamma) * qp + 3 * qp + (2 * levels + 5) * r + last) + bias + pads
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
    return saved, int(max(level0_backward, accumulate)) - saved
