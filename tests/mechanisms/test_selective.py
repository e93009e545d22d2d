"""topk and hard attention: against the float64 reference where they are exact, against their
own dense definitions (the docstring's "equivalent PyTorch code") where they are not."""

import math

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem.memory.measure import measure
from attnmem.reference import reference_attention

from ..conftest import compare_with_reference, rand_qkv

SMALL_TILES = {"q_tile": 16, "kv_tile": 16}  # many tiles: exercises the running merge


def dense_topk(q, k, v, topk, mask, scale):
    """The definition on the full matrix: softmax over each row's topk allowed scores."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ kk.transpose(-1, -2) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(q.shape[2], k.shape[2]), -math.inf)
    top, idx = s.topk(min(topk, k.shape[2]), dim=-1)
    empty = torch.isneginf(top).all(-1, keepdim=True)
    p = torch.softmax(top.masked_fill(empty, 0.0), -1).masked_fill(torch.isneginf(top), 0.0)
    sel = torch.gather(vv.unsqueeze(2).expand(-1, -1, q.shape[2], -1, -1), 3,
                       idx.unsqueeze(-1).expand(-1, -1, -1, -1, v.shape[-1]))  # (B, H, Nq, k, D)
    return (p.unsqueeze(-1) * sel).sum(-2)


@pytest.mark.parametrize("shape,causal,mask", [
    ((1, 2, 2, 37, 37, 16), False, None),
    ((2, 2, 2, 37, 37, 16), True, None),
    ((1, 4, 2, 50, 70, 24), True, None),                   # GQA, Nq < Nk
    ((1, 4, 1, 70, 50, 16), True, M.sliding_window(9, 3)),  # MQA, rows with nothing to attend
    ((1, 2, 2, 40, 40, 16), False, M.document(torch.arange(40) // 13)),
])
def test_topk_with_k_at_least_n_is_exact(shape, causal, mask):
    B, Hq, Hkv, nq, nk, D = shape
    q, k, v = rand_qkv(B, Hq, Hkv, nq, nk, D)
    compare_with_reference("topk", q, k, v, causal=causal, mask=mask, topk=nk, **SMALL_TILES)
    compare_with_reference("topk", q, k, v, causal=causal, mask=mask, topk=nk + 5)


@pytest.mark.parametrize("topk,causal,mask", [
    (1, False, None), (5, False, None), (5, True, None), (8, True, M.sliding_window(6, 2)),
])
def test_topk_matches_its_dense_definition(topk, causal, mask):
    q, k, v = rand_qkv(1, 4, 2, 45, 45, 16)
    out = attnmem.attention(q, k, v, method="topk", topk=topk, causal=causal, mask=mask, **SMALL_TILES)
    eff = M.combine(causal, mask)
    want = dense_topk(q, k, v, topk, eff, 1 / math.sqrt(16))
    assert torch.allclose(out, want, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b in zip("qkv", got, ref):
        assert torch.allclose(a, b, atol=1e-12), f"d{name}"


def test_topk_rows_with_few_or_no_keys():
    # Row 0 sees no key, row 1 one key, row 2 two keys, the rest many; topk = 4.
    allowed = torch.ones(8, 8, dtype=torch.bool)
    allowed[0] = False
    allowed[1] = False
    allowed[1, 5] = True
    allowed[2] = False
    allowed[2, [1, 6]] = True
    q, k, v = rand_qkv(1, 1, 1, 8, 8, 8)
    out = attnmem.attention(q, k, v, method="topk", topk=4, mask=allowed)
    assert torch.equal(out[0, 0, 0], torch.zeros(8, dtype=out.dtype))
    assert torch.allclose(out[0, 0, 1], v[0, 0, 5])
    # Two keys: plain softmax over both (fewer than k keys are all used).
    ref = reference_attention(q, k, v, mask=M.dense(allowed))
    assert torch.allclose(out[0, 0, :3], ref[0, 0, :3], atol=1e-12)
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq[0, 0, 0], torch.zeros(8, dtype=dq.dtype))
    assert torch.isfinite(dq).all()


def test_topk_memory_is_n_times_k():
    # Saved state is (B, H, N, k) indices + probabilities; working memory one q_tile × kv_tile
    # score tile. Doubling N must at most double what is held above the floor (N² would
    # quadruple it), and it must stay far below one N×N float32 score matrix.
    h, d = 1, 8

    def extra(n):
        q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))

        def run(q, k, v):
            attnmem.attention(q, k, v, method="topk", topk=16, q_tile=64, kv_tile=128).sum().backward()

        return measure(run, q, k, v, repeats=0, warmup=0).peak_bytes - 7 * h * n * d * 4

    small, large = extra(512), extra(1024)
    assert large < 2.2 * small, (small, large)
    assert large < 1024 * 1024 * h * 4 / 4, large


def test_hard_deterministic_returns_the_argmax_value_row():
    q, k, v = rand_qkv(2, 4, 2, 33, 33, 16)
    for causal in (False, True):
        out = attnmem.attention(q, k, v, method="hard", causal=causal)
        s = q @ k.repeat_interleave(2, 1).transpose(-1, -2)  # (B, H, N, N)
        if causal:
            s = s.masked_fill(~M.causal().to_dense(33, 33), -math.inf)
        j = s.argmax(-1)  # (B, H, N)
        want = torch.gather(v.repeat_interleave(2, 1), 2, j.unsqueeze(-1).expand(-1, -1, -1, 16))
        assert torch.equal(out, want)
    # argmax is piecewise constant: no gradient to q or k; v gets dout at the chosen rows.
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    want_dv = torch.zeros(2, 4, 33, 16, dtype=g.dtype).scatter_add_(2, j.unsqueeze(-1).expand(-1, -1, -1, 16), g)
    assert torch.allclose(dv, want_dv.view(2, 2, 2, 33, 16).sum(2))


def test_hard_stochastic_samples_from_the_softmax():
    # 4000 identical queries, 4 keys: each row draws independently; counts follow softmax(s).
    n, keys = 4000, 4
    q = torch.ones(1, 1, n, 2, dtype=torch.float64)
    k = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64).view(1, 1, keys, 2)
    v = torch.arange(keys, dtype=torch.float64).view(1, 1, keys, 1).expand(1, 1, keys, 2).contiguous()
    out = attnmem.attention(q, k, v, method="hard", mode="stochastic", seed=0, scale=1.0)
    chosen = out[0, 0, :, 0].long()
    counts = torch.bincount(chosen, minlength=keys).double()
    p = torch.softmax((q[0, 0, 0] @ k[0, 0].T), -1)
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < 4 * sigma).all(), (counts, n * p)
    # The same seed gives the same sample.
    again = attnmem.attention(q, k, v, method="hard", mode="stochastic", seed=0, scale=1.0)
    assert torch.equal(out, again)


def test_hard_stochastic_straight_through_gradients():
    q, k, v = rand_qkv(1, 2, 2, 20, 20, 8)
    out = attnmem.attention(q, k, v, method="hard", mode="stochastic", seed=3, causal=True)
    # Forward value: each row is the value row of one allowed key.
    match = (out[0].unsqueeze(-2) == v[0].unsqueeze(-3)).all(-1)  # (H, Nq, Nk)
    j = match.double().argmax(-1)
    assert match.any(-1).all()
    assert (j <= torch.arange(20)).all()  # causal: never a future key
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    # q and k: the gradient of soft attention softmax(s)V; v: dout scattered to the sample.
    soft = reference_attention(q, k, v.detach(), mask=M.causal())
    want_dq, want_dk = torch.autograd.grad(soft, (q, k), g)
    assert torch.allclose(dq, want_dq, atol=1e-12) and torch.allclose(dk, want_dk, atol=1e-12)
    want_dv = torch.zeros_like(v).scatter_add_(2, j.unsqueeze(0).unsqueeze(-1).expand(-1, -1, -1, 8), g)
    assert torch.allclose(dv, want_dv, atol=1e-12)


@pytest.mark.parametrize("method,opts,match", [
    ("topk", {"topk": 0}, "topk must be a positive int, got 0"),
    ("topk", {"topk": -3}, "topk must be a positive int, got -3"),
    ("topk", {"topk": 2.5}, "topk must be a positive int"),
    ("topk", {"kv_tile": 0}, "kv_tile must be a positive int"),
    ("hard", {"mode": "soft"}, "mode must be one of deterministic, stochastic, got 'soft'"),
    ("hard", {"seed": "x"}, "seed must be an int or None"),
])
def test_bad_options(method, opts, match):
    q, k, v = rand_qkv(1, 1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=match):
        attnmem.attention(q, k, v, method=method, **opts)


@pytest.mark.parametrize("method,opts", [("topk", {"topk": 3}), ("hard", {}), ("hard", {"mode": "stochastic"})])
def test_reachable_through_multihead_attention(method, opts):
    mha = attnmem.nn.MultiHeadAttention(32, 4, kv_heads=2, method=method, causal=True, **opts)
    x = torch.randn(2, 12, 32, requires_grad=True)
    y = mha(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def _tied_qkv(nq, nk, hq, hkv, near):
    """Small integer q, k (scores are exact integers: many exact ties); ``near`` moves k by
    ~1e-9, far above float64's rounding of the scores, so ties become near-ties."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-2, 3, (1, hq, nq, 8), generator=g).double()
    k = torch.randint(-2, 3, (1, hkv, nk, 8), generator=g).double()
    if near:
        k = k + 1e-9 * torch.randn(k.shape, generator=g, dtype=k.dtype)
    return q, k


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("topk,hq,hkv,causal,mask,kv_tile", [
    (4, 2, 2, False, None, 44),              # blocks of 8 with a 4-key remainder per tile
    (3, 4, 2, True, None, 32),               # GQA, causal: partial tiles and rows with < k keys
    (2, 2, 1, True, M.sliding_window(70, 5), 24),
    (3, 2, 2, False, M.document(torch.arange(300) // 90), 40),
])
def test_selection_equals_the_definition_under_ties(near, topk, hq, hkv, causal, mask, kv_tile):
    # select_topk's chosen scores, per row, are exactly the dense definition's top-k scores
    # (any order among ties), and each index points at the score it reports.
    from attnmem.kernels import TileContext
    from attnmem.mechanisms.selective import _dense_scores, select_topk

    n = 300
    q, k = _tied_qkv(n, n, hq, hkv, near)
    eff = M.combine(causal, mask)
    dense = _dense_scores(q, k, eff, 1.0)  # (B, Hq, N, N)
    want_all = dense.topk(topk, dim=-1).values.sort(-1).values  # (B, Hq, N, k)
    # Few rows per query tile: more tiles where fewer than k blocks can improve any row.
    c = TileContext(q, k, eff, 1.0, 32, kv_tile, "torch")
    seen = 0
    for qa, qb, segs in c.plan:
        if not segs:
            continue
        got_s, got_i = select_topk(c, c.q_view(q, qa, qb), k, qa, qb, segs, topk)
        want = c.q_view(want_all, qa, qb)
        # Exact ties are exact integers, compared bitwise. Near-ties come from ~1e-9 moves, and
        # the tile's product may round differently from the dense one (another matmul blocking
        # on some CPUs; an ulp of these scores, |s| <= 26, is at most 3.6e-15), so there they
        # agree to 1e-13: below the smallest gap between a row's k-th and (k+1)-th score over
        # these cases (7.3e-13), so a wrong choice still fails. (-inf is close only to -inf.)
        tol = 1e-13 if near else 0.0
        assert torch.allclose(got_s.sort(-1).values, want, rtol=0, atol=tol), (qa, qb)
        at_idx = c.q_view(dense, qa, qb).gather(-1, got_i)
        finite = torch.isfinite(got_s)
        assert torch.allclose(at_idx[finite], got_s[finite], rtol=0, atol=tol), (qa, qb)
        seen += 1
    assert seen > 1


def test_hard_takes_the_first_argmax_under_exact_ties():
    q, k = _tied_qkv(200, 200, 4, 2, near=False)
    v = torch.randn(1, 2, 200, 8, dtype=torch.float64)
    for causal in (False, True):
        out = attnmem.attention(q, k, v, method="hard", causal=causal, scale=1.0, kv_tile=64)
        want = attnmem.mechanisms.selective.hard_definition(q, k, v, mask=M.combine(causal, None), scale=1.0)
        assert torch.equal(out, want)


def test_first_max_is_max_with_its_first_index():
    # hard's merge finds each row's max through segment maxima; index and value must be
    # torch.max's (the first index of the maximum, NaN ranked first) under ties, NaN and -inf.
    from attnmem.mechanisms.selective import _first_max

    g = torch.Generator().manual_seed(0)
    for tk in (64, 96, 200, 1000, 1024):
        s = torch.randint(-3, 4, (1, 2, 17, tk), generator=g).float()  # many exact ties
        s[0, 0, 3, 50] = float("nan")
        s[0, 1, 5, tk - 1] = float("nan")
        s[0, 0, 4] = -math.inf
        got, want = _first_max(s), s.max(-1, keepdim=True)
        assert torch.equal(got[1], want[1]), tk
        assert torch.equal(got[0].nan_to_num(), want[0].nan_to_num()), tk
