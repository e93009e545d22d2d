"""Kernelized attention: softmax(QKᵀ) replaced by φ(Q)φ(K)ᵀ, so no N×N matrix ever exists.

Both methods here share one core, ``kernel_attention``: for feature maps φ (D → F)::

    out_i = Σ_j φ(q_i)·φ(k_j) v_j  /  Σ_j φ(q_i)·φ(k_j)          (j over the keys q_i may see)

Non-causal, the sums over j are one F×D state ``S = φ(K)ᵀV`` and one F-vector ``z = φ(K)ᵀ1``.
Causal, the *chunkwise* form: queries go in chunks of C; a chunk sees the keys before it
through the running state (S, z) and its own C keys through an exact C×C masked product::

    queries  [ chunk 0 | chunk 1 | chunk 2 ]
    keys     [ chunk 0 | chunk 1 | chunk 2 ]
    chunk 2: φ(Q₂)·S₂ + tril(φ(Q₂)φ(K₂)ᵀ)·V₂      S₂ = φ(K₀)ᵀV₀ + φ(K₁)ᵀV₁

It neither loops token by token nor stores a state per position. The custom backward
recomputes φ per chunk from q, k (autograd through the feature map, chunk by chunk) and walks
the chunks in reverse with the transposed state ``R = Σ_{later chunks} φ(Q)ᵀ dO``, so training
keeps q, k, v, out, the per-row denominators and one F×D state per chunk: O(N·D + (N/C)·F·D)
per head. A row whose denominator is 0 (nothing to attend) returns zeros and zero grads.

* ``linear`` — Katharopoulos et al. 2020, φ(x) = elu(x) + 1 (or relu). ``scale`` is unused: the
  kernel is not softmax.
* ``performer`` — FAVOR+ (Choromanski et al. 2021): positive orthogonal random features
  φ(x) = exp(Wx − |x|²/2) / √m of x = q·scale^½, an unbiased estimate of exp(q·k·scale).
  Queries subtract their row maximum, keys one per-head maximum over all keys (a pre-pass
  without grad); both constants cancel between numerator and denominator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Capabilities, Inputs, Method, get, register

FEATURE_MAPS = ("elu", "relu")
# Float32/64 only: the running state sums N products, which bfloat16/float16 cannot hold.
_DTYPES = (torch.float32, torch.float64)

FeatureMap = Callable[[Tensor], Tensor]


def _check_positive_int(name: str, val: object) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"{name} must be a positive int, got {val!r}")


def _causal_allowed(a: int, b: int, p: int, e: int, offset: int, device) -> Tensor:
    """(b-a, e-p) bool: query i (absolute a+i) sees key p+j iff p+j <= a+i+offset."""
    qi = torch.arange(a, b, device=device).unsqueeze(1)
    kj = torch.arange(p, e, device=device).unsqueeze(0)
    return kj <= qi + offset


def _key_range(a: int, b: int, nk: int, offset: int) -> tuple[int, int]:
    """Causal: keys [0, p) are before every query of chunk [a, b); [p, e) are its own keys."""
    p = min(max(a + offset, 0), nk)
    e = min(max(b + offset, 0), nk)
    return p, e


class _KernelAttention(torch.autograd.Function):
    """φ-kernel attention over chunks; see the module docstring. Shapes inside (5-D, GQA):
    q (B, Hkv, G, Nq, D), k and v (B, Hkv, 1, Nk, D)."""

    @staticmethod
    def forward(ctx, q, k, v, phi_q: FeatureMap, phi_k: FeatureMap, causal: bool, chunk: int):
        nq, nk = q.shape[3], k.shape[3]
        offset = nk - nq
        out = q.new_empty(q.shape[:4] + (v.shape[-1],))  # (B, Hkv, G, Nq, D)
        den = q.new_empty(q.shape[:4])  # (B, Hkv, G, Nq)
        first = _key_range(0, 0, nk, offset)[0] if causal else nk
        state = _State.zeros(k, v, phi_k).plus_range(k, v, phi_k, first, chunk)
        starts = range(0, nq, chunk)
        states = []
        for a in starts:
            b = min(a + chunk, nq)
            fq = phi_q(q[:, :, :, a:b])  # (B, Hkv, G, C, F)
            num = fq @ state.s  # (B, Hkv, G, C, D)
            d = (fq @ state.z.unsqueeze(-1)).squeeze(-1)  # (B, Hkv, G, C)
            if causal:
                states.append((state.s, state.z))
                p, e = _key_range(a, b, nk, offset)
                if e > p:
                    fk = phi_k(k[:, :, :, p:e])  # (B, Hkv, 1, L, F)
                    scores = fq @ fk.transpose(-1, -2)  # (B, Hkv, G, C, L)
                    scores = scores * _causal_allowed(a, b, p, e, offset, q.device)
                    num = num + scores @ v[:, :, :, p:e]
                    d = d + scores.sum(-1)
                    state = state.plus(fk, v[:, :, :, p:e])
            den[:, :, :, a:b] = d
            out[:, :, :, a:b] = num / _safe(d).unsqueeze(-1)
        ctx.phi_q, ctx.phi_k, ctx.causal, ctx.chunk = phi_q, phi_k, causal, chunk
        ctx.states = states if causal else [(state.s, state.z)]
        ctx.save_for_backward(q, k, v, out, den)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, den = ctx.saved_tensors
        phi_q, phi_k, causal, chunk = ctx.phi_q, ctx.phi_k, ctx.causal, ctx.chunk
        nq, nk = q.shape[3], k.shape[3]
        offset = nk - nq
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        r_s = r_z = None  # R = Σ over later chunks of φ(Q)ᵀ dNum and φ(Q)ᵀ dDen (B, Hkv, 1, F, ·)
        starts = list(range(0, nq, chunk))
        for c in reversed(range(len(starts))):
            a = starts[c]
            b = min(a + chunk, nq)
            s, z = ctx.states[c] if causal else ctx.states[0]
            d = den[:, :, :, a:b]
            valid = d > 0
            inv = torch.where(valid, 1.0 / _safe(d), torch.zeros_like(d)).unsqueeze(-1)
            dnum = dout[:, :, :, a:b] * inv  # (B, Hkv, G, C, D)
            dden = -(dout[:, :, :, a:b] * out[:, :, :, a:b]).sum(-1, keepdim=True) * inv  # (…, C, 1)
            with torch.enable_grad():
                q_c = q[:, :, :, a:b].detach().requires_grad_(True)
                fq = phi_q(q_c)  # (B, Hkv, G, C, F)
                dfq = dnum @ s.transpose(-1, -2) + dden * z.unsqueeze(-2)
                if causal:
                    p, e = _key_range(a, b, nk, offset)
                else:
                    p = e = nk
                if e > p:
                    k_c = k[:, :, :, p:e].detach().requires_grad_(True)
                    fk = phi_k(k_c)  # (B, Hkv, 1, L, F)
                    allowed = _causal_allowed(a, b, p, e, offset, q.device)
                    v_c = v[:, :, :, p:e]
                    scores = (fq @ fk.transpose(-1, -2)) * allowed  # (B, Hkv, G, C, L)
                    dscores = (dnum @ v_c.transpose(-1, -2) + dden) * allowed
                    dfq = dfq + dscores @ fk
                    dfk = (dscores.transpose(-1, -2) @ fq).sum(2, keepdim=True)  # (B, Hkv, 1, L, F)
                    dv_c = (scores.transpose(-1, -2) @ dnum).sum(2, keepdim=True)
                    if r_s is not None:
                        dfk = dfk + v_c @ r_s.transpose(-1, -2) + r_z.transpose(-1, -2)
                        dv_c = dv_c + fk @ r_s
                    gq, gk = torch.autograd.grad((fq, fk), (q_c, k_c), (dfq, dfk))
                    dk[:, :, :, p:e] = gk
                    dv[:, :, :, p:e] = dv_c
                else:
                    gq, = torch.autograd.grad(fq, q_c, dfq)
            dq[:, :, :, a:b] = gq
            fq = fq.detach()
            step_s = (fq.transpose(-1, -2) @ dnum).sum(2, keepdim=True)  # (B, Hkv, 1, F, D)
            step_z = (fq.transpose(-1, -2) @ dden).sum(2, keepdim=True)  # (B, Hkv, 1, F, 1)
            r_s = step_s if r_s is None else r_s + step_s
            r_z = step_z if r_z is None else r_z + step_z
        first = _key_range(0, 0, nk, offset)[0] if causal else nk
        if r_s is not None:
            for p in range(0, first, chunk):
                e = min(p + chunk, first)
                with torch.enable_grad():
                    k_c = k[:, :, :, p:e].detach().requires_grad_(True)
                    fk = phi_k(k_c)
                    dfk = v[:, :, :, p:e] @ r_s.transpose(-1, -2) + r_z.transpose(-1, -2)
                    gk, = torch.autograd.grad(fk, k_c, dfk)
                dk[:, :, :, p:e] = gk
                dv[:, :, :, p:e] = fk.detach() @ r_s
        return dq, dk, dv, None, None, None, None


def _safe(d: Tensor) -> Tensor:
    """The denominator with exact zeros (rows with nothing to attend) replaced by 1."""
    return torch.where(d == 0, torch.ones_like(d), d)


@dataclass
class _State:
    """The running state S = Σ φ(k)ᵀ v (…, F, D) and z = Σ φ(k) (…, F)."""

    s: Tensor
    z: Tensor

    @staticmethod
    def zeros(k: Tensor, v: Tensor, phi_k: FeatureMap) -> _State:
        feat = phi_k(k[:, :, :, :1]).shape[-1]
        shape = k.shape[:3]
        return _State(k.new_zeros(shape + (feat, v.shape[-1])), k.new_zeros(shape + (feat,)))

    def plus(self, fk: Tensor, v_c: Tensor) -> _State:
        return _State(self.s + fk.transpose(-1, -2) @ v_c, self.z + fk.sum(-2))

    def plus_range(self, k: Tensor, v: Tensor, phi_k: FeatureMap, stop: int, chunk: int) -> _State:
        """The state with keys [0, stop) added, chunk by chunk."""
        state = self
        for p in range(0, stop, chunk):
            e = min(p + chunk, stop)
            state = state.plus(phi_k(k[:, :, :, p:e]), v[:, :, :, p:e])
        return state


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, phi_q: FeatureMap, phi_k: FeatureMap, *,
                     causal: bool, chunk: int) -> Tensor:
    """φ-kernel attention (module docstring) in the (B, H, N, D) layout, GQA without copies.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0.
        phi_q, phi_k: feature maps (…, D) -> (…, F), applied chunk by chunk.
        causal: bottom-right aligned causal attention (chunkwise form).
        chunk: queries (and keys) per chunk.

    Returns:
        (B, Hq, Nq, D).
    """
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q5 = q.reshape(B, Hkv, G, nq, D)  # (B, Hkv, G, Nq, D): query heads sharing a KV head
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    out = _KernelAttention.apply(q5, k5, v5, phi_q, phi_k, causal, chunk)
    return out.reshape(B, Hq, nq, v.shape[-1])


def elu_features(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def relu_features(x: Tensor) -> Tensor:
    return F.relu(x)


_FEATURE_FNS = {"elu": elu_features, "relu": relu_features}


def _refuse(method: Method, opts, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask) -> Inputs:
    """Validate a module-form call the way ``attnmem.attention`` does."""
    from ..api import validate

    inp = validate(q, k, v, causal=causal, mask=mask)
    reasons = method.not_supported_reasons(inp, opts)
    if reasons:
        raise ValueError(f"method {method.name!r} cannot run these inputs: {'; '.join(reasons)}")
    return inp


@dataclass(frozen=True)
class LinearOptions:
    """feature_map: "elu" (elu(x) + 1, Katharopoulos et al.) or "relu". chunk: queries per chunk
    of the chunkwise form (positive int, default 256); it changes the memory of the C×C
    products, not the result (up to rounding)."""

    feature_map: str = "elu"
    chunk: int = 256

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        _check_positive_int("chunk", self.chunk)


@register
class Linear(Method):
    name = "linear"
    family = "linear"
    exact = False
    memory = "O(B·H·N·D + B·H·(N/C)·D²): q, k, v, out and one D×D state per chunk of C"
    summary = "Katharopoulos et al. 2020: φ(Q)(φ(K)ᵀV), φ = elu+1; causal in chunkwise form"
    caps = Capabilities(mask=False, dtypes=_DTYPES)
    Options = LinearOptions

    def forward(self, inp: Inputs, opts: LinearOptions) -> Tensor:
        phi = _FEATURE_FNS[opts.feature_map]
        return kernel_attention(inp.q, inp.k, inp.v, phi, phi, causal=inp.causal, chunk=opts.chunk)


def orthogonal_random_features(features: int, head_dim: int, *, seed: int,
                               dtype: torch.dtype = torch.float32) -> Tensor:
    """FAVOR+'s projection W (features, head_dim): stacked blocks of random orthogonal rows,
    each row rescaled to the norm of a Gaussian vector (so rows are marginally N(0, I))."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64)
        q_mat, r_mat = torch.linalg.qr(gauss)
        # Signs of R's diagonal make Q Haar-distributed (QR alone is biased towards them).
        blocks.append((q_mat * torch.sign(torch.diagonal(r_mat))).T)
    rows = torch.cat(blocks)[:features]  # (m, D) orthonormal within each block
    norms = torch.randn(features, head_dim, generator=g, dtype=torch.float64).norm(dim=1)
    return (norms.unsqueeze(1) * rows).to(dtype)


