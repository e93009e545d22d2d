"""``attnmem.attention``: validate once, then dispatch by name or automatically."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from . import registry
from .masks import Mask, as_mask, combine
from .registry import Inputs


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def validate(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Any = None,
             scale: float | None = None) -> Inputs:
    """Check an attention call and return its ``Inputs``; ValueError/TypeError otherwise."""
    q, k, v = (_check_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k/v have B={k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has D={D}, k/v have D={k.shape[3]}")
    Hkv = k.shape[1]
    if Hq == 0 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a positive multiple of key/value heads, got Hq={Hq}, Hkv={Hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    user_mask: Mask | None = None
    if mask is not None:
        user_mask = as_mask(mask, "mask")
        user_mask.check(B, Hq, nq, k.shape[2])
    return Inputs(q, k, v, causal, user_mask, combine(causal, user_mask), float(scale))


def is_empty(inp: Inputs) -> bool:
    """True when the call has no work: no batch, no query rows or no head dim (the output is
    empty), or no keys (every row attends to nothing, so it is zeros)."""
    return min(inp.batch, inp.nq, inp.head_dim, inp.nk) == 0


class _NoWork(torch.autograd.Function):
    """The output of a call with no work: zeros of q's shape, and zero gradients for q, k, v
    (no output reads any input). Computed here once, so no kernel meets a zero-size tensor."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx.like = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.zeros_like(q, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)
def validate_mods(inp: Inputs, *, score_mod: Any = None, sinks: Any = None, dropout_p: Any = 0.0,
                  dropout_seed: Any = None, return_lse: Any = False) -> Inputs:
    """Check the score modifications of a call and add them to its ``Inputs``."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError("score_mod must be None or a callable score_mod(score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"sinks must be None or a tensor of shape ({inp.q_heads},), got {type(sinks).__name__}")
        if sinks.shape != (inp.q_heads,):
            raise ValueError(f"sinks must have shape (Hq,) = ({inp.q_heads},), one logit per query head, "
                             f"got {tuple(sinks.shape)}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
        if sinks.device != inp.q.device:
            raise ValueError(f"sinks must be on q's device {inp.q.device}, got {sinks.device}")
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and not isinstance(dropout_seed, torch.Generator) and (
            isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise TypeError(f"dropout_seed must be None, an int or a torch.Generator, got {type(dropout_seed).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return dataclasses.replace(inp, score_mod=score_mod, sinks=sinks, dropout_p=float(dropout_p),
                               dropout_seed=dropout_seed, return_lse=return_lse)


def no_work(inp: Inputs) -> Tensor | tuple[Tensor, Tensor]:
    """The result of a call with no work (``is_empty``): zeros, and with ``return_lse`` the
    log-sum-exp of rows that attend to nothing: -inf, or the sink logit of the row's head."""
    out = _NoWork.apply(inp.q, inp.k, inp.v)
    if not inp.return_lse:
        return out
    B, Hq, nq = inp.q.shape[:3]
    lse = torch.full((B, Hq, nq), -math.inf, dtype=torch.float32, device=inp.q.device)
    if inp.sinks is not None:
        lse = lse.maximum(inp.sinks.float()[None, :, None].expand(B, Hq, nq))  # (B, Hq, Nq)
    return out, lse


def attention(q: Tensor, k: Tensor, v: Tensor, *, method: str = "auto", causal: bool = False,
              mask: Any = None, scale: float | None = None, check_finite: bool = False,
              score_mod: Any = None, sinks: Tensor | None = None, dropout_p: float = 0.0,
              dropout_seed: int | torch.Generator | None = None, return_lse: bool = False,
              **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention through any registered method.

    Args:
        q: queries (B, Hq, Nq, D).
        k, v: keys and values (B, Hkv, Nk, D), with ``Hq % Hkv == 0`` (GQA/MQA).
        method: "auto" or a registered name (``attnmem.methods()``).
        causal: bottom-right aligned causal mask (``attnmem.masks`` explains the alignment).
        mask: None, a bool tensor broadcastable to (B, Hq, Nq, Nk) (True = attend), or an
            ``attnmem.masks.Mask``.
        scale: multiplier of QKᵀ; default ``1/sqrt(D)``.
        check_finite: raise ValueError if q, k or v holds NaN or ±inf. Off by default: the
            check costs a pass over the inputs, and NaN otherwise propagates to the rows that
            read it (which rows depends on the method and on the tiles it skips).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied
            to the scaled scores before the mask, with raw indices (``attnmem.scores`` has
            softcap, ALiBi and T5's relative bias). Gradients reach the tensors it captures.
        sinks: (Hq,) logits, one per query head, added to each row's softmax denominator
            (gpt-oss): ``p_ij = exp(s_ij) / (exp(sink_h) + Σ_j exp(s_ij))``; learnable.
        dropout_p: inverted dropout on the normalised probabilities, ``out = (P ∘ Z) V`` with
            ``Z = 0`` with probability p, else ``1/(1-p)`` (unbiased). Applied whenever > 0:
            pass 0.0 at evaluation (``attnmem.nn`` does so outside training).
        dropout_seed: an int (same seed → same pattern, output and gradients), a
            ``torch.Generator`` (one seed is drawn from it) or None (drawn from torch's global
            generator). The pattern is a hash of (seed, b, h, q_idx, kv_idx), regenerated per
            tile in the backward, never stored.
        return_lse: also return the per-row log-sum-exp (B, Hq, Nq) (float32, or float64 for
            float64 inputs; sinks included; -inf for a row with nothing to attend), for
            ``attnmem.merge``; it carries gradients.
        **options: the method's own options (``window=...``, ``q_tile=...``).

    Returns:
        (B, Hq, Nq, D), or ``(out, lse)`` with ``return_lse``. Rows with nothing to attend are
        zeros, with zero gradients; so is a call with no keys (Nk = 0). A call with B, Nq or
        D = 0 returns its empty output (and empty gradients) without running a kernel; zero
        heads are refused.

    Raises:
        TypeError: wrong types, dtypes, or an unknown option.
        ValueError: mismatched shapes, devices, masks, an unknown method, or a method that
            does not support the inputs (the message lists its reasons).
    """
    inp = validate(q, k, v, causal=causal, mask=mask, scale=scale)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__} {check_finite!r}")
    inp = validate_mods(inp, score_mod=score_mod, sinks=sinks, dropout_p=dropout_p,
                        dropout_seed=dropout_seed, return_lse=return_lse)
    if check_finite:
        for name, t in (("q", inp.q), ("k", inp.k), ("v", inp.v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf (check_finite=True)")
    if not isinstance(method, str):
        raise TypeError(f"method must be a str (a registered name or 'auto'), got {type(method).__name__}")
    if method == "auto":
        chosen = registry.choose(inp, options).method
        opts = chosen.make_options(options)
        return no_work(inp) if is_empty(inp) else chosen.forward(inp, opts)
    m = registry.get(method)
    if m.stateful:
        raise ValueError(
            f"method {method!r} has learned parameters or state; use "
            f"attnmem.nn.MultiHeadAttention(..., method={method!r})"
        )
    opts = m.make_options(options)
    reasons = m.not_supported_reasons(inp, opts)
    if reasons:
        raise ValueError(f"method {method!r} cannot run these inputs: {'; '.join(reasons)}")
    return no_work(inp) if is_empty(inp) else m.forward(inp, opts)
