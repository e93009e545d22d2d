"""The CUDA paths: SDPA dispatch, FlexAttention over attnmem's block maps, the torch tile
kernel, and memory measured by the CUDA allocator. Each against the float64 reference on the
same device (float32/low precision: FlashAttention's rule, at most 2 × plain PyTorch's error).

Skipped where ``torch.cuda.is_available()`` is False; ``benchmarks/gpu_check.py`` runs the same
paths at larger sizes and records figures.
"""

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import registry
from attnmem.kernels import flex_available, flex_block_mask
from attnmem.reference import reference_attention

from ..conftest import compare_or_refused, rand_qkv, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")


def _cuda(*ts, dtype=None):
    return tuple(t.detach().to("cuda", dtype=dtype or t.dtype).requires_grad_(t.requires_grad) for t in ts)


@pytest.mark.parametrize("method,opts", [("sdpa", {}), ("chunked", {"kernel": "torch", "q_tile": 32, "kv_tile": 48})])
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (True, M.sliding_window(17, 5))])
def test_exact_methods_on_cuda_float64(method, opts, causal, mask):
    """Exact up to float64 rounding, GQA included (CUDA SDPA indexes K/V heads, no copy)."""
    q, k, v = _cuda(*rand_qkv(1, 4, 2, 113, 113, 40))
    compare_or_refused(method, q, k, v, causal=causal, mask=mask, **opts)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_reaches_the_flash_kernel(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _cuda(*rand_qkv(2, 4, 4, 256, 256, 64, grad=False), dtype=torch.float16)
    assert registry.choose(attnmem.validate(q, k, v, causal=causal), {}).method.name == "sdpa"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = attnmem.attention(q, k, v, method="sdpa", causal=causal)
    ref = reference_attention(*(t.double() for t in (q, k, v)), mask=M.causal() if causal else None)
    plain = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    # fp16 output against the float64 reference: within 2 × the float32-computed error plus
    # fp16 output rounding (2^-11 relative).
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 2**-10


@pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention does not import")
@pytest.mark.parametrize("method,causal,opts", [
    ("sliding_window", True, dict(window=(63, 0))),
    ("longformer", False, dict(window=16, global_tokens=(0, 77))),
    ("bigbird", False, dict(block=32, random_blocks=2)),
])
def test_sparse_methods_through_flex_attention(method, causal, opts):
    q64, k64, v64 = _cuda(*rand_qkv(1, 4, 2, 384, 384, 64))
    q, k, v = _cuda(q64, k64, v64, dtype=torch.float32)
    m = registry.get(method)
    mask = m.effective_mask(attnmem.validate(q, k, v, causal=causal), m.make_options(opts))
    out = attnmem.attention(q, k, v, method=method, causal=causal, **opts)
    ref = reference_attention(q64, k64, v64, mask=mask)
    plain = reference_attention(q, k, v, mask=mask)
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    base = torch.autograd.grad(plain, (q, k, v), g)
    for a, b, c in zip(got, want, base):
        assert (a.double() - b).abs().max() <= 2 * (c.double() - b).abs().max() + 1e-6


@pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention does not import")
def test_flex_block_mask_lives_on_cuda_and_lists_the_block_map():
    mask = M.causal() & M.bigbird(128, 3, 2, 2)
    bm = mask.block_map(2048, 2048, 128, 128)
    block_mask = flex_block_mask(bm, mask.mask_fn(2048, 2048), "cuda")
    assert block_mask.kv_num_blocks.is_cuda
    assert torch.equal(block_mask.to_dense()[0, 0].bool().cpu(), bm.dense_states() != M.EMPTY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_tile_kernel_low_precision(dtype):
    q64, k64, v64 = _cuda(*rand_qkv(1, 8, 2, 515, 515, 80, grad=False))
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    out = attnmem.attention(q, k, v, method="chunked", causal=True, kernel="torch", q_tile=64, kv_tile=128)
    ref = reference_attention(q64, k64, v64, mask=M.causal())
    plain = reference_attention(q, k, v, mask=M.causal())
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6
    assert rel_err(out.double(), ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_measure_agrees_with_the_cuda_allocator():
    """attnmem.measure's tracked peak against torch.cuda.max_memory_allocated over the same
    step (above the baseline, plus the inputs allocated before it): within 10 % + 64 MiB of
    allocator rounding and library workspaces."""
    q, k, v = _cuda(*rand_qkv(1, 8, 8, 4096, 4096, 64, dtype=torch.float32))

    def step(q, k, v):
        attnmem.attention(q, k, v, method="chunked", causal=True, kernel="torch").sum().backward()

    step(q, k, v)  # kernels and workspaces warmed up outside the window
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tracked = attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes
    torch.cuda.synchronize()
    allocator = torch.cuda.max_memory_allocated() - base + 3 * q.numel() * q.element_size()
    assert abs(allocator - tracked) <= 0.10 * tracked + 64 * 2**20, (allocator, tracked)
