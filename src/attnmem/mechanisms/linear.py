"""Kernelized attention: softmax(QKᵀ) replaced by φ(Q)φ(K)ᵀ, so no N×N matrix ever exists.

Both methods here share one core, ``kernel_attention``: for feature maps φ (D → F)::

    out_i = Σ_j φ(q_i)·φ(k_j) v_j  /  Σ_j φ(q_i)·φ(k_j)          (j over the keys q_i may see)

Non-causal, the sums over j are one F×(D+1) state ``S = φ(K)ᵀ[V, 1]`` (the last column is the
denominator's ``φ(K)ᵀ1``, so one matmul gives numerator and denominator). Causal, the
*chunkwise* form: queries go in chunks of C; a chunk sees the keys before it through the
running state S and its own C keys through an exact C×C masked product::

    queries  [ chunk 0 | chunk 1 | chunk 2 ]
    keys     [ chunk 0 | chunk 1 | chunk 2 ]
    chunk 2: φ(Q₂)·S₂ + tril(φ(Q₂)φ(K₂)ᵀ)·[V₂, 1]      S₂ = φ(K₀)ᵀ[V₀, 1] + φ(K₁)ᵀ[V₁, 1]

It neither loops token by token nor stores a state per position. Where no C×C product is
formed (non-causal queries; keys every query sees) rows go in a few large blocks instead
(``block_rows``), since each operation has a fixed cost. The backward is written out
(no autograd inside): it recomputes φ chunk by chunk from q, k and walks the chunks in reverse
with the transposed state ``R = Σ_{later chunks} φ(Q)ᵀ[dNum, dDen]``, so training keeps q, k, v,
out, the per-row denominators (and, for FAVOR+, the per-row query stabilisers) and one F×(D+1)
state per chunk: O(N·D + (N/C)·F·D) per head. A row whose denominator is 0 (nothing to attend)
returns zeros and zero grads.

* ``linear`` — Katharopoulos et al. 2020, φ(x) = elu(x) + 1 (or relu). ``scale`` is unused: the
  kernel is not softmax.
* ``performer`` — FAVOR+ (Choromanski et al. 2021): positive orthogonal random features
  φ(x) = exp(Wx − |x|²/2) / √m of x = q·scale^½, an unbiased estimate of exp(q·k·scale).
  Queries subtract their row maximum, keys one per-head maximum over all keys (a pre-pass
  without grad); both constants cancel between numerator and denominator, and so does a
  query's whole factor exp(−|q'|²/2), which queries leave out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..api import validate
from ..checks import check_positive_int
from ..memory.model import Footprint, Shape
from ..registry import Capabilities, Inputs, Method, Style, get, register

FEATURE_MAPS = ("elu", "relu")
# Float32/64 only: the running state sums N products, which bfloat16/float16 cannot hold.
_DTYPES = (torch.float32, torch.float64)


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


def _spans(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]


def block_rows(n: int, head_dim: int, features: int, chunk: int) -> int:
    """Rows per block where no C×C product is formed (non-causal queries, keys seen through the
    state): n split into ⌈(2F + 3D) / 3D⌉ equal blocks, at least ``chunk`` rows each. A block's
    transients (φ, dφ, [V, 1] and the D-wide products: about rows·(2F + 3D) floats per head)
    then stay within three inputs' worth (3·N·D), in few, large operations."""
    blocks = -(-(2 * features + 3 * head_dim) // (3 * head_dim))
    return max(chunk, -(-n // blocks))


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1] (…, L, D+1): multiplying by it gives a numerator and its denominator at once."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)


def _sum_groups(x: Tensor) -> Tensor:
    """Sum over the G query heads sharing a KV head (dim 2), a no-op without GQA."""
    return x.sum(2, keepdim=True) if x.shape[2] > 1 else x


class FeatureMap:
    """φ with its backward written out, for ``kernel_attention``.

    ``query`` may return a detached per-row stabiliser (it cancels between numerator and
    denominator); the backward passes it back to ``query_again`` to recompute the same features.
    ``key_grad(x, phi, dphi)`` is the vector-Jacobian product dφ → dx and may overwrite ``phi``
    and ``dphi`` (their last use); ``query_grad`` the same for queries (by default the same map).
    """

    def num_features(self, head_dim: int) -> int:
        return head_dim

    def query(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.key(x), None

    def query_again(self, x: Tensor, shift: Tensor | None) -> Tensor:
        return self.key(x)

    def key(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def query_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        return self.key_grad(x, phi, dphi)

    def key_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        raise NotImplementedError


class EluFeatures(FeatureMap):
    """φ(x) = elu(x) + 1, whose derivative is 1 for x > 0 and φ(x) = eˣ otherwise."""

    def key(self, x: Tensor) -> Tensor:
        return F.elu(x).add_(1.0)

    def key_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        return dphi.mul_(phi.masked_fill_(x > 0, 1.0))


class ReluFeatures(FeatureMap):
    def key(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def key_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        return dphi.mul_(x > 0)


class _KernelAttention(torch.autograd.Function):
    """φ-kernel attention over chunks; see the module docstring. Shapes inside (5-D, GQA):
    q (B, Hkv, G, Nq, D), k and v (B, Hkv, 1, Nk, D). The work of one chunk is a function of
    its own, so that one chunk's features are alive at a time."""

    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, causal: bool, chunk: int):
        nq, nk, dim_v = q.shape[3], k.shape[3], v.shape[-1]
        offset = nk - nq
        out = q.new_empty(q.shape[:4] + (dim_v,))  # (B, Hkv, G, Nq, Dv)
        den = q.new_empty(q.shape[:4] + (1,))  # (B, Hkv, G, Nq, 1)
        first = _key_range(0, 0, nk, offset)[0] if causal else nk
        feat = fmap.num_features(k.shape[-1])
        block = block_rows(max(nq, nk), k.shape[-1], feat, chunk)
        state = k.new_zeros(k.shape[:3] + (feat, dim_v + 1))  # (B, Hkv, 1, F, Dv+1)
        for p, e in _spans(0, first, block):  # keys before every query
            state = state + _key_state(fmap, k[:, :, :, p:e], v[:, :, :, p:e])
        states, shifts = [], []
        spans = _spans(0, nq, chunk if causal else block)
        for a, b in spans:
            states.append(state)
            p, e = _key_range(a, b, nk, offset) if causal else (nk, nk)
            own = (k[:, :, :, p:e], v[:, :, :, p:e], _causal_allowed(a, b, p, e, offset, q.device)) if e > p else None
            num, shift, state = _chunk_forward(fmap, q[:, :, :, a:b], state, own)
            shifts.append(shift)
            den[:, :, :, a:b] = num[..., dim_v:]
            torch.div(num[..., :dim_v], _safe(num[..., dim_v:]), out=out[:, :, :, a:b])
        ctx.fmap, ctx.causal, ctx.block, ctx.spans = fmap, causal, block, spans
        ctx.states, ctx.shifts = states, shifts
        ctx.save_for_backward(q, k, v, out, den)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, den = ctx.saved_tensors
        fmap, causal, spans = ctx.fmap, ctx.causal, ctx.spans
        nq, nk, dim_v = q.shape[3], k.shape[3], v.shape[-1]
        offset = nk - nq
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        r = None  # R = Σ over later chunks of φ(Q)ᵀ[dNum, dDen] (B, Hkv, 1, F, Dv+1)
        for c in reversed(range(len(spans))):
            a, b = spans[c]
            d = den[:, :, :, a:b]
            inv = torch.where(d > 0, 1.0 / _safe(d), torch.zeros_like(d))  # (B, Hkv, G, C, 1)
            dnum = q.new_empty(d.shape[:4] + (dim_v + 1,))  # (B, Hkv, G, C, Dv+1): grads of [num, den]
            torch.mul(dout[:, :, :, a:b], inv, out=dnum[..., :dim_v])
            dnum[..., dim_v:] = -(dnum[..., :dim_v] * out[:, :, :, a:b]).sum(-1, keepdim=True)
            p, e = _key_range(a, b, nk, offset) if causal else (nk, nk)
            own = (k[:, :, :, p:e], v[:, :, :, p:e], _causal_allowed(a, b, p, e, offset, q.device)) if e > p else None
            dq[:, :, :, a:b], own_grads, step = _chunk_backward(fmap, q[:, :, :, a:b], ctx.shifts[c], dnum,
                                                                ctx.states[c], own, r)
            if own_grads is not None:
                dk[:, :, :, p:e], dv[:, :, :, p:e] = own_grads
            r = step if r is None else r + step
        first = _key_range(0, 0, nk, offset)[0] if causal else nk
        if r is not None:
            for p, e in _spans(0, first, ctx.block):
                dk[:, :, :, p:e], dv[:, :, :, p:e] = _key_backward(fmap, k[:, :, :, p:e], v[:, :, :, p:e], r)
        return dq, dk, dv, None, None, None


def _key_state(fmap: FeatureMap, k_c: Tensor, v_c: Tensor) -> Tensor:
    """φ(K)ᵀ[V, 1] (B, Hkv, 1, F, Dv+1) of keys k_c, v_c (B, Hkv, 1, L, D)."""
    return fmap.key(k_c).transpose(-1, -2) @ _with_ones(v_c)


def _key_backward(fmap: FeatureMap, k_c: Tensor, v_c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """dk, dv of keys seen by every query through the state, given R (B, Hkv, 1, F, Dv+1)."""
    fk = fmap.key(k_c)  # (B, Hkv, 1, L, F)
    dv_c = fk @ r[..., :-1]  # (B, Hkv, 1, L, Dv)
    return fmap.key_grad(k_c, fk, _with_ones(v_c) @ r.transpose(-1, -2)), dv_c


def _chunk_forward(fmap: FeatureMap, q_c: Tensor, state: Tensor, own) -> tuple[Tensor, Tensor | None, Tensor]:
    """[num, den] (B, Hkv, G, C, Dv+1) of queries q_c through ``state`` and, causal, through
    their own keys ``own`` = (k_c, v_c, allowed (C, L)); the stabiliser; the state after."""
    fq, shift = fmap.query(q_c)  # (B, Hkv, G, C, F)
    num = fq @ state  # (B, Hkv, G, C, Dv+1)
    if own is not None:
        k_c, v_c, allowed = own
        fk = fmap.key(k_c)  # (B, Hkv, 1, L, F)
        v_c = _with_ones(v_c)  # (B, Hkv, 1, L, Dv+1)
        scores = (fq @ fk.transpose(-1, -2)).mul_(allowed)  # (B, Hkv, G, C, L)
        num = num + scores @ v_c
        state = state + fk.transpose(-1, -2) @ v_c
    return num, shift, state


def _chunk_backward(fmap: FeatureMap, q_c: Tensor, shift: Tensor | None, dnum: Tensor, state: Tensor, own,
                    r: Tensor | None):
    """dq of a query chunk, (dk, dv) of its own keys (causal) or None, and its term of R."""
    fq = fmap.query_again(q_c, shift)  # (B, Hkv, G, C, F)
    dfq = dnum @ state.transpose(-1, -2)  # (B, Hkv, G, C, F)
    own_grads = None
    if own is not None:
        k_c, v_c, allowed = own
        fk = fmap.key(k_c)  # (B, Hkv, 1, L, F)
        v_c = _with_ones(v_c)  # (B, Hkv, 1, L, Dv+1)
        scores = (fq @ fk.transpose(-1, -2)).mul_(allowed)  # (B, Hkv, G, C, L)
        dv_c = _sum_groups(scores.transpose(-1, -2) @ dnum[..., :-1])  # (B, Hkv, 1, L, Dv)
        del scores
        dscores = (dnum @ v_c.transpose(-1, -2)).mul_(allowed)  # (B, Hkv, G, C, L)
        dfq = dfq + dscores @ fk
        dfk = _sum_groups(dscores.transpose(-1, -2) @ fq)  # (B, Hkv, 1, L, F)
        del dscores
        if r is not None:
            dfk = dfk + v_c @ r.transpose(-1, -2)
            dv_c = dv_c + fk @ r[..., :-1]
        own_grads = fmap.key_grad(k_c, fk, dfk), dv_c
    step = _sum_groups(fq.transpose(-1, -2) @ dnum)  # (B, Hkv, 1, F, Dv+1)
    return fmap.query_grad(q_c, fq, dfq), own_grads, step


def _safe(d: Tensor) -> Tensor:
    """The denominator with exact zeros (rows with nothing to attend) replaced by 1."""
    return torch.where(d == 0, torch.ones_like(d), d)


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, fmap: FeatureMap, *, causal: bool, chunk: int) -> Tensor:
    """φ-kernel attention (module docstring) in the (B, H, N, D) layout, GQA without copies.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0.
        fmap: the feature map (…, D) -> (…, F) with its backward, applied chunk by chunk.
        causal: bottom-right aligned causal attention (chunkwise form).
        chunk: queries (and keys) per chunk of the causal form; elsewhere blocks of
            ``block_rows`` rows.

    Returns:
        (B, Hq, Nq, D).
    """
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q5 = q.reshape(B, Hkv, G, nq, D)  # (B, Hkv, G, Nq, D): query heads sharing a KV head
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    out = _KernelAttention.apply(q5, k5, v5, fmap, causal, chunk)
    return out.reshape(B, Hq, nq, v.shape[-1])


_FEATURE_MAPS = {"elu": EluFeatures(), "relu": ReluFeatures()}


def module_inputs(method: Method, opts, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask) -> Inputs:
    """Validate a module-form call the way ``attnmem.attention`` does."""
    inp = validate(q, k, v, causal=causal, mask=mask)
    method.check_supported(inp, opts)
    return inp


def kernel_definition(q: Tensor, k: Tensor, v: Tensor, phi, *, causal: bool) -> Tensor:
    """Kernel attention written out with the N×N matrix: A = φ(Q)φ(K)ᵀ (causal: bottom-right
    aligned), out = A V / A 1; rows with A 1 = 0 give zeros. q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, Nk, D)
    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, Hq, Nq, Nk)
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        a = a * (torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nk - nq)
    den = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(den == 0, torch.ones_like(den), den)


def favor_features(projection: Tensor, scale: float):
    """FAVOR+'s φ straight from the paper: φ(x) = exp(W x' - |x'|²/2) / √m with x' = x·scale^½."""
    def phi(x: Tensor) -> Tensor:
        x = x * math.sqrt(scale)
        return torch.exp(x @ projection.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(projection.shape[0])
    return phi


_DEFINITION_FEATURES = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu}


@dataclass(frozen=True)
class LinearOptions:
    """feature_map: "elu" (elu(x) + 1, Katharopoulos et al.) or "relu". chunk: queries per chunk
    of the causal chunkwise form (positive int, default 256); it changes the memory of the C×C
    products, not the result (up to rounding). Non-causal attention runs in ``block_rows``
    blocks (at least ``chunk`` rows)."""

    feature_map: str = "elu"
    chunk: int = 256

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        check_positive_int("chunk", self.chunk)


@register
class Linear(Method):
    name = "linear"
    style = Style("#2ca02c", "<")
    decode_cache = "linear_state"
    family = "linear"
    exact = False
    memory = "O(B·H·N·D + B·H·(N/C)·D²): q, k, v, out and one D×D state per chunk of C"
    summary = "Katharopoulos et al. 2020: φ(Q)(φ(K)ᵀV), φ = elu+1; causal in chunkwise form"
    caps = Capabilities(mask=False, dtypes=_DTYPES)
    Options = LinearOptions

    check_options = {"chunk": 5}

    def forward(self, inp: Inputs, opts: LinearOptions) -> Tensor:
        return kernel_attention(inp.q, inp.k, inp.v, _FEATURE_MAPS[opts.feature_map], causal=inp.causal,
                                chunk=opts.chunk)

    def definition(self, inp: Inputs, opts: LinearOptions) -> Tensor:
        return kernel_definition(inp.q, inp.k, inp.v, _DEFINITION_FEATURES[opts.feature_map], causal=inp.causal)

    def memory_domain_reasons(self, s: Shape, opts: LinearOptions) -> list[str]:
        return [] if opts.feature_map == "elu" else [f"feature_map={opts.feature_map!r} is not modelled (traced)"]

    def memory_model(self, s: Shape, opts: LinearOptions) -> Footprint:
        return linear_footprint(s, opts)


def orthogonal_random_features(features: int, head_dim: int, *, seed: int,
                               dtype: torch.dtype = torch.float32) -> Tensor:
    """FAVOR+'s projection W (features, head_dim): stacked blocks of random orthogonal rows,
    each row rescaled to the norm of a Gaussian vector (so rows are marginally N(0, I))."""
    return _orthogonal_random_features(features, head_dim, seed).to(dtype, copy=True)  # callers may write to it


@functools.lru_cache(maxsize=16)
def _orthogonal_random_features(features: int, head_dim: int, seed: int) -> Tensor:
    # Cached: the functional form draws the same W on every call, and the QRs cost more than
    # a small attention call.
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64)
        q_mat, r_mat = torch.linalg.qr(gauss)
        # Signs of R's diagonal make Q Haar-distributed (QR alone is biased towards them).
        blocks.append((q_mat * torch.sign(torch.diagonal(r_mat))).T)
    rows = torch.cat(blocks)[:features]  # (m, D) orthonormal within each block
    norms = torch.randn(features, head_dim, generator=g, dtype=torch.float64).norm(dim=1)
    return norms.unsqueeze(1) * rows


# Feature exponents are clamped below at this fraction of the float's log-range, so that a
# product of two features stays a normal float: subnormal arithmetic is ~10x slower on CPU.
_EXP_FLOOR = {torch.float32: -43.0, torch.float64: -354.0}


class FavorFeatures(FeatureMap):
    """φ(x) = exp(W x' − |x'|²/2 − c) with x' = x·scale^½ and c a detached stabiliser.

    The √m normalisation of the paper cancels between numerator and denominator and is left
    out, and so does a query's factor exp(−|q'|²/2), common to its whole row: queries use
    exp(W q' − c_q), c_q the row maximum. Exponents below ``_EXP_FLOOR`` are clamped (e^-43 ≈
    2e-19 in float32; performer-pytorch adds 1e-4 to every feature instead); the backward
    treats the clamp as the identity, which changes a gradient by at most that fraction of the
    largest feature's.

    A key's exponent is one matmul: [x, −|x'|²/2 − c] (…, L, D+1) times [W', 1]ᵀ (D+1, m), and
    the backward's dφ⊙φ times the same [W', 1] gives dx's linear part and the row sums at once.
    """

    def __init__(self, projection: Tensor, scale: float):
        self.w = projection * math.sqrt(scale)  # (m, D): x·W'ᵀ = x'·Wᵀ
        self.w_aug = torch.cat([self.w, self.w.new_ones(self.w.shape[0], 1)], 1)  # (m, D+1)
        self.scale = scale
        self.floor = _EXP_FLOOR.get(projection.dtype, -43.0)
        self.key_shift: Tensor | None = None

    def num_features(self, head_dim: int) -> int:
        return self.w.shape[0]

    def _exp_(self, logits: Tensor) -> Tensor:
        return logits.clamp_min_(self.floor).exp_()

    def query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lg = x @ self.w.T  # (…, L, m)
        shift = lg.amax(-1, keepdim=True)  # (…, L, 1)
        return self._exp_(lg.sub_(shift)), shift

    def query_again(self, x: Tensor, shift: Tensor | None) -> Tensor:
        return self._exp_(torch.cat([x, -shift], -1) @ self.w_aug.T)

    def query_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        return dphi.mul_(phi) @ self.w

    def key_logits(self, x: Tensor, shift: Tensor | None = None) -> Tensor:
        bias = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().mul_(-self.scale / 2)  # (…, L, 1)
        if shift is not None:
            bias = bias.sub_(shift)
        return torch.cat([x, bias], -1) @ self.w_aug.T  # (…, L, m)

    def key(self, x: Tensor) -> Tensor:
        return self._exp_(self.key_logits(x, self.key_shift))

    def key_grad(self, x: Tensor, phi: Tensor, dphi: Tensor) -> Tensor:
        g = dphi.mul_(phi) @ self.w_aug  # (…, L, D+1): [dlogits·W', Σ_j dlogits_j]
        return torch.addcmul(g[..., :-1], x, g[..., -1:], value=-self.scale)  # d(−scale·|x|²/2)/dx = −scale·x

    def fit_keys(self, k: Tensor, block: int) -> None:
        """One pass: the per-head maximum key logit, so exp never overflows."""
        shift = None
        for p in range(0, k.shape[-2], block):
            m = self.key_logits(k[..., p:p + block, :]).amax((-1, -2), keepdim=True)
            shift = m if shift is None else torch.maximum(shift, m)
        self.key_shift = None if shift is None else shift.unsqueeze(2)  # (B, Hkv, 1, 1, 1)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool,
                        scale: float, chunk: int) -> Tensor:
    """FAVOR+ attention with the given projection (m, D); shapes as ``kernel_attention``."""
    feats = FavorFeatures(projection.to(q.device, q.dtype), scale)
    with torch.no_grad():
        feats.fit_keys(k, block_rows(max(q.shape[2], k.shape[2]), k.shape[-1], projection.shape[0], chunk))
    return kernel_attention(q, k, v, feats, causal=causal, chunk=chunk)


@dataclass(frozen=True)
class PerformerOptions:
    """features: m random features (positive int, default 256). seed: the draw of the
    orthogonal projection (int, default 0); the functional form always uses this seed, the
    module form redraws with ``redraw()``. chunk: as for ``linear`` (default 1024: fewer, larger
    operations; the causal form's C×C products stay a few MiB per head)."""

    features: int = 256
    seed: int = 0
    chunk: int = 1024

    def __post_init__(self):
        check_positive_int("features", self.features)
        check_positive_int("chunk", self.chunk)
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
        inp = module_inputs(get("performer"), self.opts, q, k, v, causal, mask)
        return performer_attention(q, k, v, self.projection, causal=causal, scale=inp.scale,
                                   chunk=self.opts.chunk)

    def extra_repr(self) -> str:
        return f"features={self.opts.features}, seed={self.seed}"


@register
class Performer(Method):
    name = "performer"
    style = Style("#98df8a", ">")
    decode_cache = "linear_state"
    family = "linear"
    exact = False
    memory = "O(B·H·N·D + B·H·(N/C)·m·D): q, k, v, out and one m×D state per chunk of C"
    summary = "FAVOR+ (Choromanski et al. 2021): positive orthogonal random features, m of them"
    caps = Capabilities(mask=False, dtypes=_DTYPES)
    Options = PerformerOptions
    has_module = True

    check_options = {"features": 16, "seed": 3, "chunk": 8}

    def forward(self, inp: Inputs, opts: PerformerOptions) -> Tensor:
        w = orthogonal_random_features(opts.features, inp.head_dim, seed=opts.seed, dtype=torch.float64)
        return performer_attention(inp.q, inp.k, inp.v, w, causal=inp.causal, scale=inp.scale,
                                   chunk=opts.chunk)

    def definition(self, inp: Inputs, opts: PerformerOptions) -> Tensor:
        w = orthogonal_random_features(opts.features, inp.head_dim, seed=opts.seed, dtype=inp.q.dtype)
        return kernel_definition(inp.q, inp.k, inp.v, favor_features(w, inp.scale), causal=inp.causal)

    def build_module(self, *, heads: int, kv_heads: int, head_dim: int, opts: PerformerOptions) -> nn.Module:
        return PerformerAttention(head_dim=head_dim, opts=opts)

    def memory_domain_reasons(self, s: Shape, opts: PerformerOptions) -> list[str]:
        return []

    def memory_model(self, s: Shape, opts: PerformerOptions) -> Footprint:
        return performer_footprint(s, opts)


# --- memory model -----------------------------------------------------------------------------
# Each closed form returns the bytes of one call beyond its inputs (forward, +
# ``out.sum().backward()`` when ``s.training``) or, outside its domain, the reason (a str); the
# terms are read off the code above and checked against the fake-tensor trace
# (tests/test_estimate*.py). Notation: B batch, H = Hq query heads, Hkv key/value heads, N
# sequence length, D head dim, s bytes per element; Q = B·H·N·D·s, KV = B·Hkv·N·D·s.


def _grads(s: Shape) -> int:
    """dQ + dK + dV."""
    return s.q_bytes + 2 * s.kv_bytes


# --- linear, performer -----------------------------------------------------------------------


def _kernel(s: Shape, feats: int, chunk: int, favor: bool) -> Footprint:
    """Memory of ``kernel_attention`` (mechanisms/linear.py): F = ``feats`` features, causal
    chunks of C = min(chunk, N) rows, non-causal blocks of Cb = min(block_rows(N, D, F, chunk), N)
    rows. ``favor``: FAVOR+ features (performer), which keep W·scale^½ and [W', 1] (F×D, F×(D+1)),
    the key shift and one stabiliser per query row, and whose key_grad makes [dφ·W', Σ dφ]
    (rows × (D+1)) and a new rows × D result instead of working in place."""
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
            return Footprint(0, s.q_bytes + den + work + proj + drawn)
        return Footprint(0, s.q_bytes + den + work + proj + shifts + drawn)
    saved = s.q_bytes + den + (spans if s.causal else 1) * state + proj + shifts
    # Each walk of the reverse pass leaves 1/⌈rows⌉ of dNum = [dout/den, −Σ dout·out/den] and of
    # 1/den alive (the first block's, full size) and R with the last term added to it.
    walk = _grads(s) + (2 if spans > 1 else 1) * state + qrow(1) + qrow(d + 1)
    if s.causal:
        # At chunk 0 (the last of the walk): dφ(Q) + dScores·φ(K) being formed beside φ(Q), the old
        # dφ(Q) and φ(K) expanded to the H heads (GQA) or the sum (no GQA): 4 (C, F) over H heads;
        # φ(K), [V, 1], dV of its own keys, dScores, the mask; dK, dV of chunk 1 (still bound).
        prev = krow(2 * d, min(rows, n - rows)) if spans > 1 else 0
        return Footprint(saved, walk + 4 * qrow(feats) + krow(feats) + krow(d + 1) + krow(d) + cc + prev)
    # The key pass (after the query pass): φ(K), dV, [V, 1] and dφ(K) = [V, 1]·Rᵀ (elu + 1: then
    # in place); FAVOR+: φ(K), dφ(K)⊙φ(K), [dφ·W', Σ dφ] and the new dK.
    key = krow(2 * feats) + krow(d) + krow(d + 1) + f * krow(d)
    # The query pass: φ(Q) and dφ(Q) over the H heads, then FAVOR+'s dQ = (dφ⊙φ)·W' or, with
    # G = H/Hkv > 1, φ(Q)ᵀdNum over the H heads before its sum over the G heads.
    query = 2 * qrow(feats) + max(f * qrow(d), (h // hkv) * state if h != hkv else 0)
    return Footprint(saved, walk + max(key, query))


def linear_footprint(s: Shape, opts) -> Footprint:
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


def performer_footprint(s: Shape, opts) -> Footprint:
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

