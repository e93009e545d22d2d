"""``attnmem.estimate`` with score_mod, sinks and dropout: the kernel path the call takes, traced."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import scores as S
from attnmem.memory.estimate import estimate

N, H, D = 128, 2, 8


def _measured(**mods) -> int:
    q, k, v = (torch.randn(1, H, N, D, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        attnmem.attention(q, k, v, method="chunked", causal=True, q_tile=64, kv_tile=64, **mods).sum().backward()

    return attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes


@pytest.mark.parametrize("name", ["alibi", "softcap", "dropout"])
def test_estimate_follows_each_fast_path_to_the_byte(name):
    mods = {"alibi": {"score_mod": S.alibi(H)}, "softcap": {"score_mod": S.softcap(30.0)},
            "dropout": {"dropout_p": 0.1}}[name]
    est = estimate("chunked", batch=1, heads=H, seq_len=N, head_dim=D, causal=True, q_tile=64, kv_tile=64,
                   how="trace", **mods)
    assert est.source == "trace" and est.shape.mods == {"alibi": "bias", "softcap": "softcap", "dropout": ""}[name]
    assert est.peak_bytes == _measured(**mods)
    # The plain call is a different path (one fused call): the modification is not ignored.
    plain = estimate("chunked", batch=1, heads=H, seq_len=N, head_dim=D, causal=True, q_tile=64, kv_tile=64)
    assert plain.peak_bytes != est.peak_bytes


def test_estimate_refuses_what_a_method_cannot_honour():
    with pytest.raises(ValueError, match="does not support score_mod"):
        estimate("linear", batch=1, heads=H, seq_len=N, head_dim=D, score_mod=S.softcap(3.0))
    with pytest.raises(ValueError, match="sinks must have shape"):
        estimate("chunked", batch=1, heads=H, seq_len=N, head_dim=D, sinks=torch.zeros(H + 1))
    with pytest.raises(ValueError, match="world_size"):
        estimate("chunked", batch=1, heads=H, seq_len=N, head_dim=D, world_size=2, dropout_p=0.1)
