"""Low-rank attention: keys and values projected down to k ≪ N rows, then exact softmax.

* ``linformer`` — Wang et al. 2020: learned projections E, F (k × max_len) map the N keys and
  values to k rows: ``softmax(Q (E K)ᵀ · s) (F V)``. A module with a fixed maximum length
  (a sequence of N ≤ max_len uses the first N columns of E and F); reachable through
  ``attnmem.nn.MultiHeadAttention(..., method="linformer", max_len=..., k=...)``.
* ``nystrom`` — Xiong et al. 2021: m landmarks (segment means of Q and of K) and the Nyström
  approximation ``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V`` with the
  Moore–Penrose inverse by 6 Newton–Schulz iterations. Both outer factors are themselves
  softmax attentions (N queries over m landmark keys; m landmark queries over N keys), so they
  run through the exact O(N)-memory ``chunked`` kernel and no N×m matrix is ever stored::

      W   = pinv(softmax(Q̃ K̃ᵀ s)) · attention(Q̃, K, V)       # (m, D)
      out = attention(Q, K̃, W)                                # (N, D)

  Optional depthwise-conv residual on V (module form only: the conv is learned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_positive_int
from ..kernels import tiled_attention
from ..memory.model import Footprint, Shape, outside
from ..registry import Capabilities, Inputs, Method, Style, get, register
from .linear import module_inputs

_DTYPES = (torch.float32, torch.float64)


def _exact(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Exact softmax attention in O(N) memory (the ``chunked`` kernel), GQA without copies."""
    return tiled_attention(q, k, v, mask=None, scale=scale, q_tile=256, kv_tile=256, kernel="auto")


# --------------------------------------------------------------------------------------------
# Linformer


@dataclass(frozen=True)
class LinformerOptions:
    """max_len: the longest sequence the module accepts (its E, F have max_len columns).
    k: projected length (1 ≤ k ≤ max_len, default 256). share_kv: one projection for keys and
    values (E = F). per_head: one projection per key/value head instead of one for all."""

    max_len: int = 4096
    k: int = 256
    share_kv: bool = False
    per_head: bool = False

    def __post_init__(self):
        check_positive_int("max_len", self.max_len)
        check_positive_int("k", self.k)
        if self.k > self.max_len:
            raise ValueError(f"k must be at most max_len={self.max_len}, got k={self.k}")
        for name in ("share_kv", "per_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


class LinformerAttention(nn.Module):
    """Module form of ``linformer``: E (and F unless share_kv) of shape (P, k, max_len), with
    P = kv_heads if per_head else 1, initialised uniform in ±1/√k.

    ``forward(q, k, v, *, causal, mask)``: q (B, Hq, N, D), k, v (B, Hkv, N, D), N ≤ max_len.

    Raises:
        ValueError: a sequence longer than max_len, causal=True or a mask.
    """

    def __init__(self, *, kv_heads: int, opts: LinformerOptions):
        super().__init__()
        self.opts = opts
        heads = kv_heads if opts.per_head else 1
        bound = 1.0 / math.sqrt(opts.k)
        self.proj_k = nn.Parameter(torch.empty(heads, opts.k, opts.max_len).uniform_(-bound, bound))
        self.proj_v = None if opts.share_kv else nn.Parameter(
            torch.empty(heads, opts.k, opts.max_len).uniform_(-bound, bound))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask=None) -> Tensor:
        inp = module_inputs(get("linformer"), self.opts, q, k, v, causal, mask)
        n = k.shape[2]
        if n > self.opts.max_len:
            raise ValueError(
                f"sequence length {n} exceeds this Linformer module's max_len={self.opts.max_len}"
            )
        e = self.proj_k[:, :, :n].to(k.dtype)  # (P, k, N)
        f = e if self.proj_v is None else self.proj_v[:, :, :n].to(v.dtype)
        k_low = e.unsqueeze(0) @ k  # (B, Hkv, k, D)
        v_low = f.unsqueeze(0) @ v  # (B, Hkv, k, D)
        return _exact(q, k_low, v_low, inp.scale)

    def extra_repr(self) -> str:
        o = self.opts
        return f"max_len={o.max_len}, k={o.k}, share_kv={o.share_kv}, per_head={o.per_head}"


