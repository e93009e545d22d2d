"""score_mod, sinks, dropout and return_lse against a written-out dense float64 reference.

The reference below is the definition itself: scores, score_mod on full (B, Hq, Nq, Nk) index
grids, mask, a sink column in the softmax, the dense dropout pattern, P·V. Every method that
declares these capabilities is compared with it, outputs and every gradient (q, k, v, sinks
and the tensors a score_mod captures), with causal, windows, GQA and Nq != Nk.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import scores as S
from attnmem.registry import get as get_method

from ..conftest import rand_qkv, rel_err

TOL = 1e-10


def dense_reference(q, k, v, *, allowed=None, scale=None, score_mod=None, sinks=None, keep=None):
    """softmax over [mod(q·kᵀ·scale) masked, sink] without the sink column, dropped, times V."""
    B, Hq, nq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, Nk, D)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = q @ kk.transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(Hq)[None, :, None, None]
    qi = torch.arange(nq)[None, None, :, None]
    ki = torch.arange(k.shape[2])[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki).expand(s.shape)
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, Hq, 1, 1).expand(B, Hq, nq, 1)], -1)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(empty[..., 0], -math.inf)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)[..., :k.shape[2]]
    if keep is not None:
        p = p * keep
    return p @ vv, lse


def allowed_of(method: str, options: dict, causal: bool, nq: int, nk: int, B: int, Hq: int):
    """The dense pattern a method computes: its own pattern AND the call's causal mask."""
    mask = M.combine(causal, None)
    m = get_method(method)
    if hasattr(m, "pattern"):
        pat = m.pattern(m.make_options(options))
        mask = pat if mask is None else mask & pat
    return None if mask is None else mask.to_dense(nq, nk, batch=B, heads=Hq)


