"""Low-precision error of a method against FlashAttention's rule, on one (Nq, Nk).

Rule (flash-attention's tests): with the reference computed in float64 from the *same*
low-precision inputs, the method's max-abs error on out, dq, dk and dv is at most twice plain
PyTorch's (eager softmax attention computed in the low dtype). ``tests/kernels/test_lowprec.py``
checks it at small sizes, ``benchmarks/lowprec.py`` prints the ratios at large ones.
"""

from __future__ import annotations

import torch

from .. import masks
from ..api import attention
from ..masks import Mask
from ..reference import reference_attention
from ..registry import get

GRADIENTS = ("out", "dq", "dk", "dv")


def method_mask(method: str, options: dict, causal: bool) -> Mask | None:
    """The pairs ``method`` attends to under ``options``: its sparse pattern (if it has one),
    with causal."""
    causal_mask = masks.combine(causal, None)
    m = get(method)
    if not hasattr(m, "pattern"):
        return causal_mask
    pattern = m.pattern(m.make_options(options))
    return pattern if causal_mask is None else causal_mask & pattern


def precision_errors(method: str, options: dict, nq: int, nk: int, dtype: torch.dtype, *, causal: bool = False,
                     hq: int = 8, hkv: int = 1, d: int = 16) -> list[tuple[str, float, float]]:
    """(name, method error, plain PyTorch error) for out, dq, dk, dv at B = 1, seeded by the sizes."""
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    dout = torch.randn(1, hq, nq, d, generator=g).to(dtype)
    mask = method_mask(method, options, causal)

    def run(fn, dt):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return [out, *torch.autograd.grad(out, x, dout.to(dt))]

    ref = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), torch.float64)
    plain = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), dtype)
    got = run(lambda a, b, c: attention(a, b, c, method=method, causal=causal, **options), dtype)
    return [(name, (x.double() - r).abs().max().item(), (y.double() - r).abs().max().item())
            for name, x, y, r in zip(GRADIENTS, got, plain, ref)]


__all__ = ["GRADIENTS", "method_mask", "precision_errors"]
