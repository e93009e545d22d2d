"""Decoding caches: step-by-step decoding equals the full-sequence forward of the same attention.

Expected values come from the full-sequence paths (``attnmem.attention`` / the module's own
forward without a cache) and, for linear attention, from the quadratic masked kernel form
written out below, all in float64.
"""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem.nn import (
    Int8KVCache,
    KVCache,
    LinearStateCache,
    MultiHeadAttention,
    SlidingWindowCache,
    Transformer,
    cache_bytes,
)
from attnmem.nn.cache import elu_feature_map, quantize_int8

from ..conftest import rand_qkv, rel_err

# Token splits: a prefill, single steps, multi-token steps (one longer than the windows below).
SPLITS = [5, 1, 1, 3, 1, 7, 1]  # a prefill, single steps and multi-token steps
N = sum(SPLITS)


def decode_layer(cache, mha, q, k, v, splits=SPLITS):
    """Feed (q, k, v) to ``cache`` in the given chunks; concatenated outputs (B, Hq, N, D)."""
    outs, a = [], 0
    for n in splits:
        outs.append(cache.attend(mha, q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n]))
        a += n
    return torch.cat(outs, dim=2)


def mha_for(heads, kv_heads, D, method="chunked"):
    return MultiHeadAttention(heads * D, heads, kv_heads=kv_heads, method=method, causal=True).double()


def decode_in_pieces(module, x, cache, splits=SPLITS):
    """``module`` (a layer or a model) called on ``x`` piece by piece along the sequence, with
    ``cache``: a prefill, single steps and multi-token steps; the outputs joined."""
    outs, a = [], 0
    for n in splits:
        outs.append(module(x[:, a:a + n], cache=cache))
        a += n
    return torch.cat(outs, dim=1)


# sdpa takes no GQA in its full-sequence forward (Capabilities(gqa=False)): MHA only.
@pytest.mark.parametrize("method,kv_heads", [("chunked", 4), ("chunked", 2), ("chunked", 1), ("reference", 2),
                                             ("sdpa", 4)])
def test_full_cache_matches_full_forward(method, kv_heads):
    mha = mha_for(4, kv_heads, 8, method)
    x = torch.randn(2, N, 32, dtype=torch.float64)
    want = mha(x)
    cache = KVCache(kv_heads=kv_heads, head_dim=8)
    got = decode_in_pieces(mha, x, cache)
    assert rel_err(got, want) <= 1e-10
    # GQA/MQA stores only the key/value heads: 2 (k, v) * B * Hkv * N * D * 8 bytes, no padding
    # beyond the doubling growth.
    assert cache.k.shape[1] == kv_heads and cache.length == N
    assert cache.nbytes() == 2 * 2 * kv_heads * cache.k.shape[2] * 8 * 8


def test_full_cache_preallocated_max_len_and_overflow():
    mha = mha_for(2, 2, 8)
    cache = KVCache(kv_heads=2, head_dim=8, max_len=N)
    decode_in_pieces(mha, torch.randn(1, N, 16, dtype=torch.float64), cache)
    assert cache.nbytes() == 2 * 1 * 2 * N * 8 * 8  # exactly max_len tokens allocated
    with pytest.raises(ValueError, match=rf"max_len={N} exceeded: it holds {N} tokens, got 1 more"):
        mha(torch.randn(1, 1, 16, dtype=torch.float64), cache=cache)


@pytest.mark.parametrize("window", [1, 4, 6])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sliding_window_ring_matches_window_attention(window, kv_heads):
    q, k, v = rand_qkv(B=2, Hq=4, Hkv=kv_heads, Nq=N, D=8, grad=False)
    want = attnmem.attention(q, k, v, method="chunked", causal=True, mask=attnmem.masks.sliding_window(window, 0))
    cache = SlidingWindowCache(kv_heads=kv_heads, head_dim=8, window=window)
    got = decode_layer(cache, mha_for(4, kv_heads, 8), q, k, v)
    assert rel_err(got, want) <= 1e-10
    # The ring never holds more than the window, whatever the context.
    assert cache.nbytes() == 2 * 2 * kv_heads * window * 8 * 8


def test_sliding_window_cache_matches_windowed_model():
    torch.manual_seed(1)
    model = Transformer(50, 32, 4, 2, kv_heads=2, method="chunked").double().eval()
    tokens = torch.randint(0, 50, (1, N))
    want = model(tokens, mask=attnmem.masks.sliding_window(3, 0))
    cache = model.new_cache("sliding_window", window=3)
    assert rel_err(decode_in_pieces(model, tokens, cache), want) <= 1e-10