@register
class Linformer(Method):
    name = "linformer"
    style = Style("#d62728", "p")
    family = "lowrank"
    exact = False
    stateful = True
    memory = "O(B·H·N·D + B·H·N·k): k projected keys/values; learned E, F of k × max_len"
    summary = "Wang et al. 2020: learned projections E, F of length N -> k (module form)"
    caps = Capabilities(causal=False, mask=False, dtypes=_DTYPES)
    Options = LinformerOptions

    def extra_reasons(self, inp: Inputs, opts: LinformerOptions) -> list[str]:
        reasons = []
        if inp.causal:
            reasons.append("projects the whole sequence of keys at once, so a query would see "
                           "future keys (causal Linformer is not supported)")
        if inp.nq != inp.nk:
            reasons.append(f"needs Nq == Nk (got Nq={inp.nq}, Nk={inp.nk})")
        if inp.nk > opts.max_len:
            reasons.append(f"sequence length {inp.nk} exceeds max_len={opts.max_len}")
        return reasons

    def not_supported_reasons(self, inp: Inputs, opts) -> list[str]:
        # The capability line for causal is replaced by the explanation in extra_reasons.
        return [r for r in super().not_supported_reasons(inp, opts) if r != "does not support causal=True"]

    check_options = {"max_len": 64, "k": 8}

    def options_for_length(self, options, seq_len):
        """A module built for exactly this length unless ``max_len`` is given: max_len = N, or k
        when N < k (E and F have k ≤ max_len rows). The estimate, the plan and the benchmarks
        all size E and F this way."""
        if "max_len" in options:
            return options
        k = options.get("k", LinformerOptions.k)
        return {**options, "max_len": max(seq_len, k) if isinstance(k, int) else seq_len}

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return outside(linformer_footprint(s, opts))

    def memory_model(self, s: Shape, opts) -> Footprint:
        return linformer_footprint(s, opts)

    def build_module(self, *, heads: int, kv_heads: int, head_dim: int, opts: LinformerOptions) -> nn.Module:
        return LinformerAttention(kv_heads=kv_heads, opts=opts)

    def module_definition(self, module: nn.Module, inp: Inputs, opts: LinformerOptions) -> Tensor:
        # Wang et al. 2020, eq. (7): softmax(Q (E K)ᵀ · scale) (F V), E and F the module's
        # (P, k, max_len) projections cut to N columns; written with the N×k scores in full.
        n = inp.nk
        e = module.proj_k[:, :, :n].to(inp.k.dtype)  # (P, k, N)
        f = e if module.proj_v is None else module.proj_v[:, :, :n].to(inp.v.dtype)
        G = inp.q_heads // inp.kv_heads
        k_low = (e.unsqueeze(0) @ inp.k).repeat_interleave(G, 1)  # (B, Hq, k, D)
        v_low = (f.unsqueeze(0) @ inp.v).repeat_interleave(G, 1)  # (B, Hq, k, D)
        return torch.softmax(inp.q @ k_low.transpose(-1, -2) * inp.scale, -1) @ v_low


# --------------------------------------------------------------------------------------------
# Nyströmformer


