"""Decoding with a layer's score_mod and sinks.

``full``, ``paged``, ``sliding_window``, ``int8``, ``int4`` and ``int2`` apply them at every
step, with the new tokens at their sequence positions (``attnmem.scores.shift_positions``);
the eviction kinds refuse such a layer by name. Expected values: the layer's or model's own
full-sequence forward (which applies the mods by ``attnmem.attention``'s definition) in
float64, or, for the quantised kinds, attention written out over their dequantised keys.

Before the refusal, a rotary model with ALiBi decoded through a KV cache differed from its own
full forward by 0.06: the prefill applied the bias and the decode steps silently did not."""
import pytest
import torch

from attnmem import attention, masks
from attnmem.nn import (
    Int2KVCache,
    Int4KVCache,
    Int8KVCache,
    KVCache,
    MultiHeadAttention,
    PagedKVCache,
    RelativePositionBias,
    SlidingWindowCache,
    Transformer,
)
from attnmem.nn.cache import FoldedMods, folded_attention
from attnmem.scores import ALiBi, PositionShifted, alibi, relative_bias, shift_positions, softcap

H, HKV, D = 4, 2, 8
CUTS = [4, 5, 8, 9, 12]  # a prefill of 4, single tokens, three at once, then the rest (N = 15)
N = 15


@pytest.mark.parametrize("kind", ["sink_window", "heavy_hitter", "snapkv"])
@pytest.mark.parametrize("mod", ["score_mod", "sinks"])
def test_eviction_caches_refuse_score_mod_and_sinks(kind, mod):
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    attn = model.blocks[0].attn
    if mod == "score_mod":
        attn.score_mod = alibi(4)
    else:
        attn.sinks = torch.nn.Parameter(torch.zeros(4))
    cache = model.new_cache(kind, max_len=32, budget=8)
    with pytest.raises(ValueError, match=f"{mod}.*use the 'full' cache"):
        model(torch.randint(0, 256, (1, 6)), cache=cache)


def in_pieces(module, x, cache, cuts=CUTS):
    pieces, start = [], 0
    for end in [*cuts, x.shape[1]]:
        pieces.append(module(x[:, start:end], cache=cache))
        start = end
    return torch.cat(pieces, dim=1)


# kind -> options under which the kind holds every token in full precision
EXACT = {"full": {}, "paged": {"block_size": 4}, "sliding_window": {"window": N + 1},
         "int4": {"residual": N, "group": 4}, "int2": {"residual": N, "group": 4}}


@pytest.mark.parametrize("kind", sorted(EXACT))
@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_an_alibi_model_decodes_its_own_forward(kind, positions, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 2, kv_heads=2, positions=positions, alibi=True).double().eval()
    x = torch.randint(0, 256, (2, N))
    with torch.no_grad():
        full = model(x)
        out = in_pieces(model, x, model.new_cache(kind, **EXACT[kind]))
        torch.testing.assert_close(out, full, atol=1e-10, rtol=1e-10)
        # the test can fail: unshifted, each new token would get the bias of query 0
        monkeypatch.setattr("attnmem.nn.cache.shift_positions", lambda mod, *shifts: mod)
        wrong = in_pieces(model, x, model.new_cache(kind, **EXACT[kind]))
    assert (wrong[:, 4:] - full[:, 4:]).abs().max() > 1e-3


def position_mod(score, b, h, q_idx, kv_idx):
    """A generic score_mod (no fast path) that reads both absolute indices and the head."""
    return score + 0.05 * torch.sin(0.3 * q_idx + 0.1 * kv_idx + h)


def masking_mod(score, b, h, q_idx, kv_idx):
    """Masks the first two keys by -inf (a score_mod may mask): rows still see later keys."""
    return torch.where(kv_idx < 2, float("-inf"), score)


def make_mod(name):
    return {"softcap": softcap(0.7), "alibi": alibi(H),
            "relative_bias": relative_bias(torch.randn(32, H, dtype=torch.float64)),
            "learned_relative": RelativePositionBias(H, bidirectional=False).double(),
            "generic": position_mod, "masking": masking_mod, "none": None}[name]


MODS = ["softcap", "alibi", "relative_bias", "learned_relative", "generic", "masking"]
CASES = [(m, s) for m in MODS for s in (False, True)] + [("none", True)]


def layer(mod, sinks):
    mha = MultiHeadAttention(H * D, H, kv_heads=HKV, causal=True, score_mod=make_mod(mod), sinks=sinks)
    mha = mha.double().eval()
    if sinks:
        mha.sinks.data = torch.randn(H, dtype=torch.float64)
    return mha


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "tiled"])
@pytest.mark.parametrize(("mod", "sinks"), CASES)
def test_full_and_paged_caches_apply_a_layer_mod_and_sinks(mod, sinks, folded, monkeypatch):
    if not folded:  # every step through attnmem.attention's tiled path, as many new tokens at once take
        monkeypatch.setattr("attnmem.nn.cache.FOLDED_ROWS", 0)
    monkeypatch.setattr("attnmem.nn.cache.KV_BLOCK", 4)  # several key blocks per step
    torch.manual_seed(1)
    mha = layer(mod, sinks)
    x = torch.randn(2, N, H * D, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x)
        for cache in (KVCache(kv_heads=HKV, head_dim=D), PagedKVCache(kv_heads=HKV, head_dim=D, block_size=4)):
            torch.testing.assert_close(in_pieces(mha, x, cache), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "tiled"])
