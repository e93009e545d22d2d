"""linear, performer, linformer, nystrom: each against its own definition, written here
independently as a quadratic (N×N) formula in float64; their errors against exact softmax
attention are measured in benchmarks/linear.py, not asserted here (they are approximations).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import attnmem
from attnmem.mechanisms.linear import orthogonal_random_features
from attnmem.memory.measure import measure
from attnmem.reference import reference_attention

from ..conftest import rand_qkv, rel_err

APPROX = ["linear", "performer", "linformer", "nystrom"]


def quadratic_kernel_attention(q, k, v, phi_q, phi_k, causal):
    """The un-normalised kernel form with the full N×N matrix: A = φ(Q)φ(K)ᵀ (masked),
    out = A V / A 1, rows with A 1 = 0 give zeros. Bottom-right causal alignment."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    a = phi_q(q) @ phi_k(k).transpose(-1, -2)  # (B, H, Nq, Nk)
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        a = a * (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq)
    den = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(den == 0, torch.ones_like(den), den)


def close(a, b, tol=1e-10):
    """Relative error, against norm 1 where the expected value is (mathematically) zero: with
    N = 1 the gradients of q and k vanish and both sides are rounding noise."""
    return (a - b).norm().item() <= tol * max(b.norm().item(), 1.0)


def elu1(x):
    return F.elu(x) + 1


def favor(w, scale):
    """FAVOR+ features straight from the paper: exp(W x' - |x'|²/2) / √m, x' = x·scale^½."""
    def phi(x):
        x = x * math.sqrt(scale)
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])
    return phi


SHAPES = [(2, 2, 37, 37), (4, 2, 20, 45), (4, 1, 45, 20), (1, 1, 1, 1)]  # (Hq, Hkv, Nq, Nk)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_linear_equals_its_quadratic_form(shape, causal, chunk):
    Hq, Hkv, nq, nk = shape
    q, k, v = rand_qkv(2, Hq, Hkv, nq, nk, 8)
    out = attnmem.attention(q, k, v, method="linear", causal=causal, chunk=chunk)
    want = quadratic_kernel_attention(q, k, v, elu1, elu1, causal)
    assert rel_err(out, want) <= 1e-10
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, exp):
        assert close(a, b)


def test_linear_relu_feature_map_and_empty_rows():
    """relu features can zero a row's denominator: that row is zeros with zero grads. Causal
    with Nq > Nk leaves the first Nq - Nk rows with nothing to attend."""
    q, k, v = rand_qkv(1, 2, 2, 30, 12, 8)
    out = attnmem.attention(q, k, v, method="linear", causal=True, feature_map="relu", chunk=5)
    want = quadratic_kernel_attention(q, k, v, F.relu, F.relu, True)
    assert rel_err(out, want) <= 1e-10
    assert (out[:, :, :18] == 0).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and (dq[:, :, :18] == 0).all()


