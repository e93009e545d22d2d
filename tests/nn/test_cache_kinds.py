"""Eviction, low-bit and paged caches (``attnmem.nn.cache_evict``, ``cache_lowbit``, ``cache_paged``).

Expected values: the ``full`` cache's decoding (itself tested against the full-sequence forward
in test_cache.py), float64 attention written out over the key set a kind's definition names,
and kept positions worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnmem.nn import (
    HeavyHitterCache,
    Int2KVCache,
    Int4KVCache,
    PagedKVCache,
    SinkWindowCache,
    SnapKVCache,
    Transformer,
    cache_bytes,
)
from attnmem.nn.cache_lowbit import pack, quantize, unpack

from ..conftest import rand_qkv, rel_err
from .test_cache import N, decode_in_pieces, decode_layer, mha_for

# kind -> options whose budget covers N tokens (nothing evicted or quantised)
AMPLE = {"sink_window": {"budget": N, "sinks": 2}, "heavy_hitter": {"budget": N + 3},
         "snapkv": {"budget": N, "window": 3}, "int4": {"residual": N, "group": 4},
         "int2": {"residual": N + 5, "group": 4}, "paged": {"block_size": 4}}


@pytest.mark.parametrize("kind", sorted(AMPLE))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_budget_covering_the_context_equals_the_full_cache(kind, kv_heads):
    torch.manual_seed(3)
    model = Transformer(50, 32, 4, 2, kv_heads=kv_heads, method="chunked").double().eval()
    tokens = torch.randint(0, 50, (2, N))
    want = decode_in_pieces(model, tokens, model.new_cache("full"))
    got = decode_in_pieces(model, tokens, model.new_cache(kind, **AMPLE[kind]))
    assert rel_err(got, want) <= 1e-12


def written_out_attention(q, k, v, keep):
    """q (B, Hq, 1, D) over the keys ``keep`` (a list of positions) of k, v (B, Hkv, L, D)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    ks, vs = k[:, :, keep].repeat_interleave(Hq // Hkv, 1), v[:, :, keep].repeat_interleave(Hq // Hkv, 1)
    return ((q @ ks.transpose(-1, -2)) / math.sqrt(D)).softmax(-1) @ vs


@pytest.mark.parametrize("sinks", [0, 2, 5])
def test_sink_window_attends_to_sinks_and_window(sinks):
    budget, prompt = 5, 4
    q, k, v = rand_qkv(B=2, Hq=4, Hkv=2, Nq=12, D=8, grad=False)
    mha = mha_for(4, 2, 8)
    cache = SinkWindowCache(kv_heads=2, head_dim=8, budget=budget, sinks=sinks)
    cache.attend(mha, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    window = budget - sinks
    for p in range(prompt, 12):
        got = cache.attend(mha, q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
        keep = [j for j in range(p + 1) if j < sinks or j >= p - window]  # the docstring's definition
        assert rel_err(got, written_out_attention(q[:, :, p:p + 1], k, v, keep)) <= 1e-12, p
    # 12 tokens, budget 5, sinks 2: positions 0, 1 and 9, 10, 11.
    expect = {0: [7, 8, 9, 10, 11], 2: [0, 1, 9, 10, 11], 5: [0, 1, 2, 3, 4]}[sinks]
    assert cache.kept_positions()[0, 0].tolist() == expect
    assert cache.nbytes() == 2 * 2 * 5 * 8 * 8 * 2 + 2 * 2 * 5 * 8  # K, V float64 + int64 positions


def _one_hot_query(D, axis, scale=40.0):
    q = torch.zeros(D, dtype=torch.float64)
    q[axis] = scale
    return q


def test_heavy_hitter_keeps_the_written_out_tokens():
    # One head, D = 2. The prompt's 6 queries are 0: uniform causal attention, so prompt key j
    # accumulates S_j = Σ_{i=j}^{5} 1/(i+1): S = 2.45, 1.45, 0.95, 0.617, 0.367, 0.167.
    # budget 5, recent 2: keep {4, 5} and the top 3 of {0..3} = {0, 1, 2}.
    D = 2
    mha = mha_for(1, 1, D)
    cache = HeavyHitterCache(kv_heads=1, head_dim=D, budget=5, recent=2)
    k = torch.zeros(1, 1, 8, D, dtype=torch.float64)
    k[0, 0, 4, 0] = 1.0  # only key 4 is non-zero
    v = torch.randn(1, 1, 8, D, dtype=torch.float64)
    q = torch.zeros(1, 1, 8, D, dtype=torch.float64)
    cache.attend(mha, q[:, :, :6], k[:, :, :6], v[:, :, :6])
    assert cache.kept_positions()[0, 0].tolist() == [0, 1, 2, 4, 5]
    harmonic = [sum(1 / (i + 1) for i in range(j, 6)) for j in range(6)]
    torch.testing.assert_close(cache.score[0, 0], torch.tensor([harmonic[j] for j in (0, 1, 2, 4, 5)],
                                                               dtype=torch.float64))
    # Token 6 looks at key 4 (q·k/√2 = 28.3: probability 1 - 5e-12): key 4's score 0.367 + 1 = 1.367
    # overtakes key 2's 0.95. Keep recent {5, 6} and the top 3 of {0, 1, 2, 4} = {0, 1, 4}.
    q[0, 0, 6] = _one_hot_query(D, 0)
    cache.attend(mha, q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7])
    assert cache.kept_positions()[0, 0].tolist() == [0, 1, 4, 5, 6]
    # Token 7 attends uniformly (1/6 each): scores 0: 2.62, 1: 1.62, 4: 1.53, 5: 0.33, 6: 0.17, 7: 0.17.
    # Keep recent {6, 7} and the top 3 of {0, 1, 4, 5} = {0, 1, 4}.
    cache.attend(mha, q[:, :, 7:8], k[:, :, 7:8], v[:, :, 7:8])
    assert cache.kept_positions()[0, 0].tolist() == [0, 1, 4, 6, 7]


def test_heavy_hitter_breaks_ties_toward_the_earlier_token():
    # Appended tokens carry score 0: all tie, so the earliest of the older ones stay.
    cache = HeavyHitterCache(kv_heads=1, head_dim=2, budget=4, recent=1)
    k = torch.randn(1, 1, 9, 2, dtype=torch.float64)
    cache.append(k, k)
    assert cache.kept_positions()[0, 0].tolist() == [0, 1, 2, 8]


def _snapkv_prompt():
    """A prompt of 8 tokens, D = 4: window rows 5, 6, 7 look at keys 1, 2, 4 (probability ≈ 1)."""
    D = 4
    k = torch.zeros(1, 1, 8, D, dtype=torch.float64)
    for axis, j in enumerate((1, 2, 4)):
        k[0, 0, j, axis] = 1.0
    q = torch.zeros(1, 1, 8, D, dtype=torch.float64)
    for axis, i in enumerate((5, 6, 7)):
        q[0, 0, i] = _one_hot_query(D, axis)
    return q, k, torch.randn(1, 1, 8, D, dtype=torch.float64)


@pytest.mark.parametrize("kernel,expect", [
    # Prefix scores (keys 0..4) ≈ [0, 1, 1, 0, 1]. No pooling: the top 3 are 1, 2, 4.
    (1, [1, 2, 4, 5, 6, 7]),
    # Average pooling over 3, zero-padded: [1/3, 2/3, 2/3, 2/3, 1/3]: the top 3 are 1, 2, 3.
    (3, [1, 2, 3, 5, 6, 7]),
])
def test_snapkv_keeps_what_the_window_attends_to(kernel, expect):
    q, k, v = _snapkv_prompt()
    mha = mha_for(1, 1, 4)
    cache = SnapKVCache(kv_heads=1, head_dim=4, budget=6, window=3, kernel=kernel)
    cache.attend(mha, q, k, v)
    assert cache.kept_positions()[0, 0].tolist() == expect
    # Decoding appends: two more tokens, none evicted, each attends to the kept ones and itself.
    q2, k2, v2 = rand_qkv(B=1, Hq=1, Nq=2, D=4, grad=False)
    for i in range(2):
        got = cache.attend(mha, q2[:, :, i:i + 1], k2[:, :, i:i + 1], v2[:, :, i:i + 1])
        keys = torch.cat([k[:, :, expect], k2[:, :, :i + 1]], 2)  # (1, 1, 7 + i, D)
        values = torch.cat([v[:, :, expect], v2[:, :, :i + 1]], 2)
        want = written_out_attention(q2[:, :, i:i + 1], keys, values, list(range(keys.shape[2])))
        assert rel_err(got, want) <= 1e-12
    assert cache.kept_positions()[0, 0].tolist() == expect + [8, 9]


def test_snapkv_selects_per_head_and_snapshot_matches_prefill():
    # Head 0 sees the prompt above, head 1 the same with keys 0 and 3 swapped in:
    # head 1's window looks at keys 1, 2 and 3 instead.
    q, k, v = _snapkv_prompt()
    k1 = k.clone()
    k1[0, 0, 3], k1[0, 0, 4] = k[0, 0, 4], k[0, 0, 3]
    q, k, v = q.repeat(1, 2, 1, 1), torch.cat([k, k1], 1), v.repeat(1, 2, 1, 1)
    cache = SnapKVCache(kv_heads=2, head_dim=4, budget=6, window=3, kernel=1)
    cache.attend(mha_for(2, 2, 4), q, k, v)
    assert cache.kept_positions()[0].tolist() == [[1, 2, 4, 5, 6, 7], [1, 2, 3, 5, 6, 7]]
    snap = SnapKVCache(kv_heads=2, head_dim=4, budget=6, window=3, kernel=1)
    snap.snapshot(q[:, :, 5:], k, v)
    assert torch.equal(snap.kept_positions(), cache.kept_positions()) and torch.equal(snap.k, cache.k)


@pytest.mark.parametrize("bits", [4, 2])
def test_quantize_within_half_a_step(bits):
    x = torch.randn(3, 5, 64, dtype=torch.float64) * torch.logspace(-2, 2, 64, dtype=torch.float64)
    codes, step, lo = quantize(x, bits, dim=-1)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    err = (codes * step + lo - x).abs()
    # The bound of the module docstring: half a step, plus float rounding of code·step + lo.
    assert (err <= step / 2 + 8 * torch.finfo(x.dtype).eps * x.abs().amax(-1, keepdim=True)).all()
    assert (err > step / 4).any()  # the bound is not loose by a factor of 2 or more
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(codes, bits).shape[-1] == 64 * bits // 8


@pytest.mark.parametrize("cls", [Int4KVCache, Int2KVCache])
def test_lowbit_cache_attends_to_its_dequantised_keys_within_the_bound(cls, monkeypatch):
    monkeypatch.setattr("attnmem.nn.cache_lowbit.LOWBIT_KV_BLOCK", 8)  # several dequantised blocks
    B, Hkv, D, G, R = 2, 2, 8, 4, 3
    q, k, v = rand_qkv(B=B, Hq=4, Hkv=Hkv, Nq=N, D=D, grad=False)
    cache = cls(kv_heads=Hkv, head_dim=D, group=G, residual=R, max_len=N)  # preallocated: exact bytes
    got = decode_layer(cache, mha_for(4, Hkv, D), q, k, v)
    # After N = 19 tokens: the oldest 16 = 4 key groups quantised, 3 in the residual.
    assert cache.quantized == 16 and cache.k_res.shape[2] == 3
    kd, vd = cache.keys_values()
    torch.testing.assert_close(kd[:, :, 16:], k[:, :, 16:], rtol=0, atol=0)  # the residual is exact
    key_step = cache.k_step[:, :, :4].repeat_interleave(G, dim=2)  # (B, Hkv, 16, D): each token's group step
    value_step = cache.v_step[:, :, :16].repeat_interleave(cache.value_group, dim=3)  # (B, Hkv, 16, D)
    tol = 8 * torch.finfo(torch.float64).eps * 10
    assert ((kd[:, :, :16] - k[:, :, :16]).abs() <= key_step / 2 + tol).all()
    assert ((vd[:, :, :16] - v[:, :, :16]).abs() <= value_step / 2 + tol).all()
    # The last step attended to exactly these dequantised keys and values.
    assert rel_err(got[:, :, -1:], written_out_attention(q[:, :, -1:], kd, vd, list(range(N)))) <= 1e-12
    # Packed: D·b/8 bytes per token and head for each of K, V, plus float64 step and lo per group.
    per_token = 2 * D * cls.bits // 8 + 2 * 8 * D / G + 2 * 8 * D / cache.value_group
    quantised = B * Hkv * 16 * per_token
    assert cache.nbytes() == quantised + 2 * B * Hkv * 3 * D * 8


def test_lowbit_preallocated_bytes_match_the_formula():
    cache = Int2KVCache(kv_heads=8, head_dim=64, max_len=1000)
    x = torch.randn(1, 8, 1000, 64)
    cache.append(x, x)
    assert cache.quantized == 864 and cache.k_res.shape[2] == 136  # (1000 - 128) // 32 groups of 32
    assert cache.nbytes() == cache_bytes("int2", batch=1, layers=1, kv_heads=8, head_dim=64, seq_len=1000)


def test_paged_batch_decoding_equals_each_prompt_alone():
    torch.manual_seed(5)
    model = Transformer(40, 32, 4, 2, kv_heads=2, method="chunked").double().eval()
    lengths = [3, 17, 9, 30]
    prompts = [torch.randint(0, 40, (n,)) for n in lengths]
    ragged = model.generate(prompts, 6)
    for p, r in zip(prompts, ragged):
        assert torch.equal(r, model.generate(p[None], 6)[0])
    # Logits too: teacher-forced steps through the paged cache against each prompt alone.
    cache = model.new_cache("paged", block_size=4)
    for s, p in enumerate(prompts):
        with cache.sequences([s]):
            model(p[None], cache=cache)
    steps = torch.randint(0, 40, (len(prompts), 5))
    got = torch.stack([model(steps[:, i:i + 1], cache=cache)[:, 0] for i in range(5)], 1)  # (S, 5, V)
    for s, p in enumerate(prompts):
        alone = model.new_cache("full")
        model(p[None], cache=alone)
        want = torch.cat([model(steps[s:s + 1, i:i + 1], cache=alone) for i in range(5)], 1)[0]
        assert rel_err(got[s], want) <= 1e-12
    # Memory: the blocks the sequences need (ceil(L / 4) each), the table's int32 ids, no padding.
    blocks = sum(math.ceil((n + 5) / 4) for n in lengths)
    assert cache.tokens_held() == sum(lengths) + 20
    pool = sum(layer.k.shape[0] for layer in cache.layers) // 4  # blocks allocated, all layers
    assert pool <= 2 * blocks * (1 + 1 / 32) + 2
    assert cache.nbytes() == sum(2 * layer.k.numel() * 8 for layer in cache.layers) + 4 * blocks


def test_paged_release_reuses_blocks():
    cache = PagedKVCache(kv_heads=1, head_dim=2, block_size=2, num_blocks=3)
    with cache.table.sequences([0]):
        cache.append(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))  # 3 blocks: the whole pool
    with cache.table.sequences([1]), pytest.raises(ValueError, match=r"out of blocks: num_blocks=3"):
        cache.append(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    cache.table.release(0)
    with cache.table.sequences([1]):
        cache.append(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert cache.table.blocks[1] == [0] and cache.table.lengths == [0, 1]


def test_bad_budgets_and_overflows_are_clear_errors():
    model = Transformer(30, 32, 4, 1, kv_heads=2, method="chunked")
    for kind, opts, msg in (
        ("sink_window", {"budget": 0}, r"budget must be a positive int, got 0"),
        ("sink_window", {"budget": 4, "sinks": 5}, r"sinks must be an int in \[0, budget=4\], got 5"),
        ("heavy_hitter", {"budget": 4, "recent": -1}, r"recent must be an int in \[0, budget=4\], got -1"),
        ("heavy_hitter", {"budget": 2.5}, r"budget must be a positive int, got 2.5"),
        ("snapkv", {"budget": 4, "window": 8}, r"window must be at most budget=4"),
        ("snapkv", {"budget": 32, "kernel": 4}, r"kernel must be a positive odd int, got 4"),
        ("snapkv", {"budget": 32, "pooling": "sum"}, r"pooling must be one of \('avg', 'max'\), got 'sum'"),
        ("int4", {"residual": -1}, r"residual must be an int >= 0, got -1"),
        ("int2", {"value_group": 3}, r"value_group must divide head_dim=8, got 3"),
        ("paged", {"block_size": 0}, r"block_size must be a positive int, got 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            model.new_cache(kind, **opts)
    with pytest.raises(TypeError, match=r"cache kind 'sink_window'.*budget"):
        model.new_cache("sink_window")
    with pytest.raises(ValueError, match=r"int2: head_dim must be a multiple of 4"):
        Int2KVCache(kv_heads=1, head_dim=6, group=2)
    tokens = torch.randint(0, 30, (1, 6))
    for kind, opts in (("sink_window", {"budget": 4}), ("int4", {}), ("snapkv", {"budget": 4, "window": 2})):
        cache = model.new_cache(kind, max_len=6, **opts)
        model(tokens, cache=cache)
        with pytest.raises(ValueError, match=r"max_len=6 exceeded: it holds 6 tokens, got 1 more"):
            model(tokens[:, :1], cache=cache)
    paged = model.new_cache("paged", max_len=6)
    with paged.sequences([0]):
        model(tokens, cache=paged)
        with pytest.raises(ValueError, match=r"paged cache max_len=6 exceeded: sequence 0 holds 6 tokens"):
            model(tokens[:, :1], cache=paged)
    with pytest.raises(ValueError, match=r"batch size 2, but 1 sequence\(s\) are selected"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=paged)
    with pytest.raises(ValueError, match=r"need a paged cache, got kind 'full'"):
        model.generate([tokens[0], tokens[0, :2]], 2, cache=model.new_cache("full"))
