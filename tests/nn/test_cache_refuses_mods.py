"""A decoding cache refuses a layer whose score_mod or sinks its decode step would leave out.

Before this check, a rotary model with ALiBi decoded through a KV cache differed from its own
full forward by 0.06: the prefill applied the bias and the decode steps silently did not."""
import pytest
import torch

from attnmem.nn import Transformer
from attnmem.scores import alibi


@pytest.mark.parametrize("kind", [None, "sliding_window", "paged", "int8"])
@pytest.mark.parametrize("mod", ["score_mod", "sinks"])
def test_a_cache_refuses_score_mod_and_sinks(kind, mod):
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    attn = model.blocks[0].attn
    if mod == "score_mod":
        attn.score_mod = alibi(4)
    else:
        attn.sinks = torch.nn.Parameter(torch.zeros(4))
    options = {"window": 8} if kind == "sliding_window" else {}
    cache = model.new_cache(kind, max_len=32, **options)
    with pytest.raises(ValueError, match=mod):
        model(torch.randint(0, 256, (1, 6)), cache=cache)


def test_a_model_without_mods_still_decodes_exactly():
    torch.manual_seed(0)
    model = Transformer(256, 32, 4, 1, positions="rotary").eval()
    x = torch.randint(0, 256, (1, 10))
    cache = model.new_cache()
    out = torch.cat([model(x[:, :7], cache=cache), model(x[:, 7:], cache=cache)], dim=1)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
