"""Predicted cache bytes (``cache_bytes``, ``attnmem.plan`` with ``cache=``) against real caches.

Expected values: ``nbytes()`` of caches filled with random keys/values
(``attnmem.bench.decode.filled_cache``), whose layouts test_cache_kinds.py checks by hand.
"""

from __future__ import annotations

import pytest
import torch

from attnmem.bench.decode import DecodeConfig, bench_model, filled_cache
from attnmem.memory.plan import ModelConfig, model_peak
from attnmem.nn import cache_bytes

CFG = DecodeConfig(d_model=64, heads=4, layers=2)
CONTEXT = 300
KINDS = [("full", {}), ("int4", {}), ("int2", {"residual": 32, "group": 16}), ("sink_window", {"budget": 64}),
         ("heavy_hitter", {"budget": 64}), ("snapkv", {"budget": 64, "window": 8})]


@pytest.mark.parametrize("kind,opts", KINDS)
def test_plan_predicts_the_bytes_of_a_filled_cache(kind, opts):
    real = filled_cache(bench_model(CFG, None), kind, CONTEXT, CFG, **opts).nbytes()
    predicted = cache_bytes(kind, batch=1, layers=2, kv_heads=4, head_dim=16, seq_len=CONTEXT,
                            **({"budget": opts["budget"]} if "budget" in opts else opts))
    assert predicted == real
    plan_cfg = ModelConfig(layers=2, d_model=64, heads=4, vocab=256, seq_len=CONTEXT, training=False,
                           cache={"kind": kind, **{k: v for k, v in opts.items() if k != "window"}})
    assert model_peak(plan_cfg, "chunked")["activations"] == real


def test_plan_with_the_full_cache_is_the_default_formula():
    base = ModelConfig(layers=2, d_model=64, heads=4, vocab=256, seq_len=CONTEXT, training=False)
    assert model_peak(base, "chunked")["activations"] == model_peak(base.replace(cache={"kind": "full"}),
                                                                     "chunked")["activations"]
    with pytest.raises(ValueError, match=r"cache must name its kind"):
        model_peak(base.replace(cache={"budget": 4}), "chunked")


def test_paged_prediction_counts_whole_blocks():
    from attnmem.bench.decode import paged_memory

    lengths = [5, 50, 17]
    row = paged_memory(lengths, CFG, block_size=16)
    predicted = cache_bytes("paged", batch=3, layers=2, kv_heads=4, head_dim=16, seq_len=lengths, block_size=16)
    assert row["nbytes"] == predicted + 4 * (1 + 4 + 2)  # + the block table's int32 ids


def test_targets_at_65536_context():
    """The issue's targets at d_model 512, 8 heads, 4 layers, float32, 65536 tokens (from the
    formulas above, which equal the real caches' nbytes)."""
    shape = dict(batch=1, layers=4, kv_heads=8, head_dim=64, seq_len=65536, dtype=torch.float32)
    full = cache_bytes("full", **shape)
    assert cache_bytes("int2", **shape) / full <= 0.15
    assert cache_bytes("int4", **shape) / full <= 0.2
    for kind in ("sink_window", "heavy_hitter", "snapkv"):
        assert cache_bytes(kind, budget=2048, **shape) / full <= 0.035, kind