@pytest.mark.parametrize("shape", [(4, 2, 33, 33), (2, 1, 20, 45), (2, 2, 45, 20)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_its_quadratic_form(causal, shape):
    """The stabilisers (row max for queries, head max for keys) and the queries' row factor
    exp(-|q'|²/2) cancel: same as the paper's φ. Chunks of 8 and, non-causal, several blocks."""
    Hq, Hkv, nq, nk = shape
    q, k, v = rand_qkv(1, Hq, Hkv, nq, nk, 16)
    scale = 0.25
    out = attnmem.attention(q, k, v, method="performer", causal=causal, features=40, seed=3,
                            scale=scale, chunk=8)
    phi = favor(orthogonal_random_features(40, 16, seed=3, dtype=torch.float64), scale)
    want = quadratic_kernel_attention(q, k, v, phi, phi, causal)
    assert rel_err(out, want) <= 1e-10
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert close(a, b)


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_random_features(40, 16, seed=0, dtype=torch.float64)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert torch.equal(w, orthogonal_random_features(40, 16, seed=0, dtype=torch.float64))
    assert not torch.equal(w, orthogonal_random_features(40, 16, seed=1, dtype=torch.float64))


def test_performer_error_falls_as_features_grow():
    """Mean over 4 seeds of the relative error against float64 exact attention for m = 4, 32,
    256, 2048 (seeded, so deterministic). q, k ~ N(0, 0.25) at D = 16 keep the estimator's
    variance moderate; measured means 0.60, 0.28, 0.14, 0.056, roughly 1/√m as FAVOR+ predicts."""
    errors = []
    for m in (4, 32, 256, 2048):
        total = 0.0
        for seed in range(4):
            q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, grad=False, seed=seed)
            q, k = 0.5 * q, 0.5 * k
            out = attnmem.attention(q, k, v, method="performer", features=m, seed=seed)
            total += rel_err(out, reference_attention(q, k, v)) / 4
        errors.append(total)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[1] / 3, errors


def test_linformer_identity_projections_equal_exact():
    """k = N = max_len and E = F = I: the projected keys are the keys."""
    n = 24
    mha = attnmem.nn.MultiHeadAttention(32, 4, kv_heads=2, method="linformer", max_len=n, k=n)
    inner = mha.inner.double()
    with torch.no_grad():
        inner.proj_k.copy_(torch.eye(n).unsqueeze(0))
        inner.proj_v.copy_(torch.eye(n).unsqueeze(0))
    q, k, v = rand_qkv(2, 4, 2, n, n, 8)
    out = inner(q, k, v, causal=False, mask=None)
    assert rel_err(out, reference_attention(q, k, v)) <= 1e-12


@pytest.mark.parametrize("share_kv,per_head", [(True, False), (False, True)])
def test_linformer_options_and_gradcheck(share_kv, per_head):
    mha = attnmem.nn.MultiHeadAttention(16, 2, method="linformer", max_len=10, k=4,
                                        share_kv=share_kv, per_head=per_head)
    inner = mha.inner.double()
    assert inner.proj_k.shape == (2 if per_head else 1, 4, 10)
    assert (inner.proj_v is None) == share_kv
    q, k, v = rand_qkv(1, 2, 2, 7, 7, 8)
    # The definition: softmax(Q (E K)ᵀ s) (F V) with E, F cut to the sequence length.
    e = inner.proj_k[:, :, :7]
    f = e if share_kv else inner.proj_v[:, :, :7]
    want = reference_attention(q, e @ k, f @ v)
    assert rel_err(inner(q, k, v, causal=False, mask=None), want) <= 1e-12
    small = tuple(t[:, :, :5, :3].detach().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: inner(q, k, v, causal=False, mask=None), small)
    x = torch.randn(2, 10, 16)
    mha(x).sum().backward()
    assert mha.inner.proj_k.grad is not None


def test_nystrom_with_all_landmarks_equals_exact():
    """m = N: landmarks are the tokens, so out = P pinv(P) P V = P V. With the default 6
    Newton–Schulz steps the pseudo-inverse has not converged: measured 1.6–3.2 % relative error
    at N = 16–64 (documented tolerance 5e-2); with 20 steps it reaches float64 rounding."""
    for n, d in [(16, 16), (40, 8)]:
        q, k, v = rand_qkv(1, 2, 2, n, n, d)
        ref = reference_attention(q, k, v)
        assert rel_err(attnmem.attention(q, k, v, method="nystrom", landmarks=n), ref) <= 5e-2
        out = attnmem.attention(q, k, v, method="nystrom", landmarks=n, pinv_iterations=20)
        assert rel_err(out, ref) <= 1e-10


def test_nystrom_matches_its_definition_with_uneven_segments():
    """N = 23, m = 5 (segments of 4 or 5 tokens), GQA; the definition with explicit N×m
    matrices and torch.linalg.pinv in place of the converged iteration (30 steps)."""
    q, k, v = rand_qkv(1, 4, 2, 23, 23, 8)
    out = attnmem.attention(q, k, v, method="nystrom", landmarks=5, pinv_iterations=30)
    seg = torch.arange(23) * 5 // 23
    onehot = F.one_hot(seg, 5).double().T  # (m, N)
    means = onehot / onehot.sum(1, keepdim=True)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ql, kl = means @ q, means @ kr
    s = 8 ** -0.5
    f1 = torch.softmax(q @ kl.transpose(-1, -2) * s, -1)
    a = torch.softmax(ql @ kl.transpose(-1, -2) * s, -1)
    b = torch.softmax(ql @ kr.transpose(-1, -2) * s, -1)
    want = f1 @ torch.linalg.pinv(a) @ b @ vr
    assert rel_err(out, want) <= 1e-8


def test_nystrom_conv_residual_module():
    mha = attnmem.nn.MultiHeadAttention(32, 4, kv_heads=2, method="nystrom", landmarks=4, conv_kernel=3)
    inner = mha.inner.double()
    q, k, v = rand_qkv(1, 4, 2, 12, 12, 8)
    base = attnmem.attention(q, k, v, method="nystrom", landmarks=4)
    res = inner.conv(v).repeat_interleave(2, 1)
    assert rel_err(inner(q, k, v, causal=False, mask=None), base + res) <= 1e-12
    with pytest.raises(ValueError, match="learned convolution"):
        attnmem.attention(q, k, v, method="nystrom", conv_kernel=3)


@pytest.mark.parametrize("method,opts,causal", [
    ("linear", dict(chunk=3), True), ("linear", dict(chunk=4), False),
    ("performer", dict(features=6, chunk=3), True), ("nystrom", dict(landmarks=3), False),
])
def test_gradcheck(method, opts, causal):
    q, k, v = rand_qkv(1, 2, 1, 6, 7, 3)
    if method == "nystrom":
        q, k, v = rand_qkv(1, 2, 1, 6, 6, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attnmem.attention(q, k, v, method=method, causal=causal, **opts), (q, k, v))


def test_performer_module_redraw():
    mha = attnmem.nn.MultiHeadAttention(32, 4, method="performer", features=16, seed=5)
    w0 = mha.inner.projection.clone()
    assert torch.equal(w0, orthogonal_random_features(16, 8, seed=5))
    q, k, v = rand_qkv(1, 4, 4, 10, 10, 8, dtype=torch.float32, grad=False)
    functional = attnmem.attention(q, k, v, method="performer", features=16, seed=5)
    assert torch.allclose(mha.inner(q, k, v, causal=False), functional)
    mha.inner.redraw()
    assert not torch.equal(mha.inner.projection, w0)
    mha.inner.redraw(seed=5)
    assert torch.equal(mha.inner.projection, w0)


@pytest.mark.parametrize("method", APPROX)
def test_registered_inexact(method):
    info = {m.name: m for m in attnmem.methods()}[method]
    assert not info.exact and info.family in ("linear", "lowrank")


def test_bad_options_and_inputs_get_clear_errors():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        attnmem.attention(q, k, v, method="performer", features=0)
    with pytest.raises(ValueError, match="features must be a positive int, got -3"):
        attnmem.attention(q, k, v, method="performer", features=-3)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        attnmem.attention(q, k, v, method="linear", feature_map="softmax")
    with pytest.raises(ValueError, match="k must be at most max_len=16, got k=32"):
        attnmem.nn.MultiHeadAttention(16, 2, method="linformer", max_len=16, k=32)
    mha = attnmem.nn.MultiHeadAttention(16, 2, method="linformer", max_len=16, k=4)
    with pytest.raises(ValueError, match="sequence length 20 exceeds max_len=16"):
        mha(torch.randn(1, 20, 16))
    with pytest.raises(ValueError, match="has learned parameters"):
        attnmem.attention(q, k, v, method="linformer")
    with pytest.raises(ValueError, match="landmarks must be a positive int"):
        attnmem.attention(q, k, v, method="nystrom", landmarks=0)
    for method in ("nystrom",):
        with pytest.raises(ValueError, match="does not support causal"):
            attnmem.attention(q, k, v, method=method, causal=True)
    causal_mha = attnmem.nn.MultiHeadAttention(16, 2, method="linformer", causal=True, max_len=16, k=4)
    with pytest.raises(ValueError, match="causal Linformer is not supported"):
        causal_mha(torch.randn(1, 8, 16))
    for method in ("linear", "performer", "nystrom"):
        with pytest.raises(ValueError, match="does not support masks"):
            attnmem.attention(q, k, v, method=method, mask=attnmem.masks.sliding_window(2))


def test_causal_linear_memory_is_linear():
    """Peak of causal linear attention, forward + backward, at N and 4N: it grows like the
    inputs (ratio ≤ 4.5) and stays within 2× the floor (q, k, v, out, dq, dk, dv) at 4N; an
    autograd graph keeping each chunk's C×C product would add N·C floats on top."""
    peaks = []
    for n in (512, 2048):
        q, k, v = rand_qkv(1, 1, 1, n, n, 32, dtype=torch.float32)

        def run(q, k, v):
            attnmem.attention(q, k, v, method="linear", causal=True, chunk=128).sum().backward()
        peaks.append(measure(run, q, k, v, repeats=0, warmup=0).peak_bytes)
    floor = 7 * 2048 * 32 * 4
    assert peaks[1] <= 2 * floor, peaks[1] / floor
    assert peaks[1] / peaks[0] <= 4.5, peaks


@pytest.mark.parametrize("n, extra", [(16, 0), (40, 0), (24, 100)])
def test_nystrom_with_landmarks_at_least_nk_is_exact(n, extra):
    """landmarks >= Nk: every key is a landmark, so the result is exact attention (float64
    rounding), with the default pseudo-inverse steps too — not a few per cent off."""
    q, k, v = rand_qkv(1, 2, 2, n, n, 8)
    ref = reference_attention(q, k, v)
    assert rel_err(attnmem.attention(q, k, v, method="nystrom", landmarks=n + extra), ref) <= 1e-10
