"""``MultiHeadAttention`` with any registered method, stateless or with learned state."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..api import attention
from ..checks import check_positive_int

ROTARY_BASE = 10000.0  # RoFormer's: at head_dim 32 the slowest pair turns once in ~35k positions
# length_scale's initial s: s·log(n) = 1 at n = 128 keys, so a query that sees 128 keys starts as
# plain softmax does; one that sees 1024 starts 1.43 × sharper.
LENGTH_SCALE_INIT_KEYS = 128


def check_rotary_base(base: Any) -> float:
    """``base`` as a float; ValueError naming ``rotary_base`` unless it is a number > 1."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"rotary_base must be a number > 1, got {base!r}")
    return float(base)


def rotary(*xs: Tensor, positions: Tensor, base: float = ROTARY_BASE) -> Tensor | tuple[Tensor, ...]:
    """Rotary position embedding (Su et al., RoFormer), GPT-NeoX's half-split layout.

    Channel ``i`` and channel ``i + D/2`` of every head form a pair, rotated by the angle
    ``p · base^(-2i/D)`` at position ``p``:
    ``(x_i, x_{i+D/2}) -> (x_i cos a - x_{i+D/2} sin a, x_i sin a + x_{i+D/2} cos a)``.
    Applied to q and k alike, it makes ``q_p · k_p'`` a function of the contents and of
    ``p - p'`` only (a relative position, and a locality prior every method can honour: it
    changes q and k, not the attention call).

    Args:
        xs: one or more (B, H, N, D) tensors of one dtype (q and k: the angles are computed
            once for all of them), D even.
        positions: (N,) or (B, N) int positions of the N tokens.

    Returns:
        The rotated tensor, or a tuple of them for several ``xs``.

    Raises:
        ValueError: an odd head dimension, or positions that do not match the tokens.
    """
    x = xs[0]
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary needs an even head dimension, got head_dim={D}")
    if positions.shape[-1] != x.shape[-2] or positions.dim() not in (1, 2):
        raise ValueError(f"positions must have shape (N,) or (B, N) with N = {x.shape[-2]}, got "
                         f"{tuple(positions.shape)}")
    half = D // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)  # (D/2,) = base^(-2i/D)
    angle = positions.double()[..., None] * freq  # (N, D/2) or (B, N, D/2)
    if angle.dim() == 3:
        angle = angle[:, None]  # (B, 1, N, D/2): the same angles for every head
    # cos and sin in float64, then cast: an angle rounded to bf16 at position 1000 is off by radians
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    def rotate(t: Tensor) -> Tensor:
        a, b = t[..., :half], t[..., half:]  # (B, H, N, D/2) each
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    out = tuple(rotate(t) for t in xs)
    return out[0] if len(out) == 1 else out


