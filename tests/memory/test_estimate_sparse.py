"""Closed forms of the sparse, selective and adaptive-span methods (mechanisms/sparse_memory.py,
the ``memory_model`` of selective.py and adaptive_span.py).

Their agreement with the fake-tensor trace runs in tests/test_estimate.py
(``test_closed_form_agrees_with_trace`` covers every registered method); here: they answer at
a million tokens, linearly, and the block-map rows they sample are the rows the kernel plans.
"""

from __future__ import annotations

import pytest
import torch

from attnmem import masks as M
from attnmem import registry
from attnmem.mechanisms.sparse_memory import _tile_rows
from attnmem.memory.estimate import estimate
from attnmem.memory.model import Shape

MILLION_CASES = [
    ("sliding_window", {}), ("dilated", {}), ("longformer", {}), ("bigbird", {}), ("strided", {}),
    ("strided", {"pattern": "fixed"}), ("topk", {}), ("hard", {}), ("adaptive_span", {}),
    ("adaptive_span_fixed", {}),
]


@pytest.mark.parametrize("name, opts", MILLION_CASES, ids=lambda x: str(x))
def test_formula_answers_at_a_million_tokens(monkeypatch, name, opts):
    # All of these are O(N) in memory (a tile at a time), so doubling N doubles the peak to within
    # the tile-sized working set; a trace would take minutes (O(N / tile) kernel calls). The
    # answer must come without tracing (its time, ≤ 2 s, is benchmarks/estimate_sparse.py's).
    from attnmem.memory import estimate as est_mod

    def no_trace(*a, **k):
        raise AssertionError("traced at a million tokens")

    monkeypatch.setattr(est_mod, "trace_peak", no_trace)
    kw = dict(batch=1, heads=8, head_dim=64, causal=True, **opts)
    big = estimate(name, seq_len=2**20, **kw)
    half = estimate(name, seq_len=2**19, **kw)
    assert big.source == "formula" and half.source == "formula"
    assert 1.9 < big.peak_bytes / half.peak_bytes < 2.1
    floor = 7 * 2**20 * 8 * 64 * 4  # q, k, v, out, dq, dk, dv
    assert floor < big.peak_bytes


@pytest.mark.parametrize("name, opts", [
    ("sliding_window", dict(window=(96, 0))), ("dilated", dict(window=40, dilation=3)),
    ("bigbird", dict(block=32)), ("strided", dict(stride=48)), ("strided", dict(pattern="fixed", stride=64)),
])
@pytest.mark.parametrize("causal", [False, True])
def test_sampled_rows_are_the_block_map_rows(name, opts, causal):
    # The formulas read a few query tiles' rows from the pattern's tile_states; the kernel reads
    # all rows from block_map. They must agree wherever both are defined.
    m = registry.get(name)
    o = m.make_options(opts)
    local, _ = m.split(o, 1000)
    mask = M.causal() & local if causal else local
    s = Shape(1, 2, 2, 1000, 16, 4, "float32", True, causal, False)
    tiles = list(range(0, 1000 // o.q_tile + 1))
    expected = mask.block_map(1000, 1000, o.q_tile, o.kv_tile, batch=1, heads=2).rows()
    assert _tile_rows(mask, s, o.q_tile, o.kv_tile, tiles) == expected


def test_options_change_the_closed_form():
    # The working set follows the options: a wider window means wider segments.
    kw = dict(batch=1, heads=8, seq_len=2**16, head_dim=64, how="formula")
    wide, narrow = (estimate("sliding_window", window=w, **kw).peak_bytes for w in (1024, 64))
    assert wide > narrow
    assert estimate("topk", topk=64, **kw).peak_bytes > estimate("topk", topk=8, **kw).peak_bytes


def test_cases_without_a_closed_form_are_traced():
    kw = dict(batch=1, heads=2, seq_len=128, head_dim=16)
    assert estimate("sliding_window", mask=M.sliding_window(4), **kw).source == "trace"
    assert estimate("hard", mode="stochastic", **kw).source == "trace"
    with pytest.raises(ValueError, match="no closed-form estimate"):
        estimate("sliding_window", how="formula", dtype=torch.float16, mask=M.sliding_window(4), **kw)


@pytest.mark.parametrize("name, case", [
    ("sliding_window", dict(kv_heads=2, window=24)), ("longformer", dict(training=False, window=16)),
    ("bigbird", dict(kv_heads=2, block=16, seq_len=96)),
], ids=str)
def test_plain_kernel_closed_form_agrees_with_trace(name, case):
    # The plain-PyTorch tile kernel (kernel="torch"; float16 runs it under "auto"): one key tile
    # per call (kernels/tile.py's ``torch_tile_bytes``) in the loop of sparse_memory's
    # ``_torch_work``, global rows and GQA stacking included; float16 causal at N = 1024 is
    # tests/memory/test_estimate_dtypes.py's.
    kw = {**dict(batch=1, heads=4, seq_len=160, head_dim=16, causal=True, kernel="torch", q_tile=16, kv_tile=16,
                 dtype=torch.float16), **case}
    traced = estimate(name, how="trace", **kw)
    closed = estimate(name, **kw)
    assert closed.source == "formula"
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.05 * traced.peak_bytes, (closed, traced)


@pytest.mark.parametrize("name", ["adaptive_span", "adaptive_span_fixed"])
def test_causal_only_methods_refuse_a_non_causal_estimate_in_one_line(name):
    # Both are causal by definition; the learned module's own ValueError used to surface from
    # inside the trace as "cannot be traced on fake tensors".
    with pytest.raises(ValueError, match=f"method '{name}' cannot run these inputs: is causal by definition"):
        estimate(name, batch=1, heads=8, seq_len=2**20, head_dim=64)


def test_adaptive_span_width_follows_its_spans():
    # The band is ⌈largest span⌉ + ramp keys wide: a narrower span is a smaller tile working set,
    # and the learned module's starting span (init_span) counts like a fixed span.
    kw = dict(batch=1, heads=8, seq_len=2**16, head_dim=64, causal=True, how="formula")
    wide, narrow = (estimate("adaptive_span_fixed", spans=sp, **kw).peak_bytes for sp in (2048, 128))
    assert wide > narrow
    fixed = estimate("adaptive_span_fixed", spans=128, training=False, **kw).peak_bytes
    learned = estimate("adaptive_span", max_span=1024, init_span=128.0, training=False, **kw).peak_bytes
    assert fixed == learned  # without training both run the fused kernel over the same band


@pytest.mark.parametrize("name", ["chunked", "sliding_window", "dilated", "longformer", "bigbird", "strided"])
def test_plain_kernel_closed_form_counts_like_tiles_once(monkeypatch, name):
    # At N = 2**20 a row lists up to 4096 like key tiles; the closed form drops those that would
    # repeat a counted one (``_like_tiles_dropped``). The answer must be that of every tile.
    import attnmem.mechanisms.sparse_memory as sm

    cases = [dict(seq_len=700, q_tile=64, kv_tile=128, causal=False), dict(seq_len=1000, kv_heads=2, causal=True),
             dict(seq_len=900, q_tile=64, kv_tile=64, causal=True, training=False),
             dict(seq_len=2000, q_tile=128, kv_tile=64, causal=True, kv_heads=1)]
    for case in cases:
        kw = dict(batch=1, heads=4, head_dim=32, dtype=torch.float16, how="formula", **case)
        fast = estimate(name, **kw).peak_bytes
        with monkeypatch.context() as m:
            m.setattr(sm, "_like_tiles_dropped", lambda row, n_k, kv_tile: row)
            assert estimate(name, **kw).peak_bytes == fast, case