def segment_means(x: Tensor, m: int) -> Tensor:
    """(B, H, N, D) -> (B, H, m, D): means of m contiguous, near-equal segments (m ≤ N)."""
    n = x.shape[2]
    if n % m == 0:
        return x.reshape(x.shape[0], x.shape[1], m, n // m, x.shape[3]).mean(3)  # (B, H, m, D)
    seg = torch.arange(n, device=x.device) * m // n  # segment of each token, sizes ⌊N/m⌋ or ⌈N/m⌉
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    sums = x.new_zeros(x.shape[0], x.shape[1], m, x.shape[3]).index_add(2, seg, x)
    return sums / counts[:, None]


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Moore–Penrose inverse of the (…, m, m) matrices by the Newton–Schulz iteration of
    Xiong et al. 2021, Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))), from Z₀ = Aᵀ / (‖A‖₁‖A‖∞)."""
    abs_a = a.abs()
    norm = abs_a.sum(-2).amax(-1) * abs_a.sum(-1).amax(-1)  # (…,): ‖A‖₁ · ‖A‖∞ per matrix
    z = a.transpose(-1, -2) / norm[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q: Tensor, k: Tensor, v: Tensor, *, landmarks: int, iterations: int,
                      scale: float) -> Tensor:
    """Nyström attention (module docstring). q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D).

    With m = min(landmarks, Nq, Nk) landmarks. When ``landmarks >= Nk`` every key is its own
    landmark and the approximation's limit is exact attention (P pinv(P) P V = P V): that is
    what is returned, computed exactly, not through the pseudo-inverse iteration (whose six
    default steps leave a few per cent of error).
    """
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    if nq == 0 or nk == 0:
        return q.new_zeros(B, Hq, nq, v.shape[-1])
    if landmarks >= nk:
        return _exact(q, k, v, scale)
    m = min(landmarks, nq, nk)
    q_land = segment_means(q, m)  # (B, Hq, m, D)
    k_land = segment_means(k, m)  # (B, Hkv, m, D)
    k_land_q = k_land.repeat_interleave(Hq // Hkv, 1)  # (B, Hq, m, D): m rows, not N
    kernel = torch.softmax(q_land @ k_land_q.transpose(-1, -2) * scale, -1)  # (B, Hq, m, m)
    w = iterative_pinv(kernel, iterations) @ _exact(q_land, k, v, scale)  # (B, Hq, m, D)
    return _exact(q, k_land_q, w, scale)  # (B, Hq, Nq, D)


def nystrom_definition(q: Tensor, k: Tensor, v: Tensor, *, landmarks: int, iterations: int,
                       scale: float) -> Tensor:
    """Nyström attention written out with its N×m and m×N matrices (Xiong et al. 2021, eq. 14):
    ``softmax(Q K̃ᵀ s) · pinv(softmax(Q̃ K̃ᵀ s)) · softmax(Q̃ Kᵀ s) · V``, landmarks the means of
    m near-equal contiguous segments, pinv the same Newton–Schulz iteration."""
    B, Hq, nq, _ = q.shape
    G = Hq // k.shape[1]
    if nq == 0 or k.shape[2] == 0:
        return q.new_zeros(B, Hq, nq, v.shape[-1])
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, Nk, D)
    m = min(landmarks, nq, k.shape[2])

    def means(n: int) -> Tensor:
        onehot = torch.nn.functional.one_hot(torch.arange(n, device=q.device) * m // n, m).to(q.dtype).T  # (m, n)
        return onehot / onehot.sum(1, keepdim=True)

    q_land, k_land = means(nq) @ q, means(k.shape[2]) @ k  # (B, Hq, m, D)
    f = torch.softmax(q @ k_land.transpose(-1, -2) * scale, -1)  # (B, Hq, Nq, m)
    a = torch.softmax(q_land @ k_land.transpose(-1, -2) * scale, -1)  # (B, Hq, m, m)
    b = torch.softmax(q_land @ k.transpose(-1, -2) * scale, -1)  # (B, Hq, m, Nk)
    return f @ iterative_pinv(a, iterations) @ b @ v


@dataclass(frozen=True)
class NystromOptions:
    """landmarks: m (positive int, default 64; at least Nk gives exact attention). pinv_iterations:
    Newton–Schulz steps (positive int, default 6). conv_kernel: odd width of the depthwise
    convolution over V added to the output (0 = none, default); the conv is learned, so it
    exists only in the module form (``attnmem.nn.MultiHeadAttention``)."""

    landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel: int = 0

    def __post_init__(self):
        check_positive_int("landmarks", self.landmarks)
        check_positive_int("pinv_iterations", self.pinv_iterations)
        c = self.conv_kernel
        if not isinstance(c, int) or isinstance(c, bool) or c < 0 or (c and c % 2 == 0):
            raise ValueError(f"conv_kernel must be 0 or a positive odd int, got {c!r}")


class NystromAttention(nn.Module):
    """Module form of ``nystrom``: with ``conv_kernel`` > 0 it holds the depthwise conv over V
    (one kernel of that width per key/value head, shared across the head dim, no bias)."""

    def __init__(self, *, kv_heads: int, opts: NystromOptions):
        super().__init__()
        self.opts = opts
        self.conv = None
        if opts.conv_kernel:
            width = opts.conv_kernel
            self.conv = nn.Conv2d(kv_heads, kv_heads, (width, 1), padding=(width // 2, 0),
                                  groups=kv_heads, bias=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask=None) -> Tensor:
        inp = module_inputs(get("nystrom"), NystromOptions(self.opts.landmarks, self.opts.pinv_iterations),
                      q, k, v, causal, mask)
        out = nystrom_attention(q, k, v, landmarks=self.opts.landmarks,
                                iterations=self.opts.pinv_iterations, scale=inp.scale)
        if self.conv is None:
            return out
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"conv_kernel needs Nq == Nk, got Nq={q.shape[2]}, Nk={k.shape[2]}")
        B, Hq, n, D = out.shape
        Hkv = k.shape[1]
        res = self.conv(v).unsqueeze(2)  # (B, Hkv, 1, N, D)
        return (out.reshape(B, Hkv, Hq // Hkv, n, D) + res).reshape(B, Hq, n, D)


@register
class Nystrom(Method):
    name = "nystrom"
    style = Style("#ff9896", "H")
    family = "lowrank"
    exact = False
    has_module = True
    memory = "O(B·H·N·D + B·H·m²): both N×m factors run as exact O(N) attention"
    summary = "Xiong et al. 2021: segment-mean landmarks, iterative pseudo-inverse, optional conv on V"
    caps = Capabilities(causal=False, mask=False, dtypes=_DTYPES)
    Options = NystromOptions

    def extra_reasons(self, inp: Inputs, opts: NystromOptions) -> list[str]:
        if opts.conv_kernel:
            return ["conv_kernel is a learned convolution: use attnmem.nn.MultiHeadAttention(..., "
                    "method='nystrom', conv_kernel=...)"]
        return []

    check_options = {"landmarks": 5}
    # Measured 1.6–3.2 % off exact attention with 6 Newton–Schulz steps (tests/mechanisms/
    # test_linear_lowrank.py); the definition runs the same iteration, so only rounding is left.
    definition_tolerance = 1e-8

    def forward(self, inp: Inputs, opts: NystromOptions) -> Tensor:
        return nystrom_attention(inp.q, inp.k, inp.v, landmarks=opts.landmarks,
                                 iterations=opts.pinv_iterations, scale=inp.scale)

    def definition(self, inp: Inputs, opts: NystromOptions) -> Tensor:
        return nystrom_definition(inp.q, inp.k, inp.v, landmarks=opts.landmarks,
                                  iterations=opts.pinv_iterations, scale=inp.scale)

    def build_module(self, *, heads: int, kv_heads: int, head_dim: int, opts: NystromOptions) -> nn.Module:
        return NystromAttention(kv_heads=kv_heads, opts=opts)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return outside(nystrom_footprint(s, opts))

    def memory_model(self, s: Shape, opts) -> Footprint:
        return nystrom_footprint(s, opts)


# --- memory model -----------------------------------------------------------------------------
# Each closed form returns the bytes of one call beyond its inputs (forward, +
# ``out.sum().backward()`` when ``s.training``) or, outside its domain, the reason (a str); the
# terms are read off the code above and checked against the fake-tensor trace
# (tests/test_estimate*.py). Notation: B batch, H = Hq query heads, Hkv key/value heads, N
# sequence length, D head dim, s bytes per element; Q = B·H·N·D·s, KV = B·Hkv·N·D·s.


def linformer_footprint(s: Shape, opts) -> Footprint | str:
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
        return ("only the default layout is modelled: float32, N = max_len, one projection for all heads, "
                "B = 1, Hkv > 1 (traced)")
    k = opts.k
    lse = b * h * n * 4
    low = 2 * b * hkv * k * d * 4
    params = 2 * k * opts.max_len * 4
    if not s.training:
        return Footprint(0, s.q_bytes + lse + params + low + (lse if h != hkv else 0))
    grads = s.q_bytes + 2 * s.kv_bytes
    bcast = b * hkv * k * n * 4
    return Footprint(s.q_bytes + lse + params + low, grads + params + bcast - lse - low)


def nystrom_footprint(s: Shape, opts) -> Footprint | str:
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
        return "conv_kernel > 0 (the module form) is not modelled (traced)"
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    m = min(opts.landmarks, n)
    mm, md, md_kv = b * h * m * m * e, b * h * m * d * e, b * hkv * m * d * e
    lse_n = s.lse_bytes
    lse_m = lse_n * m // n
    if not s.training:
        pinv = 2 * md + md_kv + 7 * mm + 3 * m * m * e
        final = s.q_bytes + lse_n + 3 * md + md_kv + mm
        return Footprint(0, max(pinv, final))
    saved = s.q_bytes + lse_n + (6 * opts.pinv_iterations + 2) * mm + 4 * md + lse_m
    p1 = s.q_bytes + 3 * s.kv_bytes
    p2 = 4 * s.q_bytes + 2 * s.kv_bytes - saved
    return Footprint(saved, md + max(p1, p2))
