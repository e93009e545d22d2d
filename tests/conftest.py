"""Shared helpers: random inputs and the float64 reference comparison."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import registry
from attnmem.reference import reference_attention


def rand_qkv(B=1, Hq=2, Hkv=None, Nq=16, Nk=None, D=16, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hq if Hkv is None else Hkv
    Nk = Nq if Nk is None else Nk
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def compare_with_reference(method, q, k, v, *, causal=False, mask=None, scale=None, tol=1e-10,
                           **options):
    """Run ``method`` and the float64 reference; assert outputs and all gradients agree."""
    out = attnmem.attention(q, k, v, method=method, causal=causal, mask=mask, scale=scale,
                            **options)
    inp = attnmem.validate(q, k, v, causal=causal, mask=mask, scale=scale)
    ref = reference_attention(q, k, v, mask=inp.mask, scale=inp.scale)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "output has NaN/inf"
    assert rel_err(out, ref) <= tol, f"output rel err {rel_err(out, ref)}"
    if out.numel() and any(t.requires_grad for t in (q, k, v)):
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
        want = torch.autograd.grad(ref, (q, k, v), g, allow_unused=True)
        for name, a, b in zip("qkv", got, want):
            a = torch.zeros_like(b) if a is None else a
            assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
            assert rel_err(a, b) <= tol, f"d{name} rel err {rel_err(a, b)}"
    return out


def compare_or_refused(method, q, k, v, *, causal=False, mask=None, **options):
    """``compare_with_reference`` where ``method`` supports the call; where it does not, the
    call must raise its "cannot run" ValueError (and None is returned)."""
    inp = attnmem.validate(q, k, v, causal=causal, mask=mask)
    m = registry.get(method)
    if m.not_supported_reasons(inp, m.make_options(options)):
        with pytest.raises(ValueError, match="cannot run"):
            attnmem.attention(q, k, v, method=method, causal=causal, mask=mask, **options)
        return None
    return compare_with_reference(method, q, k, v, causal=causal, mask=mask, **options)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_ops_softcap(monkeypatch):
    """Softcap calls on the torch-ops tile kernels (``kernels.tile.softcap_forward``), as on a
    machine where the native kernel cannot be built."""
    from attnmem.kernels import native

    monkeypatch.setattr(native, "available", lambda: False)