def check(method, options, *, causal=False, B=1, Hq=4, Hkv=2, Nq=40, Nk=None, score_mod=None,
          extra=(), sinks=None, dropout_p=0.0, seed=5, return_lse=True, scale=None):
    q, k, v = rand_qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=8)
    Nk = k.shape[2]
    out, lse = attnmem.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, sinks=sinks,
                                 dropout_p=dropout_p, dropout_seed=seed, return_lse=True, scale=scale,
                                 **options)
    keep = S.dropout_mask(seed, dropout_p, B, Hq, Nq, Nk).double() if dropout_p else None
    ref, ref_lse = dense_reference(q, k, v, allowed=allowed_of(method, options, causal, Nq, Nk, B, Hq),
                                   score_mod=score_mod, sinks=sinks, keep=keep, scale=scale)
    assert lse.dtype == torch.float64 and lse.shape == (B, Hq, Nq)
    assert rel_err(out, ref) <= TOL, rel_err(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= TOL
    inputs = [q, k, v, *extra] + ([sinks] if sinks is not None else [])
    g, gl = torch.randn_like(out), torch.randn_like(lse).masked_fill(~finite, 0)
    loss = (out * g).sum() + ((lse * gl).sum() if return_lse else 0)
    ref_loss = (ref * g).sum() + ((ref_lse.masked_fill(~finite, 0) * gl).sum() if return_lse else 0)
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref_loss, inputs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"grad {i} has NaN/inf"
        assert rel_err(a, b) <= TOL, f"grad {i} rel err {rel_err(a, b)}"


# Methods honouring score_mod, with options that make the pattern matter at N ≈ 40.
METHODS = [
    ("chunked", {"q_tile": 16, "kv_tile": 16}),
    ("chunked", {"q_tile": 16, "kv_tile": 16, "kernel": "torch"}),
    ("chunked", {}),
    ("sliding_window", {"window": (9, 3), "q_tile": 16, "kv_tile": 16}),
    ("dilated", {"window": 4, "dilation": 2, "q_tile": 16, "kv_tile": 16}),
    ("longformer", {"window": 5, "global_tokens": (0, 17), "q_tile": 16, "kv_tile": 16}),
    ("bigbird", {"block": 8, "window_blocks": 3, "global_blocks": 2, "random_blocks": 1}),
    ("strided", {"stride": 6, "q_tile": 16, "kv_tile": 16}),
    ("strided", {"pattern": "fixed", "stride": 8, "summary": 2, "q_tile": 16, "kv_tile": 16}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in METHODS]


def _table(Hq=4, n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, Hq, dtype=torch.float64, generator=g).requires_grad_()


@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_learned_table_and_sinks_every_method(method, options, causal):
    """A custom score_mod with a captured learned table (softcap on top) and learned sinks."""
    table = _table(n=2 * 64)
    sinks = torch.randn(4, dtype=torch.float64).requires_grad_()

    def score_mod(s, b, h, q_idx, kv_idx):
        return 8 * torch.tanh(s / 8) + table[(kv_idx - q_idx + 64).clamp(0, 127), h]

    # bigbird's blocks need Nq == Nk; the others run a rectangular problem too.
    nk = 40 if method in ("bigbird", "strided") else 52
    check(method, options, causal=causal, Nk=nk, score_mod=score_mod, extra=(table,), sinks=sinks)


@pytest.mark.parametrize(("method", "options"), METHODS[:5], ids=IDS[:5])
def test_dropout_matches_the_dense_pattern(method, options):
    table = _table()
    mod = S.relative_bias(table, num_buckets=32, max_distance=20)
    check(method, options, causal=True, Nk=47 if method != "dilated" else 40, score_mod=mod, extra=(table,),
          dropout_p=0.3, sinks=torch.randn(4, dtype=torch.float64).requires_grad_())


@pytest.mark.parametrize("builtin", ["softcap", "alibi", "alibi_learned", "relative_uni", "relative_bi"])
@pytest.mark.parametrize(("method", "options"), [METHODS[0], METHODS[3]], ids=[IDS[0], IDS[3]])
def test_builtins(builtin, method, options):
    extra = ()
    if builtin == "softcap":
        mod = S.softcap(0.7)
    elif builtin == "alibi":
        mod = S.alibi(4, offset=12)
    elif builtin == "alibi_learned":
        slopes = S.alibi_slopes(4).double().requires_grad_()
        mod, extra = S.alibi(slopes), (slopes,)
    else:
        table = _table()
        mod = S.relative_bias(table, 32, 40, bidirectional=builtin == "relative_bi")
        extra = (table,)
    check(method, options, causal=builtin.startswith("relative_uni"), Nq=40, Nk=52, score_mod=mod,
          extra=extra, scale=1.0 if builtin.startswith("relative") else None)


def test_builtin_definitions_written_out():
    """Each built-in against its docstring's formula on a few explicit indices."""
    s = torch.tensor([[[[3.0, -100.0]]]], dtype=torch.float64)
    z = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    assert torch.allclose(S.softcap(50.0)(s, z, z, z, z), 50 * torch.tanh(s / 50))
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    h = torch.tensor([0, 1]).view(1, 2, 1, 1)
    qi, ki = torch.tensor([5]).view(1, 1, 1, 1), torch.tensor([1, 9]).view(1, 1, 1, 2)
    got = S.alibi(slopes, offset=2)(torch.zeros(1, 2, 1, 2, dtype=torch.float64), z, h, qi, ki)
    want = torch.tensor([[-0.5 * 6, -0.5 * 2], [-0.25 * 6, -0.25 * 2]], dtype=torch.float64)
    assert torch.equal(got[0, :, 0], want)


def test_alibi_slopes_standard():
    # Press et al.: H = 8 gives 1/2, 1/4, ..., 1/256.
    assert torch.equal(S.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # H = 12: the 8 slopes of 8, then 2^(-4h/8) for h = 1, 3, 5, 7 (Bloom's rule).
    want = [2.0 ** -i for i in range(1, 9)] + [2.0 ** (-0.5 * h) for h in (1, 3, 5, 7)]
    assert torch.allclose(S.alibi_slopes(12), torch.tensor(want))
    assert S.alibi_slopes(1).tolist() == [2.0 ** -8]


def test_alibi_slopes_match_bloom():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom",
                                reason="transformers (the optional hf extra) is not installed")
    for heads in (1, 3, 5, 8, 12, 16, 20):
        alibi = bloom.build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # (H, 1, 2): slope · position
        assert torch.allclose(S.alibi_slopes(heads), alibi[:, 0, 1]), heads


def test_relative_bucket_matches_hf_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5",
                             reason="transformers (the optional hf extra) is not installed")
    rel = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            want = t5.T5Attention._relative_position_bucket(rel, bidirectional, nb, md)
            assert torch.equal(S.relative_position_bucket(rel, bidirectional, nb, md), want)


def test_relative_bias_matches_hf_t5_compute_bias():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5",
                             reason="transformers (the optional hf extra) is not installed")
    cfg = t5.T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, is_decoder=False)
    layer = t5.T5Attention(cfg, has_relative_attention_bias=True)
    want = layer.compute_bias(30, 30)  # (1, H, Nq, Nk)
    mod = S.relative_bias(layer.relative_attention_bias.weight.detach(), 32, 128, bidirectional=True)
    got = mod(torch.zeros(1, 4, 30, 30), torch.zeros(1, 1, 1, 1, dtype=torch.long),
              torch.arange(4).view(1, 4, 1, 1), torch.arange(30).view(1, 1, 30, 1), torch.arange(30).view(1, 1, 1, 30))
    assert torch.allclose(got, want)


