"""bfloat16 / float16 outputs and gradients against FlashAttention's rule.

Rule (flash-attention's tests): with the reference computed in float64 from the *same*
low-precision inputs, the method's max-abs error is at most twice plain PyTorch's (eager
softmax attention computed in the low dtype). An absolute slack of ``ATOL`` (float32 rounding,
~1/40 of a bfloat16 ulp at 1) covers cases where PyTorch is exact by cancellation (Nk = 1 gives
dq = 0 exactly in eager bf16, and ~1e-7 after a float32 recomputation).

Grid: FlashAttention's awkward sizes with Hq = 8, Hkv = 1 (MQA), B = 1 and a small head dim to
keep the suite fast; ``benchmarks/lowprec.py`` runs the large sizes for every method.
"""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem.reference import reference_attention
from attnmem.registry import get as get_method

ATOL = 1e-5
EXACT = [
    ("chunked", {"q_tile": 16}),
    ("chunked", {}),
    ("sliding_window", {"window": 64}),
    ("dilated", {"window": 16}),
    ("longformer", {"window": 32, "global_tokens": (0, 50)}),
    ("strided", {"stride": 16}),
]


def _pattern(method: str, options: dict, causal: bool):
    inp_mask = attnmem.masks.combine(causal, None)
    m = get_method(method)
    if hasattr(m, "pattern"):
        pat = m.pattern(m.make_options(options))
        return pat if inp_mask is None else inp_mask & pat
    return inp_mask


def errors(method: str, options: dict, nq: int, nk: int, dtype: torch.dtype, causal: bool = False,
           hq: int = 8, hkv: int = 1, d: int = 16) -> list[tuple[str, float, float]]:
    """(name, method error, plain PyTorch error) for out, dq, dk, dv."""
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    dout = torch.randn(1, hq, nq, d, generator=g).to(dtype)
    mask = _pattern(method, options, causal)

    def run(fn, dt):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return [out, *torch.autograd.grad(out, x, dout.to(dt))]

    ref = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), torch.float64)
    plain = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), dtype)
    got = run(lambda a, b, c: attnmem.attention(a, b, c, method=method, causal=causal, **options), dtype)
    return [(name, (x.double() - r).abs().max().item(), (y.double() - r).abs().max().item())
            for name, x, y, r in zip(("out", "dq", "dk", "dv"), got, plain, ref)]


def assert_rule(errs):
    for name, mine, plain in errs:
        assert mine <= 2 * plain + ATOL, f"{name}: error {mine:.3g} > 2 × PyTorch's {plain:.3g}"


@pytest.mark.parametrize(("method", "options"), EXACT, ids=[f"{m}-{o}" for m, o in EXACT])
@pytest.mark.parametrize(("nq", "nk"), [(113, 203), (512, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_every_exact_method(method, options, nq, nk, causal):
    assert_rule(errors(method, options, nq, nk, torch.bfloat16, causal=causal))


def test_bf16_bigbird():
    assert_rule(errors("bigbird", {"block": 16}, 256, 256, torch.bfloat16))


@pytest.mark.parametrize(("nq", "nk"), [(1023, 1024), (4096, 64)])
def test_bf16_large_sizes_chunked(nq, nk):
    assert_rule(errors("chunked", {}, nq, nk, torch.bfloat16, d=8))


@pytest.mark.parametrize(("method", "options"), [EXACT[0], EXACT[2]])
def test_fp16(method, options):
    """float16 runs the plain PyTorch tile kernel (the fused operator has no float16)."""
    assert_rule(errors(method, options, 113, 203, torch.float16, causal=True))


def test_issue_repro_dv_is_the_sum_of_upstream_rows():
    """Issue 17's repro: Nq = 512, Nk = 1, q_tile = 16. P = 1, so dV = Σ_i dO_i, and summing
    in float32 then rounding once gives the correctly rounded sum in every element."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 64, generator=g).to(torch.bfloat16).requires_grad_() for n in (512, 1, 1))
    dout = torch.randn(1, 1, 512, 64, generator=g).to(torch.bfloat16)
    out = attnmem.attention(q, k, v, method="chunked", q_tile=16)
    dv = torch.autograd.grad(out, v, dout)[0]
    want = dout.double().sum(2, keepdim=True).to(torch.bfloat16)
    assert torch.equal(dv, want), f"{(dv != want).sum().item()} of 64 elements differ"
