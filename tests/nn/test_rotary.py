"""Rotary positions: the written-out definition, relative scores, every method and the caches."""

from __future__ import annotations

import math

import pytest
import torch

import attnmem
from attnmem.nn import MultiHeadAttention, Transformer
from attnmem.nn.attention import rotary
from attnmem.training import TrainConfig

from ..conftest import rel_err


def rotary_by_hand(x: torch.Tensor, positions: list[int], base: float = 10000.0) -> torch.Tensor:
    """The definition, one pair of channels at a time: (i, i + D/2) turned by p · base^(-2i/D)."""
    out = x.clone()
    D = x.shape[-1]
    for n, p in enumerate(positions):
        for i in range(D // 2):
            a = p * base ** (-2 * i / D)
            x1, x2 = x[..., n, i], x[..., n, i + D // 2]
            out[..., n, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., n, i + D // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def test_rotary_matches_its_definition_for_shared_and_per_row_positions():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = [0, 1, 7, 300, 1023]
    assert rel_err(rotary(x, positions=torch.tensor(pos)), rotary_by_hand(x, pos)) <= 1e-12
    per_row = torch.tensor([pos, [4, 5, 6, 7, 8]])  # (B, N): paged caches give each sequence its own
    want = torch.stack([rotary_by_hand(x[0], pos), rotary_by_hand(x[1], [4, 5, 6, 7, 8])])
    assert rel_err(rotary(x, positions=per_row), want) <= 1e-12


def test_rotary_scores_depend_on_the_offset_only():
    q, k = torch.randn(2, 1, 1, 16, dtype=torch.float64).unbind(0)  # (1, 1, 16) each

    def score(pq: int, pk: int) -> float:
        rq = rotary(q[None], positions=torch.tensor([pq]))
        rk = rotary(k[None], positions=torch.tensor([pk]))
        return float((rq * rk).sum())

    assert score(10, 3) == pytest.approx(score(900, 893), rel=1e-9)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def test_rotary_layer_is_any_method_on_rotated_q_and_k():
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 2, method="linear", causal=True, rotary=True).double()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    pos = torch.arange(5, 29)
    q, k, v = (layer.split_heads(p(x), 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    ref = attnmem.attention(rotary(q, positions=pos), rotary(k, positions=pos), v, method="linear", causal=True)
    assert rel_err(layer(x, positions=pos), layer.o_proj(ref.transpose(1, 2).reshape(2, 24, 32))) <= 1e-12


@pytest.mark.parametrize("kind", ["full", "sliding_window"])
def test_rotary_decoding_with_a_cache_matches_the_full_forward(kind):
    torch.manual_seed(0)
    model = Transformer(50, 32, 2, 2, method="chunked", positions="rotary").double().eval()
    tokens = torch.randint(50, (2, 12))
    opts = {"window": 4} if kind == "sliding_window" else {}
    mask = attnmem.masks.sliding_window(4, 0) if kind == "sliding_window" else None
    with torch.no_grad():
        full = model(tokens, mask=mask)
        cache = model.new_cache(kind, **opts)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-10


def test_rotary_model_adds_no_table_and_checkpointing_agrees():
    torch.manual_seed(0)
    plain = Transformer(50, 32, 2, 1, method="chunked", positions="rotary").double()
    ckpt = Transformer(50, 32, 2, 1, method="chunked", positions="rotary", checkpointing=True).double()
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(50, (2, 9))
    assert rel_err(ckpt(tokens), plain(tokens)) <= 1e-12
    # no positions at the input: the first layer's input is the token embedding alone
    seen = []
    plain.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    plain(tokens)
    assert torch.equal(seen[0], plain.embed(tokens))


def test_bad_position_options_are_refused():
    with pytest.raises(ValueError, match="positions must be one of"):
        Transformer(10, 16, 2, 1, positions="alibi")
    with pytest.raises(ValueError, match="even head dimension"):
        MultiHeadAttention(6, 2, rotary=True)
    with pytest.raises(TypeError, match="rotary must be a bool"):
        MultiHeadAttention(8, 2, rotary=1)
    with pytest.raises(ValueError, match="positions must have shape"):
        rotary(torch.randn(1, 1, 4, 8), positions=torch.arange(5))
    with pytest.raises(ValueError, match="positions must be one of"):
        TrainConfig(task="text", seq_len=64, positions="learned")


def test_rotary_in_bfloat16_keeps_the_angles_of_far_positions():
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    pos = torch.tensor([1000, 3000, 9000])
    want = rotary(x, positions=pos)
    got = rotary(x.bfloat16(), positions=pos).double()
    assert rel_err(got, want) <= 2e-2  # bf16 rounding of x and the result only, not of the angles


def test_several_tensors_share_one_table_and_equal_one_call_each():
    q, k = torch.randn(2, 2, 3, 9, 8, dtype=torch.float64).unbind(0)  # (2, 3, 9, 8) each
    pos = torch.randint(0, 500, (2, 9))
    rq, rk = rotary(q, k, positions=pos)
    assert torch.equal(rq, rotary(q, positions=pos)) and torch.equal(rk, rotary(k, positions=pos))


def test_rotary_base_reaches_the_angles_and_the_caches():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, method="chunked", causal=True, rotary=True, rotary_base=1e6).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    pos = torch.arange(7)
    q, k, v = (layer.split_heads(p(x), 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    rq, rk = rotary_by_hand(q, pos.tolist(), base=1e6), rotary_by_hand(k, pos.tolist(), base=1e6)
    ref = attnmem.attention(rq, rk, v, method="chunked", causal=True)
    assert rel_err(layer(x), layer.o_proj(ref.transpose(1, 2).reshape(1, 7, 16))) <= 1e-12
    plain = MultiHeadAttention(16, 2, method="chunked", causal=True, rotary=True).double()
    plain.load_state_dict(layer.state_dict())
    assert rel_err(plain(x), layer(x)) > 1e-6  # the base is not ignored
    model = Transformer(50, 32, 2, 2, method="chunked", positions="rotary", rotary_base=5e5).double().eval()
    tokens = torch.randint(50, (2, 10))
    with torch.no_grad():
        cache = model.new_cache("full")
        steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(4, 10)]
        assert rel_err(torch.cat(steps, 1), model(tokens)) <= 1e-10


def test_bad_rotary_base_is_refused_by_name():
    with pytest.raises(ValueError, match="rotary_base must be a number > 1"):
        MultiHeadAttention(8, 2, rotary=True, rotary_base=1)
    with pytest.raises(ValueError, match="rotary_base must be a number > 1"):
        TrainConfig(task="text", seq_len=64, positions="rotary", rotary_base="big")
    with pytest.raises(ValueError, match="rotary_base needs positions='rotary'"):
        TrainConfig(task="text", seq_len=64, rotary_base=5e5)
