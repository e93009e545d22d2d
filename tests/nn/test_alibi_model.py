"""``Transformer(alibi=True)`` / ``TrainConfig.alibi``: ALiBi's fixed slopes in every layer."""
from __future__ import annotations

import pytest
import torch

from attnmem.nn import Transformer
from attnmem.scores import ALiBi, alibi
from attnmem.training import TrainConfig, fit


@pytest.mark.parametrize("positions", ["rotary", "sinusoidal"])
def test_alibi_model_is_the_model_with_alibi_in_every_layer(positions):
    torch.manual_seed(0)
    with_alibi = Transformer(256, 32, 4, 2, positions=positions, alibi=True).eval()
    torch.manual_seed(0)
    by_hand = Transformer(256, 32, 4, 2, positions=positions).eval()
    x = torch.randint(0, 256, (2, 24))
    plain = by_hand(x)
    for block in by_hand.blocks:
        block.attn.score_mod = alibi(4)
    torch.testing.assert_close(with_alibi(x), by_hand(x), rtol=0, atol=0)
    assert (with_alibi(x) - plain).abs().max() > 1e-2  # the bias changes the model


def test_alibi_penalises_distance_in_a_layer():
    """One layer, q = k = 0: scores are the bias alone, so weights decay as 2^(-8h/H)·distance."""
    model = Transformer(256, 16, 2, 1, positions="rotary", alibi=True).eval()
    attn = model.blocks[0].attn
    v = torch.eye(8)[None, None].expand(1, 2, 8, 8).contiguous()  # values one-hot by position
    q = torch.zeros(1, 2, 8, 8)
    out = attn.attend(q, q, v)  # (1, 2, 8, 8): row i is the weights over keys 0..i
    slopes = torch.tensor([2.0 ** -4, 2.0 ** -8])
    want = torch.zeros(2, 8, 8)
    for h in range(2):
        for i in range(8):
            w = torch.exp(-slopes[h] * (i - torch.arange(i + 1)))
            want[h, i, : i + 1] = w / w.sum()
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=1e-5)


def test_a_train_config_with_alibi_trains_and_reloads_it(tmp_path):
    cfg = TrainConfig(task="text", seq_len=32, d_model=32, n_heads=2, n_layers=1, positions="rotary",
                      alibi=True, batch_size=2, steps=4, eval_every=2, eval_examples=2, checkpoint_every=2,
                      out_dir=str(tmp_path / "run"), seed=0)
    fit(cfg)
    from attnmem.bench.quality import load_trained

    config, model, _ = load_trained(str(tmp_path / "run"))
    assert config.alibi is True
    assert all(isinstance(b.attn.score_mod, ALiBi) for b in model.net.blocks)


def test_bad_alibi_is_refused():
    with pytest.raises(TypeError, match="alibi"):
        Transformer(256, 32, 4, 1, alibi=1)
    with pytest.raises(ValueError, match="alibi"):
        TrainConfig(task="text", seq_len=32, alibi="yes")
    with pytest.raises(ValueError, match="score_mod"):
        Transformer(256, 32, 4, 1, alibi=True, score_mod=alibi(4))
