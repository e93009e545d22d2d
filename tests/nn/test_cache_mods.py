"""Decoding with a layer's score_mod and sinks: the ``full`` cache applies them at every step
(with the new tokens at their sequence positions), every other kind refuses the layer.

Before the refusal, a rotary model with ALiBi decoded through a KV cache differed from its own
full forward by 0.06: the prefill applied the bias and the decode steps silently did not."""
import pytest
import torch

from attnmem import attention
from attnmem.nn import MultiHeadAttention, RelativePositionBias, Transformer
from attnmem.nn.cache import KVCache
from attnmem.scores import ALiBi, QueryShifted, alibi, relative_bias, shift_queries, softcap


@pytest.mark.parametrize("kind", ["sliding_window", "paged", "int8", "int4", "sink_window"])
@pytest.mark.parametrize("mod", ["score_mod", "sinks"])
def test_other_caches_refuse_score_mod_and_sinks(kind, mod):
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    attn = model.blocks[0].attn
    if mod == "score_mod":
        attn.score_mod = alibi(4)
    else:
        attn.sinks = torch.nn.Parameter(torch.zeros(4))
    options = {"window": 8} if kind == "sliding_window" else {"budget": 8} if kind == "sink_window" else {}
    cache = model.new_cache(kind, max_len=32, **options)
    with pytest.raises(ValueError, match=f"{mod}.*use the 'full' cache"):
        model(torch.randint(0, 256, (1, 6)), cache=cache)


def decode_in_pieces(model, x, cuts, cache):
    pieces, start = [], 0
    for end in [*cuts, x.shape[1]]:
        pieces.append(model(x[:, start:end], cache=cache))
        start = end
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_an_alibi_model_decodes_its_own_forward(positions, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 2, positions=positions, alibi=True).double().eval()
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = model(x)
        # a prefill of 5, single tokens, then three at once
        out = decode_in_pieces(model, x, [5, 6, 7, 8, 10], model.new_cache("full"))
        torch.testing.assert_close(out, full, atol=1e-10, rtol=1e-10)
        # the test can fail: unshifted, each new token would get the bias of query 0
        monkeypatch.setattr("attnmem.nn.cache.shift_queries", lambda mod, shift: mod)
        wrong = decode_in_pieces(model, x, [5, 6, 7, 8, 10], model.new_cache("full"))
    assert (wrong[:, 5:] - full[:, 5:]).abs().max() > 1e-3


def position_mod(score, b, h, q_idx, kv_idx):
    """A generic score_mod (no fast path) that reads both indices and the head."""
    return score + 0.05 * torch.sin(0.3 * q_idx + 0.1 * kv_idx + h)


MODS = ["softcap", "relative_bias", "learned_relative", "generic"]


@pytest.mark.parametrize(("mod", "sinks"), [(m, s) for m in MODS for s in (False, True)] + [("none", True)])
def test_full_cache_applies_a_layer_mod_and_sinks(mod, sinks):
    torch.manual_seed(1)
    H, Hkv, D, N = 4, 2, 8, 11
    score_mod = {"softcap": softcap(0.7), "relative_bias": relative_bias(torch.randn(32, H, dtype=torch.float64)),
                 "learned_relative": RelativePositionBias(H, bidirectional=False).double(),
                 "generic": position_mod, "none": None}[mod]
    mha = MultiHeadAttention(H * D, H, kv_heads=Hkv, causal=True, score_mod=score_mod, sinks=sinks).double().eval()
    if sinks:
        mha.sinks.data = torch.randn(H, dtype=torch.float64)
    x = torch.randn(2, N, H * D, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x)
        cache = KVCache(kv_heads=Hkv, head_dim=D)
        out = torch.cat([mha(x[:, :4], cache=cache), mha(x[:, 4:5], cache=cache), mha(x[:, 5:8], cache=cache),
                         mha(x[:, 8:], cache=cache)], dim=1)
    torch.testing.assert_close(out, full, atol=1e-10, rtol=1e-10)


def test_shift_queries_is_the_mod_at_later_positions():
    torch.manual_seed(2)
    s = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.arange(3).view(1, 3, 1, 1)
    qi, ki = torch.arange(4).view(1, 1, 4, 1), torch.arange(6).view(1, 1, 1, 6)
    table = torch.randn(32, 3, dtype=torch.float64)
    for mod in (alibi(3), relative_bias(table), position_mod):
        shifted = shift_queries(mod, 2)
        torch.testing.assert_close(shifted(s, b, h, qi, ki), mod(s, b, h, qi + 2, ki), atol=0, rtol=0)
    assert type(shift_queries(alibi(3), 2)) is ALiBi and shift_queries(alibi(3, offset=1), 2).offset == 3
    cap = softcap(1.0)
    assert shift_queries(cap, 5) is cap and shift_queries(position_mod, 0) is position_mod
    # the T5 table keeps its fast path, shifted too
    shifted = shift_queries(relative_bias(table), 2)
    assert isinstance(shifted, QueryShifted)
    torch.testing.assert_close(shifted.additive_bias(h, qi, ki, torch.float64),
                               relative_bias(table).additive_bias(h, qi + 2, ki, torch.float64))
    assert not hasattr(shift_queries(position_mod, 2), "additive_bias")
    with pytest.raises(TypeError, match="shift must be an int"):
        shift_queries(position_mod, 1.0)
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        shift_queries(3, 1)


def test_a_shifted_mod_matches_the_full_rows_through_attention():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    full = attention(q, k, v, causal=True, score_mod=position_mod)
    last = attention(q[:, :, 6:], k, v, causal=True, score_mod=shift_queries(position_mod, 6))
    torch.testing.assert_close(last, full[:, :, 6:], atol=1e-12, rtol=1e-12)


def test_a_model_without_mods_still_decodes_exactly():
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    x = torch.randint(0, 256, (1, 10))
    cache = model.new_cache()
    out = torch.cat([model(x[:, :7], cache=cache), model(x[:, 7:], cache=cache)], dim=1)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
