"""Swap-in evaluation and the error of a method on a model's captured attention inputs."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem.bench.quality import (
    bpb_by_position,
    capture_attention_inputs,
    captured_error,
    context_margin,
    seed_stats,
    swap_attention,
)
from attnmem.nn import Transformer


def _model(n_layers: int = 2) -> Transformer:
    torch.manual_seed(0)
    return Transformer(64, 32, 2, n_layers, method="chunked").eval()


def test_swap_replaces_the_method_and_keeps_the_weights():
    model = _model()
    tokens = torch.randint(64, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        narrow = swap_attention(model, "sliding_window", {"window": 4})(tokens)
        wide = swap_attention(model, "sliding_window", {"window": 48})(tokens)
    assert (narrow - base).abs().max() > 1e-3  # N = 48 > window: keys are dropped
    torch.testing.assert_close(wide, base, rtol=1e-5, atol=1e-5)  # window >= N: full causal attention
    assert model.blocks[0].attn.method == "chunked"  # the original is untouched
    with pytest.raises(TypeError, match="window"):
        swap_attention(model, "chunked", {"window": 4})


def test_captured_error_is_zero_only_for_full_attention():
    model = _model()
    tokens = torch.randint(64, (2, 48), generator=torch.Generator().manual_seed(2))
    caps = capture_attention_inputs(model, tokens)
    assert [c.layer for c in caps] == [0, 1] and caps[0].q.shape == (2, 2, 48, 16) and caps[0].causal
    assert captured_error(caps, "chunked")["error_max"] < 1e-6
    window = captured_error(caps, "sliding_window", {"window": 4})
    assert window["status"] == "ok" and window["error_mean"] > 1e-3
    assert captured_error(caps, "sliding_window", {"window": 48})["error_max"] < 1e-6
    refused = captured_error(caps, "linformer", {"max_len": 48, "k": 8})
    assert refused["status"] == "not applicable" and "causal" in refused["reason"]


def test_context_margin_against_hand_computed_spreads():
    assert seed_stats([2.0, 2.2, 2.1]) == pytest.approx({"mean": 2.1, "std": 0.1, "range": 0.2, "n": 3})
    assert seed_stats([3.0])["std"] == 0.0
    # margin 0.5 over a spread of 0.1 (the short context's range): 5 x, met; baseline 2.2 beaten.
    met = context_margin([2.0, 2.05, 2.02], [2.5, 2.6, 2.55], baseline=2.2)
    assert met["margin"] == pytest.approx(2.55 - 2.0233333, abs=1e-6) and met["spread"] == pytest.approx(0.1)
    assert met["beats_short"] and met["beats_baseline"] and not met["short_beats_baseline"]
    # the same margin over a wider spread misses; one long seed above the baseline misses it.
    missed = context_margin([1.8, 2.3, 2.0], [2.5, 2.6, 2.55], baseline=2.2)
    assert not missed["beats_short"] and not missed["beats_baseline"]
    assert not context_margin([2.6], [2.5], baseline=3.0)["beats_short"]  # the short context won
    with pytest.raises(ValueError, match="at least one"):
        seed_stats([])


def test_captures_of_a_rotary_model_are_the_rotated_q_and_k_it_attends_with():
    torch.manual_seed(0)
    model = Transformer(64, 32, 2, 2, method="chunked", positions="rotary").eval()
    tokens = torch.randint(64, (2, 40), generator=torch.Generator().manual_seed(3))
    outputs = []
    handles = [b.attn.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in model.blocks]
    caps = capture_attention_inputs(model, tokens)
    for h in handles:
        h.remove()
    for cap, out, block in zip(caps, outputs, model.blocks):
        o = attnmem.attention(cap.q, cap.k, cap.v, method="reference", causal=True)  # (B, H, N, D)
        torch.testing.assert_close(block.attn.o_proj(o.transpose(1, 2).reshape(2, 40, 32)), out,
                                   rtol=1e-4, atol=1e-5)


def test_bpb_by_position_is_the_cross_entropy_of_each_bucket():
    torch.manual_seed(0)
    model = Transformer(256, 32, 2, 1, method="chunked").eval()
    gen = torch.Generator().manual_seed(4)
    inputs, labels = torch.randint(256, (3, 40), generator=gen), torch.randint(256, (3, 40), generator=gen)
    got = bpb_by_position(model, inputs, labels, edges=(0, 8, 32, 64), batch_size=2)
    assert list(got) == ["0-8", "8-32", "32-40"]  # the last bucket stops at the window
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(inputs).double().transpose(1, 2), labels, reduction="none")
    assert got["8-32"] == pytest.approx(float(nats[:, 8:32].mean()) / 0.6931471805599453, rel=1e-9)
    with pytest.raises(ValueError, match="edges"):
        bpb_by_position(model, inputs, labels, edges=(1, 8))
