"""Closed-form memory of the approximate methods: ``linear``, ``performer``, ``nystrom``,
``hierarchical`` (``linformer``, ``recurrent_memory`` and ``knn_memory``: formulas_memory.py).

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
    """Memory of ``kernel_attention`` (mechanisms/linear.py): F = ``feats`` features, causal
    chunks of C = min(chunk, N) rows, non-causal blocks of Cb = min(block_rows(N, D, F, chunk), N)
    rows. ``favor``: FAVOR+ features (performer), which keep W·scale^½ and [W', 1] (F×D, F×(D+1)),
    the key shift and one stabiliser per query row, and whose key_grad makes [dφ·W', Σ dφ]
    (rows × (D+1)) and a new rows × D result instead of working in place."""
    from ..mechanisms.linear import block_rows

    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    f = 1 if favor else 0
    rows = min(chunk, n) if s.causal else min(block_rows(n, d, feats, chunk), n)
    spans = math.ceil(n / rows)

    def qrow(w, r=rows):  # r rows of width w over the H query heads
        return b * h * r * w * e

    def krow(w, r=rows):  # the same over the Hkv key/value heads
        return b * hkv * r * w * e

    state = b * hkv * feats * (d + 1) * e  # S = φ(K)ᵀ[V, 1]
    den = b * h * n * e
    proj = f * ((2 * d + 1) * feats * e + b * hkv * e)  # W', [W', 1], the key shift
    shifts = f * den  # one query stabiliser per row (FAVOR+)
    cc = b * h * rows * rows * e + rows * rows  # one C×C score block and its bool causal mask
    if not s.training:
        drawn = f * feats * d * 8  # the float64 draw of W, a local of Performer.forward
        if s.causal:
            # The last full chunk: every state so far, the previous chunk's [num, den], its own
            # [num, den] through the state, the scores, and their product with [V, 1] being added.
            full = n // rows
            work = full * state + 4 * qrow(d + 1) + qrow(feats) + krow(feats) + krow(d + 1) + cc
        else:
            # The larger of a key block of the state's pass (φ(K), [V, 1], its term and the sum
            # so far) and a query block (the previous block's [num, den] if any, its own, φ(Q)).
            keys = 2 * state + krow(feats) + krow(d + 1)
            queries = state + (2 if spans > 1 else 1) * qrow(d + 1) + qrow(feats) + f * 2 * qrow(1) + shifts
            work = max(keys, queries)
            return 0, s.q_bytes + den + work + proj + drawn
        return 0, s.q_bytes + den + work + proj + shifts + drawn
    saved = s.q_bytes + den + (spans if s.causal else 1) * state + proj + shifts
    # Each walk of the reverse pass leaves 1/⌈rows⌉ of dNum = [dout/den, −Σ dout·out/den] and of
    # 1/den alive (the first block's, full size) and R with the last term added to it.
    walk = _grads(s) + (2 if spans > 1 else 1) * state + qrow(1) + qrow(d + 1)
    if s.causal:
        # At chunk 0 (the last of the walk): dφ(Q) + dScores·φ(K) being formed beside φ(Q), the old
        # dφ(Q) and φ(K) expanded to the H heads (GQA) or the sum (no GQA): 4 (C, F) over H heads;
        # φ(K), [V, 1], dV of its own keys, dScores, the mask; dK, dV of chunk 1 (still bound).
        prev = krow(2 * d, min(rows, n - rows)) if spans > 1 else 0
        return saved, walk + 4 * qrow(feats) + krow(feats) + krow(d + 1) + krow(d) + cc + prev
    # The key pass (after the query pass): φ(K), dV, [V, 1] and dφ(K) = [V, 1]·Rᵀ (elu + 1: then
    # in place); FAVOR+: φ(K), dφ(K)⊙φ(K), [dφ·W', Σ dφ] and the new dK.
    key = krow(2 * feats) + krow(d) + krow(d + 1) + f * krow(d)
    # The query pass: φ(Q) and dφ(Q) over the H heads, then FAVOR+'s dQ = (dφ⊙φ)·W' or, with
    # G = H/Hkv > 1, φ(Q)ᵀdNum over the H heads before its sum over the G heads.
    query = 2 * qrow(feats) + max(f * qrow(d), (h // hkv) * state if h != hkv else 0)
    return saved, walk + max(key, query)


def _kernel_work(s: Shape, chunk: int) -> int:
    return _KERNEL_OPS_PER_CHUNK * math.ceil(s.seq_len / min(chunk, s.seq_len)) * (2 if s.causal else 1)


@formula("linear", trace_work=lambda s, o: _kernel_work(s, o.chunk))
def _linear(s: Shape, opts) -> tuple[int, int]:
    """φ = elu + 1 (F = D features); rows per step R = C = min(chunk, N) causal, or
    Cb = min(block_rows(N, D, F, chunk), N) non-causal; nc = ⌈N/R⌉; S = B·Hkv·F·(D+1)·s (one
    state); "q-rows(w)" / "k-rows(w)" = B·H·R·w·s / B·Hkv·R·w·s.
    Training: saved = O + den (B·H·N·s) + nc states (causal) or one (non-causal). Transient =
    dQ + dK + dV + R and the last term of R (one S if nc = 1) + 1/den and dNum (q-rows(1), q-rows(D+1))
    + causal, at chunk 0's dφ(Q) += dScores·φ(K): 4 q-rows(F) + k-rows(F) (φ(K)) + k-rows(D+1)
    ([V, 1]) + k-rows(D) (dV) + B·H·C²·s (dScores) + C² bytes (mask) + chunk 1's dK, dV
    (2 k-rows(D)); non-causal, the larger of a key block (φ(K), dφ(K): 2 k-rows(F), [V, 1], dV)
    and a query block (φ(Q), dφ(Q): 2 q-rows(F); with G = H/Hkv > 1 also G·S, φ(Q)ᵀdNum
    before its sum over the G heads).
    Forward only: O + den + causal (nc full chunks' states, the last two chunks' [num, den],
    the score product and the new sum: 4 q-rows(D+1), φ(Q), φ(K), [V, 1], scores + mask) or
    non-causal the larger of a key block of the state's pass (2·S + φ(K) + [V, 1]) and a query
    block (S + [num, den] of this block and the previous one + φ(Q)). Linear in N for a fixed
    chunk; within 1.5 % of the trace on the tests' cases."""
    return _kernel(s, s.head_dim, opts.chunk, False)


@formula("performer", trace_work=lambda s, o: _kernel_work(s, o.chunk))
def _performer(s: Shape, opts) -> tuple[int, int]:
    """As ``linear`` with F = m = ``features`` FAVOR+ features (rows from ``chunk`` and m the
    same way), plus: saved W·scale^½ and [W', 1] (m·(2D+1)·s), the key shift (B·Hkv·s) and one
    query stabiliser per row (B·H·N·s); FAVOR+'s key_grad makes [dφ·W', Σ dφ] (k-rows(D+1))
    and a new dK (k-rows(D)) where elu + 1 works in place, so the non-causal key block holds
    one k-rows(D) more and its query block the new dQ (q-rows(D)); chunk 1's dK is D wide.
    Forward only also counts the float64 draw of W (m·D·8 bytes). The cached draw that the
    first call in a process keeps (lru_cache) is left out. Within 3.6 % of the trace on the
    tests' cases (the most over: forward-only causal, where the closed form counts φ(Q) at a
    moment its logits are already freed)."""
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
