"""Closed-form memory of the approximate methods: so far ``linear`` and ``performer``
(``linformer``, ``nystrom``, ``hierarchical``, ``recurrent_memory``, ``knn_memory`` are traced).

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


@formula("nystrom")
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