def test_dropout_is_deterministic_and_unbiased():
    q, k, v = rand_qkv(Hq=2, Nq=64, D=8)
    runs = [attnmem.attention(q, k, v, method="chunked", q_tile=16, kv_tile=16, dropout_p=0.25, dropout_seed=s)
            for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    g1 = torch.autograd.grad(runs[0].sum(), (q, k, v))
    g2 = torch.autograd.grad(runs[1].sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # A generator in the same state gives the same pattern.
    outs = [attnmem.attention(q, k, v, method="chunked", dropout_p=0.25,
                              dropout_seed=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(*outs)
    z = S.dropout_mask(3, 0.25, 2, 4, 256, 256)
    kept = (z > 0).double().mean().item()
    assert abs(kept - 0.75) < 0.01, kept  # 524288 draws: 5 sigma ≈ 0.003
    assert abs(z.double().mean().item() - 1.0) < 0.015  # inverted dropout: E[Z] = 1
    assert torch.allclose(z[z > 0], torch.tensor(1 / 0.75))


def test_return_lse_float32_and_merge_of_halves():
    q, k, v = rand_qkv(Hq=4, Hkv=2, Nq=33, Nk=70, D=8, dtype=torch.float32)
    out, lse = attnmem.attention(q, k, v, method="chunked", return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 33)
    a = attnmem.attention(q, k[:, :, :30], v[:, :, :30], method="chunked", return_lse=True, q_tile=16, kv_tile=16)
    b = attnmem.attention(q, k[:, :, 30:], v[:, :, 30:], method="sliding_window", window=200, return_lse=True)
    m_out, m_lse = attnmem.merge([a, b])
    assert rel_err(m_out, out) < 1e-6 and rel_err(m_lse, lse) < 1e-6
    # Gradients flow through the merge into both partials.
    g = torch.randn_like(out)
    got = torch.autograd.grad((m_out * g).sum() + m_lse.sum(), (q, k, v))
    want = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(got, want))


def test_merge_empty_rows_have_zero_gradients():
    o = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    lse = torch.tensor([[[-math.inf, 0.5, -math.inf]]], dtype=torch.float64, requires_grad=True)
    o2 = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    lse2 = torch.tensor([[[-math.inf, -math.inf, 1.0]]], dtype=torch.float64, requires_grad=True)
    out, l_ = attnmem.merge([(o, lse), (o2, lse2)])
    assert out[0, 0, 0].abs().sum() == 0 and torch.isneginf(l_[0, 0, 0])
    grads = torch.autograd.grad(out.sum() + l_[torch.isfinite(l_)].sum(), (o, lse, o2, lse2))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0, 0, 0].abs().sum() == 0


def test_streaming_mask_is_sink_tokens_plus_window():
    nq = nk = 30
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    want = (j <= i) & ((i - j <= 7) | (j < 3))
    assert torch.equal(M.streaming(7, sinks=3).to_dense(nq, nk)[0, 0], want)
    q, k, v = rand_qkv(Nq=nq, D=8)
    from ..conftest import compare_with_reference
    compare_with_reference("chunked", q, k, v, mask=M.streaming(7, sinks=3), q_tile=16, kv_tile=16)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"score_mod": 3}, TypeError, "score_mod must be None or a callable"),
        ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(Hq,\) = \(2,\)"),
        ({"sinks": [0.0, 0.0]}, TypeError, "sinks must be None or a tensor"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p must be a number"),
        ({"dropout_p": 0.1, "dropout_seed": "x"}, TypeError, "dropout_seed must be None, an int"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    q, k, v = rand_qkv(Hq=2, Nq=8, D=4)
    with pytest.raises(error, match=match):
        attnmem.attention(q, k, v, method="chunked", **kwargs)


@pytest.mark.parametrize("name", ["sdpa", "linear", "topk", "hierarchical"])
@pytest.mark.parametrize(("kwarg", "value", "what"), [
    ("score_mod", S.softcap(5.0), "score_mod"), ("sinks", torch.zeros(2, dtype=torch.float64), "sinks"),
    ("dropout_p", 0.1, "dropout_p"), ("return_lse", True, "return_lse"),
])
def test_methods_that_cannot_honour_them_refuse_naming_it(name, kwarg, value, what):
    q, k, v = rand_qkv(Hq=2, Nq=8, D=4)
    with pytest.raises(ValueError, match=f"does not support {what}"):
        attnmem.attention(q, k, v, method=name, **{kwarg: value})


def test_fused_kernel_refuses_score_mod():
    q, k, v = rand_qkv(Hq=2, Nq=8, D=4)
    with pytest.raises(ValueError, match="kernel='fused' cannot apply a score_mod"):
        attnmem.attention(q, k, v, method="chunked", kernel="fused", score_mod=S.softcap(3.0))


def test_auto_dispatches_score_mod_to_a_method_that_honours_it():
    q, k, v = rand_qkv(Hq=2, Nq=24, D=4)
    out = attnmem.attention(q, k, v, score_mod=S.softcap(2.0), causal=True)
    ref, _ = dense_reference(q, k, v, allowed=M.causal().to_dense(24, 24), score_mod=S.softcap(2.0))
    assert rel_err(out, ref) <= TOL


def test_capability_table_lists_the_new_features():
    table = {m.name: m.supports for m in attnmem.methods()}
    for name in ("reference", "chunked", "sliding_window", "dilated", "longformer", "bigbird", "strided"):
        caps = table[name]
        assert caps.score_mod and caps.sinks and caps.dropout and caps.return_lse, name
    assert not table["sdpa"].score_mod and not table["linear"].sinks


def test_reference_method_takes_the_same_options():
    q, k, v = rand_qkv(Hq=4, Hkv=2, Nq=20, Nk=26, D=8)
    sinks = torch.randn(4, dtype=torch.float64)
    kw = dict(score_mod=S.alibi(4), sinks=sinks, dropout_p=0.2, dropout_seed=9, return_lse=True, causal=True)
    a = attnmem.attention(q, k, v, method="reference", **kw)
    b = attnmem.attention(q, k, v, method="chunked", q_tile=16, kv_tile=16, **kw)
    assert rel_err(a[0], b[0]) <= TOL and rel_err(a[1], b[1]) <= TOL
