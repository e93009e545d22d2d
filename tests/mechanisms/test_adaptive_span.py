"""adaptive_span: exact causal attention when spans cover everything, its own dense definition
otherwise (span gradients included), the band restriction, the module and bad options."""

import math

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem.mechanisms.adaptive_span import AdaptiveSpanAttention, adaptive_span_attention
from attnmem.memory.measure import measure

from ..conftest import compare_with_reference, rand_qkv


def dense_definition(q, k, v, spans, ramp, mask=None):
    """Sukhbaatar et al. eq. (2)-(3) on the full matrix: weights m_z(i - j)·exp(s_ij), normalised."""
    B, Hq, nq, D = q.shape
    nk = k.shape[2]
    G = Hq // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    x = (torch.arange(nq)[:, None] + nk - nq - torch.arange(nk)[None, :]).to(q.dtype)  # distance
    if ramp == 0:
        m = (x[None] <= spans[:, None, None]).to(q.dtype)
    else:
        m = ((ramp + spans[:, None, None] - x[None]) / ramp).clamp(0, 1)
    m = m * (x >= 0)
    if mask is not None:
        m = m * mask.to_dense(nq, nk)
    w = torch.exp(s - s.amax(-1, keepdim=True)) * m
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v.repeat_interleave(G, 1)


@pytest.mark.parametrize("shape", [(1, 2, 2, 37, 37, 16), (2, 4, 2, 50, 70, 24), (1, 4, 1, 70, 50, 16)])
def test_spans_covering_everything_with_no_ramp_is_causal_exact(shape):
    B, Hq, Hkv, nq, nk, D = shape
    q, k, v = rand_qkv(B, Hq, Hkv, nq, nk, D)
    spans = tuple(float(nk + h) for h in range(Hq))
    compare_with_reference("adaptive_span_fixed", q, k, v, causal=True, spans=spans, ramp=0, q_tile=16)
    compare_with_reference("adaptive_span_fixed", q, k, v, causal=True, spans=float(nk), ramp=0)


@pytest.mark.parametrize("ramp,mask", [(0, None), (5, None), (3, M.sliding_window(9, 3))])
def test_matches_its_dense_definition_with_span_gradients(ramp, mask):
    q, k, v = rand_qkv(1, 4, 2, 50, 60, 16)
    # Non-integer spans: at integer z + R the ramp's kink would meet a key exactly.
    spans = torch.tensor([3.3, 9.1, 14.6, 20.2], dtype=torch.float64, requires_grad=True)
    out = adaptive_span_attention(q, k, v, spans=spans, ramp=ramp, mask=mask, q_tile=16)
    want = dense_definition(q, k, v, spans, ramp, mask)
    assert torch.allclose(out, want, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, spans), g, allow_unused=True)
    ref = torch.autograd.grad(want, (q, k, v, spans), g, allow_unused=True)
    for name, a, b in zip(("q", "k", "v", "spans"), got, ref):
        if b is None:  # ramp 0: a step, no gradient to the spans in either
            assert a is None or torch.equal(a, torch.zeros_like(a))
            continue
        assert torch.allclose(a, b, atol=1e-10), f"d{name}"


def test_span_gradient_matches_finite_differences():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 8, grad=False)
    spans = torch.tensor([6.3, 11.7], dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 40, 8, dtype=torch.float64)

    def loss(z):
        return (adaptive_span_attention(q, k, v, spans=z, ramp=4, q_tile=8) * g).sum()

    grad, = torch.autograd.grad(loss(spans), spans)
    eps = 1e-6
    for h in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[h] = eps
        fd = (loss(spans.detach() + e) - loss(spans.detach() - e)) / (2 * eps)
        assert abs(grad[h].item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item())), (h, grad, fd)
    assert (grad != 0).all()


def test_module_learns_spans_through_multihead_attention():
    mha = attnmem.nn.MultiHeadAttention(32, 4, kv_heads=2, method="adaptive_span", causal=True,
                                        max_span=16, ramp=4, init_span=6.0).double()
    inner = mha.inner
    assert isinstance(inner, AdaptiveSpanAttention)
    assert torch.allclose(inner.current_spans(), torch.full((4,), 6.0, dtype=torch.float64))
    assert inner.span_loss().item() == pytest.approx(6.0)  # the mean span over heads
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    (mha(x).pow(2).sum() + inner.span_loss()).backward()
    assert inner.span_frac.grad is not None and (inner.span_frac.grad != 0).all()
    assert torch.isfinite(inner.span_frac.grad).all()


def test_work_is_restricted_to_the_band():
    # Doubling N with a fixed span at most doubles memory above the floor (a mask over an
    # N×N matrix would quadruple it), and a shorter span holds less.
    h, d = 1, 8

    def extra(n, span):
        q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))

        def run(q, k, v):
            adaptive_span_attention(q, k, v, spans=float(span), ramp=8, q_tile=128).sum().backward()

        return measure(run, q, k, v, repeats=0, warmup=0).peak_bytes - 7 * h * n * d * 4

    assert extra(1024, 32) < 2.2 * extra(512, 32)
    assert extra(1024, 16) < extra(1024, 256)


@pytest.mark.parametrize("opts,match", [
    ({"spans": -1.0}, "spans must be numbers >= 0"),
    ({"spans": (1.0, -2.0)}, "spans must be numbers >= 0"),
    ({"spans": 4.0, "ramp": -1}, "ramp must be an int >= 0, got -1"),
])
def test_bad_fixed_options(opts, match):
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match=match):
        attnmem.attention(q, k, v, method="adaptive_span_fixed", causal=True, **opts)


def test_refusals_and_module_options():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="causal by definition"):
        attnmem.attention(q, k, v, method="adaptive_span_fixed", spans=4.0)
    with pytest.raises(ValueError, match="spans has 3 entries, expected one per query head"):
        attnmem.attention(q, k, v, method="adaptive_span_fixed", causal=True, spans=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spans must be >= 0"):
        adaptive_span_attention(q, k, v, spans=torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="learned parameters"):
        attnmem.attention(q, k, v, method="adaptive_span", causal=True)
    for opts, match in [({"max_span": 0}, "max_span must be an int >= 1"),
                        ({"max_span": 8, "init_span": 9}, "init_span must be in"),
                        ({"ramp": -2}, "ramp must be an int >= 0")]:
        with pytest.raises(ValueError, match=match):
            attnmem.nn.MultiHeadAttention(16, 2, method="adaptive_span", **opts)
    mha = attnmem.nn.MultiHeadAttention(16, 2, method="adaptive_span", max_span=8)
    with pytest.raises(ValueError, match="causal by definition"):
        mha(torch.randn(1, 5, 16))


def test_fused_and_plain_kernels_agree():
    # Fixed spans run in PyTorch's fused CPU operator; spans that need a gradient run the plain
    # band kernel (the operator does not return the bias gradient). Same inputs, same results.
    q, k, v = rand_qkv(2, 4, 2, 45, 60, 16)
    spans = torch.tensor([2.5, 7.2, 13.9, 30.1], dtype=torch.float64)
    mask = M.sliding_window(20, 2)
    fused = adaptive_span_attention(q, k, v, spans=spans, ramp=4, mask=mask, q_tile=16)
    plain = adaptive_span_attention(q, k, v, spans=spans.clone().requires_grad_(True), ramp=4, mask=mask, q_tile=16)
    assert torch.allclose(fused, plain, atol=1e-12)
    g = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, (q, k, v), g), torch.autograd.grad(plain, (q, k, v), g)):
        assert torch.allclose(a, b, atol=1e-12)