def test_int8_cache_exact_when_values_are_representable():
    # Each (head, token) row holds integers in [-127, 127] with one entry at 127, so
    # scale = 127 / 127 = 1 and quantisation is exact: the int8 path must equal the float cache.
    q, k, v = rand_qkv(B=1, Hq=4, Hkv=2, Nq=N, D=8, grad=False)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randint(-127, 128, t.shape, generator=g).double() for t in (k, v))
    k[..., 0], v[..., 0] = 127.0, -127.0
    q = q / 40  # keep the softmax from collapsing onto one key
    mha = mha_for(4, 2, 8)
    want = decode_layer(KVCache(kv_heads=2, head_dim=8), mha, q, k, v)
    got = decode_layer(Int8KVCache(kv_heads=2, head_dim=8), mha, q, k, v)
    assert rel_err(got, want) <= 1e-10


def test_int8_cache_blocks_and_error(monkeypatch):
    # Small key blocks exercise the online softmax across blocks and the masked tail block.
    monkeypatch.setattr("attnmem.nn.cache.KV_BLOCK", 3)
    q, k, v = rand_qkv(B=2, Hq=4, Hkv=2, Nq=N, D=16, grad=False)
    mha = mha_for(4, 2, 16)
    full = decode_layer(KVCache(kv_heads=2, head_dim=16), mha, q, k, v)
    cache = Int8KVCache(kv_heads=2, head_dim=16)
    got = decode_layer(cache, mha, q, k, v)
    err = rel_err(got[:, :, 5:], full[:, :, 5:])  # the prefill rows use the float keys
    # Rounding error is at most scale/2 = max|x|/254 per element, under 0.4 % of each row's
    # largest entry; the attention output moves by the same order.
    assert 0 < err < 1e-2
    assert rel_err(got[:, :, :5], full[:, :, :5]) <= 1e-12
    # D + 4 bytes per (k or v, head, token) against 8·D for float64.
    assert cache.nbytes() == 2 * 2 * 2 * cache.k.shape[2] * (16 + 4)


def test_quantize_int8_roundtrip_bound():
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    quant, scale = quantize_int8(x)
    assert quant.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    assert ((quant.double() * scale - x).abs() <= scale / 2 + 1e-7).all()
    zero_q, zero_s = quantize_int8(torch.zeros(1, 1, 2, 4))
    assert (zero_q == 0).all() and (zero_s == 0).all()