# Feature exponents are clamped below at this fraction of the float's log-range, so that a
# product of two features stays a normal float: subnormal arithmetic is ~10x slower on CPU.
_EXP_FLOOR = {torch.float32: -43.0, torch.float64: -354.0}


class FavorFeatures:
    """φ(x) = exp(W x' − |x'|²/2 − c) with x' = x·scale^½ and c a detached stabiliser.

    The √m normalisation of the paper cancels between numerator and denominator and is left
    out. Exponents below ``_EXP_FLOOR`` are clamped (e^-43 ≈ 2e-19 in float32; performer-pytorch
    adds 1e-4 to every feature instead).
    """

    def __init__(self, projection: Tensor, scale: float):
        self.w = projection * math.sqrt(scale)  # (m, D): x·W'ᵀ = x'·Wᵀ
        self.half_scale = scale / 2
        self.floor = _EXP_FLOOR.get(projection.dtype, -43.0)
        self.key_shift: Tensor | float = 0.0

    def logits(self, x: Tensor) -> Tensor:
        return x @ self.w.T - (x * x).sum(-1, keepdim=True) * self.half_scale  # (…, L, m)

    def query(self, x: Tensor) -> Tensor:
        lg = self.logits(x)
        return torch.exp((lg - lg.amax(-1, keepdim=True).detach()).clamp_min(self.floor))

    def key(self, x: Tensor) -> Tensor:
        return torch.exp((self.logits(x) - self.key_shift).clamp_min(self.floor))

    def fit_keys(self, k: Tensor, chunk: int) -> None:
        """One pass without grad: the per-head maximum key logit, so exp never overflows."""
        shift = None
        with torch.no_grad():
            for p in range(0, k.shape[-2], chunk):
                m = self.logits(k[..., p:p + chunk, :]).amax((-1, -2), keepdim=True)
                shift = m if shift is None else torch.maximum(shift, m)
        self.key_shift = 0.0 if shift is None else shift.unsqueeze(2)  # (B, Hkv, 1, 1, 1)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool,
                        scale: float, chunk: int) -> Tensor:
    """FAVOR+ attention with the given projection (m, D); shapes as ``kernel_attention``."""
    feats = FavorFeatures(projection.to(q.device, q.dtype), scale)
    feats.fit_keys(k, chunk)
    return kernel_attention(q, k, v, feats.query, feats.key, causal=causal, chunk=chunk)


