"""length_scale (Scalable-Softmax): the written-out definition, every method, caches, training."""

from __future__ import annotations

import math

import pytest
import torch

import attnmem
from attnmem.nn import MultiHeadAttention, Transformer
from attnmem.nn.attention import LENGTH_SCALE_INIT_KEYS, rotary
from attnmem.training import TrainConfig, fit

from ..conftest import rel_err


def ssmax_by_hand(layer: MultiHeadAttention, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Softmax(s_h · log(n_i) · q_i · k_j / sqrt(D)) one query row at a time, n_i the keys row i sees."""
    B, N, _ = x.shape
    H, D = layer.n_heads, layer.head_dim
    q, k, v = (layer.split_heads(p(x), H) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if layer.rotary:
        q, k = rotary(q, k, positions=torch.arange(N))
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(N):
            n = i + 1 if causal else N
            logits = float(layer.length_scale[h].detach()) * math.log(n) * (k[:, h, :n] @ q[:, h, i, :, None])[..., 0]
            out[:, h, i] = (logits / math.sqrt(D)).softmax(-1)[:, None, :].matmul(v[:, h, :n])[:, 0]
    return layer.o_proj(out.transpose(1, 2).reshape(B, N, H * D))


@pytest.mark.parametrize("causal", [True, False])
def test_length_scale_matches_its_definition(causal):
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 3, method="chunked", causal=causal, rotary=True, length_scale=True).double()
    with torch.no_grad():  # distinct per-head scales, so a head mix-up fails
        layer.length_scale.copy_(torch.tensor([0.1, 0.25, 0.4], dtype=torch.float64))
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    assert rel_err(layer(x), ssmax_by_hand(layer, x, causal=causal)) <= 1e-12


def test_length_scale_starts_as_plain_softmax_at_128_keys_and_learns():
    layer = MultiHeadAttention(16, 2, causal=True, length_scale=True)
    assert LENGTH_SCALE_INIT_KEYS == 128
    assert torch.allclose(layer.length_scale * math.log(128), torch.ones(2))
    x = torch.randn(1, 20, 16)
    layer(x).square().sum().backward()
    assert layer.length_scale.grad is not None and layer.length_scale.grad.abs().min() > 0


@pytest.mark.parametrize("method", ["sdpa", "sliding_window", "linear"])
def test_every_method_sees_the_scaled_queries(method):
    torch.manual_seed(1)
    opts = {"window": 4} if method == "sliding_window" else {}
    layer = MultiHeadAttention(16, 2, method=method, causal=True, length_scale=True, **opts).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    q, k, v = (layer.split_heads(p(x), 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    factor = layer.length_scale.double()[:, None, None] * torch.arange(1, 10, dtype=torch.float64).log()[:, None]
    ref = attnmem.attention(q * factor, k, v, method=method, causal=True, **opts)
    assert rel_err(layer(x), layer.o_proj(ref.transpose(1, 2).reshape(1, 9, 16))) <= 1e-12


@pytest.mark.parametrize("kind", ["full", "paged"])
def test_decoding_with_a_cache_matches_the_full_forward(kind):
    torch.manual_seed(0)
    model = Transformer(50, 32, 2, 2, method="chunked", positions="rotary", length_scale=True).double().eval()
    tokens = torch.randint(50, (2, 12))
    opts = {"block_size": 4} if kind == "paged" else {}
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(kind, **opts)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-10


def test_a_train_config_trains_and_reloads_it(tmp_path):
    cfg = TrainConfig(task="text", seq_len=32, d_model=16, n_heads=2, n_layers=1, positions="rotary",
                      length_scale=True, batch_size=2, steps=4, eval_every=2, eval_examples=2,
                      checkpoint_every=2, out_dir=str(tmp_path))
    result = fit(cfg)
    scales = [b.attn.length_scale for b in result.model.net.blocks]
    assert all(s is not None for s in scales)
    assert not torch.allclose(scales[0], torch.full((2,), 1 / math.log(128)))  # it trained
    from attnmem.bench.quality import load_trained

    _, model, _ = load_trained(str(tmp_path))
    assert torch.equal(model.net.blocks[0].attn.length_scale, scales[0])


def test_bad_length_scale_is_refused_by_name():
    with pytest.raises(TypeError, match="length_scale must be a bool"):
        MultiHeadAttention(8, 2, length_scale=1)
    with pytest.raises(ValueError, match="length_scale must be a bool"):
        TrainConfig(task="text", seq_len=64, length_scale="yes")
    with pytest.raises(ValueError, match="length_scale with sequence_parallel needs causal=True"):
        MultiHeadAttention(8, 2, length_scale=True, sequence_parallel=object())
