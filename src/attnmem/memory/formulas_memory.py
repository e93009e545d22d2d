"""Closed-form memory of ``recurrent_memory`` and ``knn_memory`` (mechanisms/memory.py) and
``linformer`` (mechanisms/lowrank.py), for the options and lengths their docstrings name (others
are traced).

As in formulas_approx.py, each ``@formula``
returns ``(saved, transient)`` bytes (inputs excluded) for one call, forward +
``out.sum().backward()`` when ``shape.training``; the terms are read off the code and off
where the peak falls in a fake-tensor trace, and checked against the trace
(tests/test_estimate_memory.py).

Notation: B batch, H query heads, Hkv key/value heads, N sequence length, D head dim, s bytes
per element; per token, q = B·H·D·s (one query row), kv = B·Hkv·D·s, l = one log-sum-exp per
query head (B·H·4 bytes, 8 for float64).
"""

from __future__ import annotations

import math

from .estimate import Shape, formula

# Operator calls one segment makes in a trace (forward + backward: the slices, the
# concatenation with the memory, one chunked kernel call, the memory's clone, the slices'
# backward and the accumulation of q, k, v's gradients); enough to choose trace or formula.
_RECURRENT_OPS_PER_SEGMENT = 40


def _recurrent_work(s: Shape, opts) -> int:
    return _RECURRENT_OPS_PER_SEGMENT * math.ceil(s.seq_len / opts.segment)