@pytest.mark.parametrize(("mod", "sinks"), CASES)
def test_sliding_window_cache_applies_a_layer_mod_and_sinks(mod, sinks, folded, monkeypatch):
    if not folded:
        monkeypatch.setattr("attnmem.nn.cache.FOLDED_ROWS", 0)
    monkeypatch.setattr("attnmem.nn.cache.KV_BLOCK", 4)  # several key blocks per step
    torch.manual_seed(2)
    mha, w = layer(mod, sinks), 5
    x = torch.randn(2, N, H * D, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x, mask=masks.sliding_window(w, 0))  # the kind's definition, mods included
        got = in_pieces(mha, x, SlidingWindowCache(kv_heads=HKV, head_dim=D, window=w))
    torch.testing.assert_close(got, full, atol=1e-10, rtol=1e-10)


def dequantised(cache, length):
    """The keys and values (B, Hkv, length, D) a quantised cache decodes with."""
    if isinstance(cache, Int8KVCache):
        return tuple(getattr(cache, n)[:, :, :length].double() * getattr(cache, f"{n}_scale")[:, :, :length].double()
                     for n in ("k", "v"))
    return cache.keys_values()


@pytest.mark.parametrize("cls", [Int8KVCache, Int4KVCache, Int2KVCache])
@pytest.mark.parametrize(("mod", "sinks"), CASES)
def test_quantised_caches_apply_a_layer_mod_and_sinks_to_their_keys(cls, mod, sinks, monkeypatch):
    monkeypatch.setattr("attnmem.nn.cache.KV_BLOCK", 4)  # several blocks, the mod at each's positions
    monkeypatch.setattr("attnmem.nn.cache_lowbit.LOWBIT_KV_BLOCK", 4)
    torch.manual_seed(3)
    mha = layer(mod, sinks)
    opts = {} if cls is Int8KVCache else {"group": 4, "residual": 3}
    cache = cls(kv_heads=HKV, head_dim=D, **opts)
    x = torch.randn(2, N, H * D, dtype=torch.float64)
    q, k, v = mha.project(x)
    with torch.no_grad():
        cache.attend(mha, q[:, :, :N - 1], k[:, :, :N - 1], v[:, :, :N - 1])
        got = cache.attend(mha, q[:, :, N - 1:], k[:, :, N - 1:], v[:, :, N - 1:])  # (B, Hq, 1, D)
        kd, vd = dequantised(cache, N)
        mods = {} if mha.score_mod is None else {"score_mod": shift_positions(mha.score_mod, N - 1)}
        want = attention(q[:, :, N - 1:], kd, vd, causal=True, sinks=mha.sinks, **mods)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if cls is not Int8KVCache:
        assert cache.quantized == 12  # three groups quantised, three tokens in the residual


def test_a_folded_row_that_sees_no_key_is_zeros_as_in_attention():
    torch.manual_seed(5)
    mha = layer("masking", False)
    q, k, v = (torch.randn(1, HKV if i else H, 5, D, dtype=torch.float64) for i in range(3))
    got = folded_attention(q[:, :, 1:], k, v, FoldedMods(mha, q[:, :, 1:], 1), block=2)
    want = attention(q, k, v, causal=True, score_mod=masking_mod)[:, :, 1:]  # position 1 sees keys 0, 1: none
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_shift_positions_is_the_mod_at_later_positions():
    torch.manual_seed(2)
    s = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.arange(3).view(1, 3, 1, 1)
    qi, ki = torch.arange(4).view(1, 1, 4, 1), torch.arange(6).view(1, 1, 1, 6)
    table = torch.randn(32, 3, dtype=torch.float64)
    for mod in (alibi(3), relative_bias(table), position_mod):
        for shifts in ((2, 0), (5, 3)):
            torch.testing.assert_close(shift_positions(mod, *shifts)(s, b, h, qi, ki),
                                       mod(s, b, h, qi + shifts[0], ki + shifts[1]), atol=0, rtol=0)
    assert type(shift_positions(alibi(3), 2)) is ALiBi and shift_positions(alibi(3, offset=1), 5, 3).offset == 3
    cap = softcap(1.0)
    assert shift_positions(cap, 5) is cap and shift_positions(position_mod, 0) is position_mod
    # the T5 table keeps its fast path, shifted too
    shifted = shift_positions(relative_bias(table), 2, 1)
    assert isinstance(shifted, PositionShifted)
    torch.testing.assert_close(shifted.additive_bias(h, qi, ki, torch.float64),
                               relative_bias(table).additive_bias(h, qi + 2, ki + 1, torch.float64))
    assert not hasattr(shift_positions(position_mod, 2), "additive_bias")
    with pytest.raises(TypeError, match="q_shift must be an int"):
        shift_positions(position_mod, 1.0)
    with pytest.raises(TypeError, match="kv_shift must be an int"):
        shift_positions(position_mod, 1, True)
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        shift_positions(3, 1)


def test_a_shifted_mod_matches_the_full_rows_through_attention():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    full = attention(q, k, v, causal=True, score_mod=position_mod)
    last = attention(q[:, :, 6:], k, v, causal=True, score_mod=shift_positions(position_mod, 6))
    torch.testing.assert_close(last, full[:, :, 6:], atol=1e-12, rtol=1e-12)


def test_an_alibi_model_generates_through_the_paged_cache():
    torch.manual_seed(4)
    model = Transformer(40, 32, 4, 2, kv_heads=2, positions="rotary", alibi=True).double().eval()
    prompts = [torch.randint(0, 40, (n,)) for n in (3, 11, 7)]
    for p, r in zip(prompts, model.generate(prompts, 5)):
        assert torch.equal(r, model.generate(p[None], 5)[0])  # each alone: the full cache


def test_a_model_without_mods_still_decodes_exactly():
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    x = torch.randint(0, 256, (1, 10))
    cache = model.new_cache()
    out = torch.cat([model(x[:, :7], cache=cache), model(x[:, 7:], cache=cache)], dim=1)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