class MultiHeadAttention(nn.Module):
    """Projections around ``attnmem.attention``; every registered method is reachable here.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: query heads.
        kv_heads: key/value heads (GQA/MQA); must divide ``n_heads``. Default ``n_heads``.
        method: "auto" or a registered name. Methods with learned parameters or state
            (``MethodInfo.stateful``) build their own inner module here.
        causal: apply the causal mask in every call.
        bias: use biases in the projections.
        sequence_parallel: an ``attnmem.distributed.SequenceParallel``: the sequence is split
            across the ranks of a process group and attention runs under its scheme (ring,
            Ulysses or hybrid), which receives ``method`` and the options and refuses what it
            cannot run. Default None: one process holds the whole sequence.
        score_mod: a FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)``; an
            ``nn.Module`` (e.g. ``RelativePositionBias``) is registered, so its parameters
            train with the layer.
        sinks: learn one sink logit per query head (gpt-oss), initialised to 0.
        dropout: attention dropout on the probabilities, applied only while ``self.training``;
            its pattern is drawn from torch's global generator (``torch.manual_seed`` makes it
            reproducible).
        rotary: rotate q and k by their positions (``rotary``) before the attention call, so
            every method (sparse, top-k, linear, stateful) sees them; ``forward`` then takes the
            tokens' ``positions`` (default 0 .. N - 1). Decoding caches store the rotated keys.
        rotary_base: the rotary angles' base (RoFormer's 10000; Llama 3 uses 500000). A larger
            base turns more channel pairs so slowly that they match content at any distance.
        length_scale: Scalable-Softmax (SSMax, Nakanishi 2025): multiply each query by
            ``s_h · log n``, where n is the query's context length (position + 1 when causal,
            whatever window or mask the method then applies; the sequence length otherwise)
            and ``s_h`` is learned per head, initialised to ``1 / log 128``. Softmax over n
            keys flattens as n grows ("attention fading"); this keeps a head equally sharp at
            every context length. Applied to q before the attention call, so every method and
            cache sees it; with ``sequence_parallel`` it needs ``causal=True`` (a non-causal
            query's n would be one rank's share of the sequence).
        **options: the method's options.

    Shapes: ``forward(x)`` takes (B, N, d_model) and returns (B, N, d_model).

    Raises:
        ValueError: sizes that do not divide, or an unknown method/option.
    """

    def __init__(self, d_model: int, n_heads: int, *, kv_heads: int | None = None,
                 method: str = "auto", causal: bool = False, bias: bool = False,
                 sequence_parallel: Any = None, score_mod: Any = None, sinks: bool = False,
                 dropout: float = 0.0, rotary: bool = False, rotary_base: float = ROTARY_BASE,
                 length_scale: bool = False, **options: Any):
        super().__init__()
        for name, val in (("rotary", rotary), ("length_scale", length_scale)):
            if not isinstance(val, bool):
                raise TypeError(f"{name} must be a bool, got {type(val).__name__}")
        kv_heads = n_heads if kv_heads is None else kv_heads
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("kv_heads", kv_heads)):
            check_positive_int(name, val)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by kv_heads={kv_heads}")
        self.d_model, self.n_heads, self.kv_heads = d_model, n_heads, kv_heads
        self.head_dim = d_model // n_heads
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got d_model / n_heads = {self.head_dim}")
        self.rotary, self.rotary_base = rotary, check_rotary_base(rotary_base)
        if length_scale and sequence_parallel is not None and not causal:
            raise ValueError("length_scale with sequence_parallel needs causal=True: a non-causal query's "
                             "context length would be read off one rank's share of the sequence")
        self.length_scale = (nn.Parameter(torch.full((n_heads,), 1.0 / math.log(LENGTH_SCALE_INIT_KEYS)))
                             if length_scale else None)
        self.method, self.causal, self.options = method, causal, dict(options)
        self.sequence_parallel = sequence_parallel
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.inner: nn.Module | None = None
        if method != "auto":
            m = registry.get(method)
            opts = m.make_options(options)
            if m.stateful or m.has_module:
                self.inner = m.build_module(heads=n_heads, kv_heads=kv_heads,
                                            head_dim=self.head_dim, opts=opts)
        self._init_mods(score_mod, sinks, dropout)

    def _init_mods(self, score_mod: Any, sinks: bool, dropout: float) -> None:
        if score_mod is not None and not callable(score_mod):
            raise TypeError(f"score_mod must be None or a callable, got {type(score_mod).__name__}")
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool, got {type(sinks).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        used = [n for n, on in (("score_mod", score_mod is not None), ("sinks", sinks), ("dropout", dropout > 0)) if on]
        if used and (self.inner is not None or self.sequence_parallel is not None):
            where = "sequence_parallel" if self.sequence_parallel is not None else f"method {self.method!r}'s module"
            raise ValueError(f"{', '.join(used)} cannot be applied by {where}; use a functional exact method")
        self.score_mod = score_mod  # an nn.Module here is registered as a submodule
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if sinks else None
        self.dropout = float(dropout)

    def split_heads(self, x: Tensor, heads: int) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def project(self, x: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, d_model) -> q (B, Hq, N, D), k and v (B, Hkv, N, D); with ``rotary``, q and k
        rotated by ``positions`` ((N,) or (B, N); default 0 .. N - 1); with ``length_scale``, q
        multiplied by ``s_h · log n``."""
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(x), self.kv_heads)
        v = self.split_heads(self.v_proj(x), self.kv_heads)
        if positions is None and (self.rotary or self.length_scale is not None):
            positions = torch.arange(x.shape[1], device=x.device)
        if self.rotary:
            q, k = rotary(q, k, positions=positions, base=self.rotary_base)  # one table of angles for both
        if self.length_scale is not None:
            q = q * self.length_factor(positions, x.shape[1]).to(q.dtype)
        return q, k, v

    def length_factor(self, positions: Tensor, n: int) -> Tensor:
        """``s_h · log(keys seen)`` per head and query: (1, H, N, 1), or (B, H, N, 1) for (B, N)
        positions. A causal query at position p sees p + 1 keys; otherwise all n."""
        keys = positions.double() + 1 if self.causal else torch.full(positions.shape, float(n),
                                                                          dtype=torch.float64,
                                                                          device=positions.device)
        logn = keys.log()
        logn = logn[None, None] if logn.dim() == 1 else logn[:, None]  # (1 or B, 1, N)
        return (self.length_scale.double()[:, None] * logn)[..., None]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Any = None) -> Tensor:
        if self.sequence_parallel is not None:
            return self.sequence_parallel.attend(q, k, v, causal=self.causal, mask=mask, method=self.method,
                                                 **self.options)
        if self.inner is not None:
            return self.inner(q, k, v, causal=self.causal, mask=mask)
        mods: dict[str, Any] = {}
        if self.score_mod is not None:
            mods["score_mod"] = self.score_mod
        if self.sinks is not None:
            mods["sinks"] = self.sinks.to(q.dtype)
        if self.dropout and self.training:
            mods["dropout_p"] = self.dropout
        return attention(q, k, v, method=self.method, causal=self.causal, mask=mask, **mods, **self.options)

    def forward(self, x: Tensor, *, mask: Any = None, cache: Any = None, positions: Tensor | None = None) -> Tensor:
        """``cache``: an ``attnmem.nn.cache.LayerCache``; x then holds the new tokens only, which
        attend to the cached ones and are stored (decoding). Masks do not combine with a cache.
        ``positions``: the tokens' positions, (N,) or (B, N), used by ``rotary`` only."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        if cache is not None and mask is not None:
            raise ValueError("mask and cache do not combine; the cache kind sets the decoding pattern")
        q, k, v = self.project(x, positions)
        out = self.attend(q, k, v, mask) if cache is None else cache.attend(self, q, k, v)  # (B, Hq, N, D)
        B, _, N, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.d_model))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, kv_heads={self.kv_heads}, "
                f"method={self.method!r}, causal={self.causal}"
                + (f", rotary=True, rotary_base={self.rotary_base:g}" if self.rotary else "")
                + (", length_scale=True" if self.length_scale is not None else ""))


