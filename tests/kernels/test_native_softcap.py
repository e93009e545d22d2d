"""The native softcap kernel (``attnmem.kernels.native``): built on this machine, taken where
``plan_call`` says, exact in float64 against the written-out definition (outputs, lse and every
gradient, sinks and the lse's own gradient included), within FlashAttention's rule in float32,
and no different from the torch-ops tile kernels it replaces."""

from __future__ import annotations

import shutil

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import scores as S
from attnmem.kernels import TileContext, make_mods, native

from ..conftest import rand_qkv, rel_err
from .test_score_mod import check, dense_reference


def test_the_native_kernel_builds_where_a_compiler_is():
    """With g++ (every machine of this project's kind has it) the kernel builds and loads; on a
    machine without one, softcap must fall back, saying why, rather than fail."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        assert not native.available() and "compiler" in native.why_unavailable()
    else:
        assert native.available(), native.why_unavailable()


def test_without_a_compiler_softcap_falls_back_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNMEM_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_state", {})
    assert not native.available()
    assert "no C++ compiler" in native.why_unavailable()
    q, k, v = rand_qkv(Hq=2, Nq=24, D=8, seed=1)
    out = attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=S.softcap(2.0))  # torch-ops tiles
    allowed = torch.ones(24, 24, dtype=torch.bool).tril()
    assert rel_err(out, dense_reference(q, k, v, allowed=allowed, score_mod=S.softcap(2.0))[0]) <= 1e-10


def _context(q, k, mask, score_mod, q_pos=None):
    return TileContext(q, k, mask, 8 ** -0.5, 16, 16, "auto", make_mods(score_mod, 0.0, None, q), q_pos=q_pos)


def test_native_is_taken_for_no_mask_windows_and_key_padding_only():
    q, k, _ = rand_qkv(Hq=4, Hkv=2, Nq=40, Nk=40, D=8, dtype=torch.float32, grad=False)
    cap = S.softcap(5.0)
    assert _context(q, k, None, cap).native_window == (None, None, None)
    assert _context(q, k, M.causal(), cap).native_window == (None, 0, None)  # GQA: native, heads unstacked
    assert _context(q, k, M.sliding_window(8, 0), cap).native_window == (8, 0, None)
    assert _context(q, k, M.causal() & M.sliding_window(8, 3), cap).native_window == (8, 0, None)  # the tighter side
    assert _context(q, k[:, :, :30], M.causal(), cap).native_window == (None, 0, None)  # Nq != Nk: bottom-right
    for c in (_context(q, k, None, cap), _context(q, k, M.sliding_window(8, 0), cap)):
        assert c.kernel == "softcap_native" and c.single_call
    valid = torch.ones(1, 40, dtype=torch.bool)
    padded = _context(q, k, M.causal() & M.key_padding(valid), cap)
    assert padded.kernel == "softcap_native" and padded.native_window[:2] == (None, 0)
    assert torch.equal(padded.native_window[2], valid)
    two = M.key_padding(valid) & M.causal() & M.key_padding(valid)
    assert _context(q, k, two, cap).kernel == "softcap"  # two paddings: the torch-ops tiles
    other = M.from_mod(lambda b, h, q_idx, kv_idx: kv_idx % 2 == 0, name="even keys")
    assert _context(q, k, other, cap).kernel == "softcap"  # any other mask: the torch-ops tiles
    assert _context(q, k, M.causal(), cap, q_pos=torch.arange(40)).kernel == "softcap"  # a subset of rows
    assert _context(q.half(), k.half(), None, cap).kernel == "softcap"  # float16: the tile kernels
    alibi = TileContext(q, k, None, 0.35, 16, 16, "auto", make_mods(S.alibi(4), 0.0, None, q))
    assert alibi.kernel == "fused"


CASES = [
    dict(causal=True, Hq=4, Hkv=4, Nq=70),
    dict(causal=True, Hq=4, Hkv=2, Nq=40, Nk=300),  # Nq != Nk causal: bottom-right, as attnmem's masks
    dict(causal=True, Hq=2, Hkv=2, Nq=300, Nk=40),  # more queries than keys: the first rows see nothing
    dict(causal=True, Hq=4, Hkv=1, Nq=70),  # GQA
    dict(causal=False, Hq=4, Hkv=2, Nq=33, Nk=90),  # Nq != Nk without a mask
    dict(causal=True, B=2, Hq=2, Hkv=2, Nq=600),  # several query and key blocks (64 x 512)
    dict(causal=False, Hq=2, Hkv=2, Nq=1, Nk=530),  # one query row, a key block and a bit
]


@pytest.mark.parametrize("shape", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("cap", [0.9, 50.0])
def test_float64_against_the_definition(shape, cap, monkeypatch):
    """Outputs, lse and dQ, dK, dV (and the lse's own gradient: return_lse) at 1e-10."""
    calls = []
    for name in ("softcap_forward", "softcap_backward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    check("chunked", {}, score_mod=S.softcap(cap), **shape)
    assert calls == ["softcap_forward", "softcap_backward"]  # one native call per pass, nothing else


WINDOWS = [
    ("sliding_window", {"window": (9, 0)}, dict(causal=True, Nq=300)),  # Gemma 2's local layers, in small
    ("sliding_window", {"window": (20, 7)}, dict(causal=False, Nq=300, Hkv=1)),
    ("sliding_window", {"window": (600, 0)}, dict(causal=True, Nq=700)),  # a window wider than a key block
    ("sliding_window", {"window": (30, 0)}, dict(causal=False, Nq=90, Nk=600)),  # Nq != Nk: bottom-right
]


@pytest.mark.parametrize(("method", "options", "shape"), WINDOWS, ids=[str(i) for i in range(len(WINDOWS))])
def test_float64_windows_against_the_definition(method, options, shape, monkeypatch):
    """Windows run natively, only the key blocks each query block reaches: outputs, lse and every
    gradient at 1e-10 against the dense definition under the window."""
    calls = []
    real = native.softcap_forward
    monkeypatch.setattr(native, "softcap_forward", lambda *a, **kw: calls.append(a[5:]) or real(*a, **kw))
    check(method, options, score_mod=S.softcap(2.0), **shape)
    assert calls and all(w is not None for w in calls)


@pytest.mark.parametrize("window", [None, (None, 0), (25, 0)], ids=["unmasked", "causal", "window"])
def test_float64_key_padding_against_the_definition(window, monkeypatch):
    """Key padding (HF's padded batches), alone or with causal or a window, per batch row, one
    row of keys padded so far that its first queries see nothing (lse -inf, output 0)."""
    B, Hq, Hkv, N = 2, 4, 2, 300
    q, k, v = rand_qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=N, D=8, seed=4)
    valid = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.3
    valid[0, :40] = False
    mask = M.key_padding(valid)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = valid[:, None, None, :].expand(B, 1, N, N)
    if window is not None:
        left, right = window
        mask = M.sliding_window(left, right) & mask if left is not None else M.causal() & mask
        allowed = allowed & (j <= i) & ((j >= i - left) if left is not None else True)
    calls = []
    real = native.softcap_forward
    monkeypatch.setattr(native, "softcap_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mod = S.softcap(2.0)
    out, lse = attnmem.attention(q, k, v, method="chunked", mask=mask, score_mod=mod, return_lse=True)
    assert calls == [1]
    ref, ref_lse = dense_reference(q, k, v, allowed=allowed, score_mod=mod)
    assert rel_err(out, ref) <= 1e-10
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (~finite).any() == (window is not None)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-10
    g, gl = torch.randn_like(out), torch.randn_like(lse).masked_fill(~finite, 0)
    got = torch.autograd.grad((out * g).sum() + (lse.masked_fill(~finite, 0) * gl).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum() + (ref_lse.masked_fill(~finite, 0) * gl).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10


def test_float64_with_learned_sinks():
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    check("chunked", {}, causal=True, Hq=4, Hkv=2, Nq=70, score_mod=S.softcap(2.0), sinks=sinks)


def _errors(q64, k64, v64, causal, cap):
    """The float32 call's (out, dq, dk, dv) errors against the float64 definition."""
    mod = S.softcap(cap)
    allowed = torch.ones(q64.shape[2], k64.shape[2], dtype=torch.bool).tril() if causal else None
    ref, _ = dense_reference(q64, k64, v64, allowed=allowed, score_mod=mod)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), (q64, k64, v64))
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out = attnmem.attention(q, k, v, method="chunked", causal=causal, score_mod=mod)
    got = torch.autograd.grad((out * g.float()).sum(), (q, k, v))
    return [rel_err(out.double(), ref)] + [rel_err(a.double(), b) for a, b in zip(got, want)]


@pytest.mark.parametrize("causal", [True, False])
def test_float32_within_twice_the_torch_ops_kernels_error(causal, monkeypatch):
    q64, k64, v64 = rand_qkv(Hq=4, Hkv=2, Nq=300, Nk=300, D=32, seed=3)
    q64, k64, v64 = (t.detach().mul(2).requires_grad_() for t in (q64, k64, v64))
    native_err = _errors(q64, k64, v64, causal, 5.0)
    monkeypatch.setattr(native, "available", lambda: False)  # the torch-ops tile kernels from here
    plain_err = _errors(q64, k64, v64, causal, 5.0)
    for what, a, b in zip(("out", "dq", "dk", "dv"), native_err, plain_err):
        assert a <= 2 * b + 1e-7, f"{what}: native {a:.3g} > 2 x torch-ops {b:.3g}"


def test_bad_inputs_are_refused_by_name():
    q, k, v = rand_qkv(Hq=4, Hkv=3, Nq=8, Nk=8, D=4, dtype=torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        native.softcap_forward(q, k, v, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.softcap_forward(q.half(), k.half(), v.half(), 0.5, 1.0)
    with pytest.raises(TypeError):
        native.softcap_forward(q, k, v, 0.5, 1.0, True)  # the window is keyword-only: no causal=True by position
    q, k, v = rand_qkv(Hq=2, Nq=8, Nk=8, D=4, dtype=torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="key_valid must be"):
        native.softcap_forward(q, k, v, 0.5, 1.0, key_valid=torch.ones(1, 7, dtype=torch.bool))
