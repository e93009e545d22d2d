"""Every exact method against the float64 reference: outputs and all three gradients.

The matrix is generated from the registry, so a method is tested the day it is registered;
cases a method does not support (its ``not_supported_reasons``) are checked to be refused
with a reason instead of run.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmem
from attnmem import masks as M

from ..conftest import compare_or_refused, compare_with_reference, rand_qkv

# Sparse methods are exact under their own pattern, not full attention: tests/test_sparse.py
# compares them with the reference given that pattern as a dense mask.
EXACT = [m.name for m in attnmem.methods()
         if m.exact and not m.stateful and m.name != "reference" and m.family != "sparse"]

SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D)
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 7, 7, 16),
    (1, 2, 2, 113, 113, 64),
    (1, 4, 2, 113, 203, 80),   # GQA, Nq != Nk, awkward head dim
    (1, 4, 1, 203, 113, 16),   # MQA, Nq > Nk (rows with nothing to attend under causal)
    (1, 1, 1, 1000, 1000, 16),
]


def _mask_cases(Nq, Nk):
    g = torch.Generator().manual_seed(Nq + Nk)
    return {
        "none": (False, None),
        "causal": (True, None),
        "window": (False, M.sliding_window(17, 5)),
        "causal_window": (True, M.sliding_window(9, 0)),
        "document": (False, M.document(torch.arange(Nq) // 37, torch.arange(Nk) // 37)),
        "random_dense": (False, torch.rand(Nq, Nk, generator=g) < 0.3),
        "head_dense": (True, torch.rand(1, 1, Nq, Nk, generator=g) < 0.5),
        "mod": (False, M.from_mod(lambda b, h, q, k: (h % 2 == 0) | (k % 3 == 0))),
    }


# The N = 1000 shape runs the structured cases only; the small shapes cover every mask kind.
CASES = [
    pytest.param(shape, case, id=f"{'x'.join(map(str, shape))}-{case}")
    for shape in SHAPES
    for case in _mask_cases(1, 1)
    if shape[3] * shape[4] <= 200_000 or case in ("none", "causal", "window")
]


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("shape,case", CASES)
def test_exact_against_reference(method, shape, case):
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = rand_qkv(B, Hq, Hkv, Nq, Nk, D)
    causal, mask = _mask_cases(Nq, Nk)[case]
    compare_or_refused(method, q, k, v, causal=causal, mask=mask)


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 48), (64, 16)])
def test_chunked_kernels_and_tiles(kernel, tiles):
    q, k, v = rand_qkv(2, 4, 2, 150, 131, 40)
    for causal, mask in _mask_cases(150, 131).values():
        compare_with_reference("chunked", q, k, v, causal=causal, mask=mask,
                               q_tile=tiles[0], kv_tile=tiles[1], kernel=kernel)


def test_custom_scale():
    q, k, v = rand_qkv(1, 2, 2, 33, 33, 16)
    for method in EXACT:
        compare_with_reference(method, q, k, v, scale=0.37)


def test_rows_with_nothing_to_attend_are_zero_with_zero_grads():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16)
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[5] = False
    mask[30:] = False
    for method, opts in [("chunked", dict(q_tile=16, kv_tile=16)), ("reference", {})]:
        out = attnmem.attention(q, k, v, method=method, mask=mask, **opts)
        assert torch.isfinite(out).all()
        assert (out[:, :, 5] == 0).all() and (out[:, :, 30:] == 0).all()
        dq, = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(dq).all() and (dq[:, :, 5] == 0).all()
    out = compare_with_reference("sdpa", q, k, v, mask=mask)
    assert (out[:, :, 30:] == 0).all()


def test_zero_length_sequences():
    for nq, nk in [(0, 5), (0, 0), (5, 0)]:
        q, k, v = rand_qkv(1, 2, 2, nq, nk, 16)
        for method in ["chunked", "reference", "auto"]:
            out = attnmem.attention(q, k, v, method=method)
            assert out.shape == (1, 2, nq, 16)
            assert (out == 0).all()
            out.sum().backward()


def test_gradcheck_chunked():
    q, k, v = rand_qkv(1, 2, 1, 9, 11, 8)
    for kernel in ["fused", "torch"]:
        for causal, mask in [(False, None), (True, None), (False, M.sliding_window(3, 1))]:
            def f(q, k, v, causal=causal, mask=mask, kernel=kernel):
                return attnmem.attention(q, k, v, method="chunked", causal=causal, mask=mask,
                                         q_tile=4, kv_tile=3, kernel=kernel)
            assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_low_precision_error_is_near_sdpa(dtype, tol):
    """flash-attention's rule: error against float64 at most twice PyTorch's own (plus slack)."""
    q64, k64, v64 = rand_qkv(1, 4, 2, 300, 300, 64, grad=False)
    ref = attnmem.attention(q64, k64, v64, method="reference", causal=True)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    ours = attnmem.attention(q, k, v, method="chunked", causal=True, q_tile=64, kv_tile=64)
    kr, vr = (t.repeat_interleave(2, 1) for t in (k, v))
    theirs = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    err_ours = (ours.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + tol


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), Nq=st.integers(1, 70),
       Nk=st.integers(1, 70), D=st.sampled_from([8, 16, 24]), causal=st.booleans(),
       density=st.floats(0, 1), qt=st.integers(1, 40), kt=st.integers(1, 40),
       kernel=st.sampled_from(["fused", "torch"]))
def test_chunked_property(B, Hkv, G, Nq, Nk, D, causal, density, qt, kt, kernel):
    q, k, v = rand_qkv(B, Hkv * G, Hkv, Nq, Nk, D, seed=Nq * 7 + Nk)
    mask = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(Nq)) < density
    compare_with_reference("chunked", q, k, v, causal=causal, mask=mask, q_tile=qt, kv_tile=kt,
                           kernel=kernel)


def test_gqa_does_not_expand_kv():
    """The chunked path never allocates K/V with Hq heads: no (·, Hq, Nk, ·) tensor appears."""
    from attnmem.memory.measure import LiveTensorTracker

    q, k, v = rand_qkv(1, 8, 1, 100, 256, 16, dtype=torch.float32)
    shapes = []

    class Spy(LiveTensorTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    for kernel in ["fused", "torch"]:
        with Spy():
            out = attnmem.attention(q, k, v, method="chunked", causal=True, q_tile=32,
                                    kernel=kernel)
            out.sum().backward()
    assert shapes
    assert not [s for s in shapes if len(s) == 4 and s[1] == 8 and s[2] == 256], shapes
