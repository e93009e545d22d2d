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
from attnmem.bench.precision import precision_errors

ATOL = 1e-5
EXACT = [
    ("chunked", {"q_tile": 16}),
    ("chunked", {}),
    ("sliding_window", {"window": 64}),
    ("dilated", {"window": 16}),
    ("longformer", {"window": 32, "global_tokens": (0, 50)}),
    ("strided", {"stride": 16}),
]


def assert_rule(errs):
    for name, mine, plain in errs:
        assert mine <= 2 * plain + ATOL, f"{name}: error {mine:.3g} > 2 × PyTorch's {plain:.3g}"


@pytest.mark.parametrize(("method", "options"), EXACT, ids=[f"{m}-{o}" for m, o in EXACT])
@pytest.mark.parametrize(("nq", "nk"), [(113, 203), (512, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_every_exact_method(method, options, nq, nk, causal):
    assert_rule(precision_errors(method, options, nq, nk, torch.bfloat16, causal=causal))


def test_bf16_bigbird():
    assert_rule(precision_errors("bigbird", {"block": 16}, 256, 256, torch.bfloat16))


@pytest.mark.parametrize(("nq", "nk"), [(1023, 1024), (4096, 64)])
def test_bf16_large_sizes_chunked(nq, nk):
    assert_rule(precision_errors("chunked", {}, nq, nk, torch.bfloat16, d=8))


@pytest.mark.parametrize(("method", "options"), [EXACT[0], EXACT[2]])
def test_fp16(method, options):
    """float16 runs the plain PyTorch tile kernel (the fused operator has no float16)."""
    assert_rule(precision_errors(method, options, 113, 203, torch.float16, causal=True))


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