def linear_attention_quadratic(q, k, v, phi=elu_feature_map, eps=1e-6, psi=None):
    """Causal linear attention, un-normalised kernel form: A = ψ(Q)φ(K)ᵀ masked to j <= i,
    out = A V / (A 1 + eps). GQA by repeating K/V heads (fine for a small oracle)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = ((psi or phi)(q) @ phi(k).transpose(-1, -2)).tril()  # (B, H, N, N)
    den = scores.sum(-1, keepdim=True) + eps
    return (scores @ v) / torch.where(den == 0, 1.0, den)  # zero weight everywhere: a zero row


def random_features(D, F, seed=0):
    """A Performer-style positive random-feature map exp(Wx - |x|²/2) / sqrt(F), F != D."""
    W = torch.randn(F, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def phi(x):
        return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / F ** 0.5

    return phi


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("features", ["elu", "random", "random_qk"])
def test_linear_state_equals_causal_linear_attention(kv_heads, features):
    q, k, v = rand_qkv(B=2, Hq=4, Hkv=kv_heads, Nq=N, D=8, grad=False)
    phi = elu_feature_map if features == "elu" else random_features(8, 12)
    psi = random_features(8, 12, seed=1) if features == "random_qk" else None  # queries' own map
    want = linear_attention_quadratic(q, k, v, phi, psi=psi)
    cache = LinearStateCache(kv_heads=kv_heads, head_dim=8, feature_map=phi, query_map=psi, chunk=2)
    got = decode_layer(cache, mha_for(4, kv_heads, 8), q, k, v)
    assert rel_err(got, want) <= 1e-10
    F = 8 if features == "elu" else 12
    if features == "random_qk":  # ψ must be used for the queries: φ there gives another answer
        assert rel_err(got, linear_attention_quadratic(q, k, v, phi)) > 1e-3
    # S (F × D) and z (F) per batch and KV head, independent of the N tokens seen.
    assert cache.nbytes() == 2 * kv_heads * (F * 8 + F) * 8


def test_linear_state_model_decoding_matches_one_call():
    model = Transformer(50, 32, 4, 2, kv_heads=2, method="chunked").double().eval()
    tokens = torch.randint(0, 50, (2, N))
    whole = model(tokens, cache=model.new_cache("linear_state"))
    cache = model.new_cache("linear_state", chunk=3)
    assert rel_err(decode_in_pieces(model, tokens, cache), whole) <= 1e-10


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_model_cache_matches_full_forward(kv_heads):
    model = Transformer(50, 32, 4, 2, kv_heads=kv_heads, method="chunked").double().eval()
    tokens = torch.randint(0, 50, (2, N))
    want = model(tokens)
    cache = model.new_cache(max_len=N)
    assert rel_err(decode_in_pieces(model, tokens, cache), want) <= 1e-10
    assert cache.length == N
    assert cache.nbytes() == cache_bytes("full", batch=2, layers=2, kv_heads=kv_heads, head_dim=8, seq_len=N,
                                         dtype=torch.float64)


def test_cache_bytes_matches_filled_caches():
    B, L, Hkv, D = 1, 40, 2, 8
    k = torch.randn(B, Hkv, L, D)
    expected = {"full": 2 * Hkv * L * D * 4, "int8": 2 * Hkv * L * (D + 4),
                "sliding_window": 2 * Hkv * 16 * D * 4, "linear_state": Hkv * (D * D + D) * 4}
    for kind, cls, opts in (("full", KVCache, {"max_len": L}), ("int8", Int8KVCache, {"max_len": L}),
                            ("sliding_window", SlidingWindowCache, {"window": 16}),
                            ("linear_state", LinearStateCache, {})):
        cache = cls(kv_heads=Hkv, head_dim=D, **opts)
        cache.append(k, k)
        predicted = cache_bytes(kind, batch=B, layers=1, kv_heads=Hkv, head_dim=D, seq_len=L, window=16)
        assert cache.nbytes() == predicted == expected[kind], kind


def test_greedy_generation_matches_recomputing_without_cache():
    model = Transformer(30, 32, 4, 2, kv_heads=2, method="chunked").double().eval()
    prompt = torch.randint(0, 30, (2, 6))
    got = model.generate(prompt, 8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_sampled_generation_is_deterministic_under_a_seed():
    model = Transformer(30, 32, 4, 2, method="chunked").eval()
    prompt = torch.randint(0, 30, (2, 4))
    a = model.generate(prompt, 12, greedy=False, temperature=1.5, top_k=10, seed=7)
    b = model.generate(prompt, 12, greedy=False, temperature=1.5, top_k=10, seed=7)
    c = model.generate(prompt, 12, greedy=False, temperature=1.5, top_k=10, seed=8)
    assert a.shape == (2, 16) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 24 draws among ≥ 10 tokens each: equal by chance ~10⁻²⁴
    top1 = model.generate(prompt, 5, greedy=False, top_k=1, seed=1)
    assert torch.equal(top1, model.generate(prompt, 5))  # top_k=1 sampling is greedy


def test_errors():
    model = Transformer(30, 32, 4, 2, kv_heads=2, method="chunked")
    tokens = torch.randint(0, 30, (1, 5))
    with pytest.raises(ValueError, match=r"cache has 3 layers, the model has 2"):
        model(tokens, cache=Transformer(30, 32, 4, 3, kv_heads=2).new_cache())
    with pytest.raises(ValueError, match=r"built for kv_heads=4, head_dim=8; this layer has kv_heads=2"):
        model(tokens, cache=Transformer(30, 32, 4, 2).new_cache())
    cache = model.new_cache(max_len=6)
    model(tokens, cache=cache)
    with pytest.raises(ValueError, match=r"max_len=6 exceeded: it holds 5 tokens, got 2 more"):
        model(tokens[:, :2], cache=cache)
    # 5 prompt tokens, then 2 fed steps (the third sampled token is never fed): 7 > 6.
    with pytest.raises(ValueError, match=r"max_len=6 exceeded: it holds 6 tokens, got 1 more"):
        model.generate(tokens, 3, cache=model.new_cache(max_len=6))
    with pytest.raises(ValueError, match=r"batch size 1, got new tokens with batch size 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"mask and cache do not combine"):
        model(tokens, mask=attnmem.masks.causal(), cache=model.new_cache())
    with pytest.raises(ValueError, match=r"needs a causal layer"):
        Transformer(30, 32, 4, 1, causal=False)(tokens, cache=Transformer(30, 32, 4, 1).new_cache())
    with pytest.raises(ValueError, match=r"unknown cache kind 'pages'"):
        model.new_cache("pages")
    with pytest.raises(ValueError, match=r"window must be a positive int, got 0"):
        model.new_cache("sliding_window", window=0)
    with pytest.raises(TypeError, match=r"cache kind 'full'"):
        model.new_cache("full", window=4)
    for kwargs, msg in (({"steps": -1}, "steps"), ({"steps": 2, "temperature": 0}, "temperature"),
                        ({"steps": 2, "top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=msg):
            model.generate(tokens, **kwargs)


def test_linear_state_zero_denominator_returns_zeros():
    # relu features with eps=0: a query whose features are all zero puts weight 0 on every key.
    q, k, v = rand_qkv(B=1, Hq=2, Hkv=2, Nq=6, D=4, grad=False)
    q[:, :, 3] = -1.0  # relu(-1) = 0
    cache = LinearStateCache(kv_heads=2, head_dim=4, feature_map=torch.relu, eps=0.0)
    got = decode_layer(cache, mha_for(2, 2, 4), q, k, v, splits=[2, 1, 1, 2])
    want = linear_attention_quadratic(q, k, v, torch.relu, eps=0.0)
    assert torch.isfinite(got).all() and (got[:, :, 3] == 0).all()
    assert rel_err(got, want) <= 1e-10