@formula("recurrent_memory", trace_work=_recurrent_work)
def _recurrent_memory(s: Shape, opts) -> tuple[int, int] | None:
    """S = segment, M = memory, nseg = ⌈N/S⌉ segments; segment j has S_j tokens (the last
    one N − (nseg − 1)·S) and attends over its memory of m_j = min(M, j·S) cached tokens plus
    itself, as one chunked call over the concatenation K_j = [memory, segment] (m_j + S_j keys).

    Training: saved = O + every segment's output and log-sum-exp (N·(q + l)) + K_j and V_j of
    every segment with a memory (Σ_j 2·(m_j + S_j)·kv; the first segment, or M = 0, uses k, v
    themselves) + the final memory held by the module (2·min(M, N)·kv). The backward walks
    the segments last to first; each slice ``q[:, :, a:a+S]`` turns its gradient into a
    full-length buffer, which is added out of place to q.grad (likewise k, v). The peak is at
    the first such addition (the second-to-last segment, the last one's gradients having been
    taken as they are): dQ + dK + dV, minus the two segments' freed saved tensors, plus the
    larger of (adding dQ: a full-length buffer and the sum, 2·N·q) and (adding dK: 2·N·kv, with
    that segment's dV_j (m + S keys) and dQ_j (S rows) still alive). Causal or not alike.

    Forward only: the segment outputs and their concatenation (2·N·q) + the memory
    (2·min(M, N)·kv). Linear in N.

    Both hold once N ≥ 5·M + 3·S and nseg ≥ 3 (both last segments' memories are then full):
    beyond, one segment's own working set (its K_j, V_j, the old and new memory, its output and
    the masked tile's buffers under causal: at most about (5·M + 3·S)·q) is smaller than the
    full-length terms above. Shorter calls — a few segments, cheap to trace — are traced
    (None); there the peak falls inside one segment's kernel (off by up to 15 % at
    N = 5·S, M = 3·S, causal)."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    seg, mem = opts.segment, opts.memory
    qt, kvt = b * h * d * e, b * hkv * d * e
    lt = b * h * (8 if e == 8 else 4)
    nseg = math.ceil(n / seg)
    mem_final = 2 * min(mem, n) * kvt
    if n < 5 * mem + 3 * seg or nseg < 3:
        return None
    if not s.training:
        return 0, 2 * n * qt + mem_final

    def seg_len(j: int) -> int:
        return min(seg, n - j * seg)

    def concat(j: int) -> int:  # K_j and V_j of segment j (none without a memory)
        m = min(mem, j * seg)
        return 2 * (m + seg_len(j)) * kvt if m > 0 else 0

    # Segments 1 .. nseg-1 have m_j = min(M, j·S): full ones (m = M) from j ≥ ⌈M/S⌉ on.
    full_from = math.ceil(mem / seg) if mem > 0 else nseg
    concat_all = sum(concat(j) for j in range(1, min(full_from, nseg)))
    if full_from < nseg:
        full = nseg - full_from - 1  # full-memory segments of full length (the last one apart)
        concat_all += full * 2 * (mem + seg) * kvt + concat(nseg - 1)
    saved = n * qt + n * (qt + lt) + concat_all + mem_final
    freed = sum(concat(j) + seg_len(j) * (qt + lt) for j in (nseg - 1, nseg - 2))
    grads = n * qt + 2 * n * kvt
    add_q = 2 * n * qt
    add_k = 2 * n * kvt + (min(mem, (nseg - 2) * seg) + seg) * kvt + seg * qt
    return saved, grads - freed + max(add_q, add_k)


# --- linformer (mechanisms/lowrank.py) ------------------------------------------------------


def _linformer_work(s: Shape, opts) -> int:
    # A trace makes a few dozen operator calls, but the first one in a process pays ≈ 2 s for
    # importing fake tensors (2.4 s at N = 2**20); the closed form gives the trace's number
    # where it applies, so "auto" uses it there.
    from .estimate import MAX_TRACE_WORK

    return MAX_TRACE_WORK + 1


@formula("linformer", trace_work=_linformer_work)
def _linformer(s: Shape, opts) -> tuple[int, int] | None:
    """k projected rows, E and F (1, k, max_len) float32 parameters, K_low = E·K and
    V_low = F·V (B·Hkv·k·D each), then exact fused attention of the N queries over k keys.
    E and F count in full (2·k·max_len·4) once the call touches them, as the trace and the
    benchmark harness (``attnmem.bench.run_case``) count them.

    Training: saved = O + L(N) (one log-sum-exp per query row) + E + F + K_low + V_low.
    Transient = dQ + dK + dV + E.grad + F.grad (2·k·max_len·4) + the un-reduced gradient of E
    broadcast over the B·Hkv batch of the product (B·Hkv·k·N·4, before its sum) − L(N) −
    K_low − V_low (freed before the peak, in E·K's backward). Forward only: O + L(N) + E + F +
    K_low + V_low (+ one more L(N) under GQA, in the fused kernel). Linear in N.

    Only for the default layout: float32, N = max_len (so the slice E[:, :, :N] is E itself,
    no copy), one projection for all heads (not per_head, not share_kv), B = 1 and Hkv > 1;
    other options (float64 copies of E and F, non-contiguous slices, other broadcasts: +12.5 %
    at B = 2, Hkv = 1) are traced."""
    b, h, hkv, n, d = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim
    if s.dtype != "float32" or opts.share_kv or opts.per_head or n != opts.max_len or b != 1 or hkv == 1:
        return None
    k = opts.k
    lse = b * h * n * 4
    low = 2 * b * hkv * k * d * 4
    params = 2 * k * opts.max_len * 4
    if not s.training:
        return 0, s.q_bytes + lse + params + low + (lse if h != hkv else 0)
    grads = s.q_bytes + 2 * s.kv_bytes
    bcast = b * hkv * k * n * 4
    return s.q_bytes + lse + params + low, grads + params + bcast - lse - low


# --- knn_memory (mechanisms/memory.py) ------------------------------------------------------

# Operator calls one segment makes in a trace (forward + backward: local scores, mask, search,
# gathers, the two einsums, softmax, the store's writes, the slices' backward); enough to
# choose trace or formula.
_KNN_OPS_PER_SEGMENT = 60


def _knn_work(s: Shape, opts) -> int:
    nseg = math.ceil(s.seq_len / opts.segment)
    return nseg * (_KNN_OPS_PER_SEGMENT + 4 * math.ceil(opts.capacity / opts.search_chunk))


@formula("knn_memory", trace_work=_knn_work)
def _knn_memory(s: Shape, opts) -> tuple[int, int] | None:
    """S = segment, C = capacity, G = H/Hkv, nseg = ⌈N/S⌉ segments of S_j tokens (the last one
    N − (nseg − 1)·S); segment j ≥ 1 retrieves k_j = min(topk, C, j·S) stored keys per query.
    The store (2·B·Hkv·C·D·s) is allocated at the first write and held by the module.

    Training: saved = O (N·q) + the store + Σ_j P_j, where segment j ≥ 1 keeps P_j = its
    retrieved keys and values (2·B·Hkv·G·S_j·k_j·D·s), the softmax output over retrieved ∪
    local (B·Hkv·G·S_j·(k_j + S_j)·s), the causal mask (S_j² bytes, causal only), log g
    (H float32: the gate's log-sigmoid) and, under GQA (G > 1), the (B, Hkv, G·S_j, D) copy of
    its queries; segment 0 (an empty store) keeps only its local softmax (B·Hkv·G·S_0²·s), its
    mask and its query copy. The backward walks the segments last to first and accumulates
    q, k, v's gradients as recurrent_memory does: the peak is at the first out-of-place
    addition, dQ + dK + dV minus the last two segments' P_j, plus the larger of (adding dQ:
    2·N·q) and (adding dK: 2·N·kv with that segment's dV_j and dQ_j still alive, S·(kv + q)).
    Causal or not alike.

    Forward only: the segment outputs and their concatenation (2·N·q) + the store. Linear in N.

    Both hold once nseg ≥ 3 and N·q ≥ 3·(P + search), P one full segment's saved terms and
    search = B·H·S·min(search_chunk, C)·s its search scores: beyond, one segment's own working
    set (its saved terms, the local scores, the gathers and the search) is smaller than the
    full-length terms above. Shorter calls are traced (None), and so are the options not read
    off here (a fixed gate, the faiss backend, dtypes other than float32 and float64)."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    if opts.gate is not None or opts.backend != "torch" or s.dtype not in ("float32", "float64"):
        return None
    seg, cap = opts.segment, opts.capacity
    g = h // hkv
    bh = b * hkv
    qt, kvt = b * h * d * e, b * hkv * d * e
    nseg = math.ceil(n / seg)
    store = 2 * bh * cap * d * e

    def seg_len(j: int) -> int:
        return min(seg, n - j * seg)

    def kept(j: int, sj: int | None = None) -> int:  # P_j: what segment j saves for backward
        sj = seg_len(j) if sj is None else sj
        mask = sj * sj if s.causal else 0
        qcopy = bh * g * sj * d * e if g > 1 else 0
        if j == 0:
            return bh * g * sj * sj * e + mask + qcopy
        kj = min(opts.topk, cap, j * seg)
        return 2 * bh * g * sj * kj * d * e + bh * g * sj * (kj + sj) * e + mask + h * 4 + qcopy

    search = bh * g * seg * min(opts.search_chunk, cap) * e
    if nseg < 3 or n * qt < 3 * (kept(nseg, seg) + search):
        return None
    if not s.training:
        return 0, 2 * n * qt + store
    # Segments 1 .. nseg-1: k_j = min(topk, C) from j ≥ ⌈topk/S⌉ on (all but the last of full length).
    full_from = min(math.ceil(opts.topk / seg), nseg - 1)
    kept_all = sum(kept(j) for j in range(full_from)) + kept(nseg - 1)
    kept_all += (nseg - 1 - full_from) * kept(full_from, seg)
    saved = n * qt + store + kept_all
    grads = n * qt + 2 * n * kvt
    freed = kept(nseg - 1) + kept(nseg - 2)
    return saved, grads - freed + max(2 * n * qt, 2 * n * kvt + seg * (kvt + qt))
