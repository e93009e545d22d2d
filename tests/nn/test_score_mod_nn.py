"""MultiHeadAttention's score_mod / sinks / dropout options: learned, honoured, refused."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem.nn import LearnedALiBi, MultiHeadAttention, RelativePositionBias

from ..conftest import rel_err


def _layer(**kw):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, kv_heads=2, method="chunked", causal=True, q_tile=16, kv_tile=16, **kw).double()


def test_learned_bias_and_sinks_match_the_reference_and_train():
    layer = _layer(score_mod=RelativePositionBias(4, num_buckets=16, max_distance=40), sinks=True)
    assert {n for n, _ in layer.named_parameters()} >= {"sinks", "score_mod.table"}
    with torch.no_grad():
        layer.sinks.copy_(torch.randn(4))
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    out = layer(x)
    q, k, v = layer.project(x)
    ref = attnmem.attention(q, k, v, method="reference", causal=True, score_mod=layer.score_mod, sinks=layer.sinks)
    want = layer.o_proj(ref.transpose(1, 2).reshape(2, 37, 32))
    assert rel_err(out, want) <= 1e-10
    g_got = torch.autograd.grad(out.sum(), (layer.sinks, layer.score_mod.table))
    g_want = torch.autograd.grad(want.sum(), (layer.sinks, layer.score_mod.table))
    for a, b in zip(g_got, g_want):
        assert a.abs().sum() > 0 and rel_err(a, b) <= 1e-10


def test_learned_alibi_slopes_get_gradients():
    layer = _layer(score_mod=LearnedALiBi(4))
    layer(torch.randn(1, 20, 32, dtype=torch.float64)).sum().backward()
    assert layer.score_mod.slopes.grad is not None and layer.score_mod.slopes.grad.abs().sum() > 0


def test_dropout_only_while_training():
    layer, plain = _layer(dropout=0.5), _layer()
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    assert not torch.allclose(layer(x), plain(x))
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x))  # the pattern comes from torch's global generator


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"score_mod": 1}, TypeError, "score_mod must be None or a callable"),
    ({"dropout": 1.5}, ValueError, r"dropout must be a number in \[0, 1\)"),
    ({"sinks": 1}, TypeError, "sinks must be a bool"),
])
def test_bad_options(kw, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(32, 4, method="chunked", **kw)


def test_stateful_method_refuses_the_options():
    with pytest.raises(ValueError, match="sinks cannot be applied by method 'linformer'"):
        MultiHeadAttention(32, 4, method="linformer", max_len=64, k=16, sinks=True)


def test_method_that_cannot_honour_score_mod_refuses_at_call():
    layer = MultiHeadAttention(32, 4, method="linear", score_mod=attnmem.scores.softcap(5.0))
    with pytest.raises(ValueError, match="does not support score_mod"):
        layer(torch.randn(1, 8, 32))