@dataclass(frozen=True)
class PerformerOptions:
    """features: m random features (positive int, default 256). seed: the draw of the
    orthogonal projection (int, default 0); the functional form always uses this seed, the
    module form redraws with ``redraw()``. chunk: as for ``linear`` (default 1024: fewer, larger
    operations; the transient (C, m) features stay a few MiB per head)."""

    features: int = 256
    seed: int = 0
    chunk: int = 1024

    def __post_init__(self):
        _check_positive_int("features", self.features)
        _check_positive_int("chunk", self.chunk)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


class PerformerAttention(nn.Module):
    """Module form of ``performer``: holds its projection as a buffer; ``redraw()`` resamples.

    ``attnmem.nn.MultiHeadAttention(..., method="performer")`` builds one as ``.inner``, so
    ``mha.inner.redraw()`` draws new features (e.g. every few hundred training steps).
    ``forward(q, k, v, *, causal, mask)`` works in the (B, H, N, D) layout.
    """

    def __init__(self, *, head_dim: int, opts: PerformerOptions):
        super().__init__()
        self.opts = opts
        self.seed = opts.seed
        self.register_buffer("projection", orthogonal_random_features(opts.features, head_dim, seed=opts.seed))

    def redraw(self, seed: int | None = None) -> None:
        """Draw a new projection: from ``seed``, or from the next seed after the current one."""
        self.seed = self.seed + 1 if seed is None else seed
        w = orthogonal_random_features(self.opts.features, self.projection.shape[1], seed=self.seed)
        self.projection.copy_(w)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask=None) -> Tensor:
        inp = _refuse(get("performer"), self.opts, q, k, v, causal, mask)
        return performer_attention(q, k, v, self.projection, causal=causal, scale=inp.scale,
                                   chunk=self.opts.chunk)

    def extra_repr(self) -> str:
        return f"features={self.opts.features}, seed={self.seed}"


@register
class Performer(Method):
    name = "performer"
    family = "linear"
    exact = False
    memory = "O(B·H·N·D + B·H·(N/C)·m·D): q, k, v, out and one m×D state per chunk of C"
    summary = "FAVOR+ (Choromanski et al. 2021): positive orthogonal random features, m of them"
    caps = Capabilities(mask=False, dtypes=_DTYPES)
    Options = PerformerOptions
    has_module = True

    def forward(self, inp: Inputs, opts: PerformerOptions) -> Tensor:
        w = orthogonal_random_features(opts.features, inp.head_dim, seed=opts.seed, dtype=torch.float64)
        return performer_attention(inp.q, inp.k, inp.v, w, causal=inp.causal, scale=inp.scale,
                                   chunk=opts.chunk)

    def build_module(self, *, heads: int, kv_heads: int, head_dim: int, opts: PerformerOptions) -> nn.Module:
        return PerformerAttention(head_dim=head_dim, opts=opts)

