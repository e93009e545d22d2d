"""Closed forms of the memory-augmented methods and linformer (their ``Method.memory_model`` in
mechanisms/memory.py and mechanisms/lowrank.py).

Expected values come from the fake-tensor trace of the same call (``estimate(how="trace")``,
itself checked against real runs in tests/test_estimate.py), and at N = 2**20 from the
structure of the method: its memory is linear in N for a fixed segment and memory length.
"""

from __future__ import annotations

import pytest
import torch

from attnmem.memory import estimate as est_mod
from attnmem.memory.estimate import estimate

# Short segments and memory so that the closed form's range (N ≥ 5·M + 3·S) starts at 832
# tokens and a trace of 16 segments stays fast.
SMALL = dict(segment=64, memory=128)


def assert_formula_linear_in_n(monkeypatch, method: str, **kw) -> None:
    """At N = 2**20 and 2**19 ``method`` is estimated by its closed form (a trace would raise),
    and its peak doubles with N: memory linear in N."""
    def no_trace(*a, **k):
        raise AssertionError("traced")

    monkeypatch.setattr(est_mod, "trace_peak", no_trace)
    shape = dict(batch=1, heads=8, head_dim=64, **kw)
    big = estimate(method, seq_len=2**20, **shape)
    half = estimate(method, seq_len=2**19, **shape)
    assert big.source == "formula" and half.source == "formula"
    assert 1.9 < big.peak_bytes / half.peak_bytes < 2.1


@pytest.mark.parametrize("case", [
    dict(seq_len=1024, causal=True),
    dict(seq_len=1000, causal=True, kv_heads=2),  # a shorter last segment; GQA
    dict(seq_len=1024, causal=False),
    dict(seq_len=1024, causal=False, kv_heads=2),
    dict(seq_len=1000, causal=True, training=False),
    dict(seq_len=1024, causal=False, training=False, kv_heads=2),
    dict(seq_len=1024, causal=True, dtype=torch.float64),
    dict(seq_len=1024, causal=True, segment=64, memory=0),  # no memory: K_j, V_j are k, v themselves
], ids=str)
def test_recurrent_memory_formula_agrees_with_trace(case):
    kw = dict(batch=1, heads=8, head_dim=64, **{**SMALL, **case})
    traced = estimate("recurrent_memory", how="trace", **kw)
    closed = estimate("recurrent_memory", how="formula", **kw)
    assert closed.saved_bytes == traced.saved_bytes  # the saved terms are exact
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.01 * traced.peak_bytes, (closed, traced)


def test_recurrent_memory_short_calls_are_traced():
    # Below N = 5·M + 3·S the peak falls inside one segment: no closed form, auto traces.
    kw = dict(batch=1, heads=8, head_dim=64, seq_len=640, causal=True, **SMALL)
    assert estimate("recurrent_memory", **kw).source == "trace"
    with pytest.raises(ValueError, match="no closed-form"):
        estimate("recurrent_memory", how="formula", **kw)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_recurrent_memory_at_a_million_tokens_uses_the_formula(monkeypatch, causal, training):
    assert_formula_linear_in_n(monkeypatch, "recurrent_memory", causal=causal, training=training)  # S=512, M=2048


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_linformer_formula_agrees_with_trace(kv_heads, training):
    # N = 8192 = max_len (as estimate builds the module): E has 2**21 elements, beyond what the
    # trace keeps real, so the trace counts it as a real run through attnmem.bench.run_case does.
    kw = dict(batch=1, heads=8, kv_heads=kv_heads, head_dim=64, seq_len=8192, training=training)
    closed = estimate("linformer", how="formula", **kw)
    traced = estimate("linformer", how="trace", **kw)
    assert closed.saved_bytes == traced.saved_bytes
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.01 * traced.peak_bytes, (closed, traced)


def test_linformer_other_options_are_traced():
    kw = dict(batch=1, heads=8, head_dim=64, seq_len=1024)
    # max_len = 4096 > N: E[:, :, :N] is a strided slice, outside the closed form's layout.
    for extra in (dict(max_len=4096), dict(per_head=True, max_len=1024), dict(dtype=torch.float64, max_len=1024)):
        assert estimate("linformer", **kw, **extra).source == "trace"


@pytest.mark.parametrize("training", [True, False])
def test_linformer_at_a_million_tokens_uses_the_formula(monkeypatch, training):
    assert_formula_linear_in_n(monkeypatch, "linformer", training=training)


# knn_memory with a small store and search chunk so that the closed form's range (nseg ≥ 3 and
# N·q ≥ 3·(one segment's saved terms + its search scores)) starts near 656-760 tokens (a short
# trace: 25 segments); S ≠ D tells the S·S terms from the S·D ones.
KNN_SMALL = dict(segment=32, capacity=64, topk=2, search_chunk=32)


@pytest.mark.parametrize("case", [
    dict(seq_len=800, causal=True),
    dict(seq_len=795, causal=True, kv_heads=2),  # a shorter last segment; GQA
    dict(seq_len=800, causal=False),
    dict(seq_len=800, causal=False, kv_heads=1),
    dict(seq_len=800, causal=True, dtype=torch.float64),
    dict(seq_len=800, causal=True, training=False),
    dict(seq_len=800, causal=False, training=False, kv_heads=2),
    dict(seq_len=800, causal=True, batch=2),
    # A store of 128 searched 32 at a time (4 chunks), filled over 8 segments; a shorter last
    # segment. N = 553 is just inside the closed form's range (N·q >= 3·(P + search)).
    dict(seq_len=553, causal=True, heads=2, head_dim=16, segment=16, capacity=128, topk=4, search_chunk=32),
    # Half precision (issue 16: no closed form in bfloat16/float16 before): the same terms at s = 2.
    dict(seq_len=795, causal=True, kv_heads=2, dtype=torch.bfloat16),
], ids=str)
def test_knn_memory_formula_agrees_with_trace(case):
    kw = {**dict(batch=1, heads=4, head_dim=24), **KNN_SMALL, **case}
    traced = estimate("knn_memory", how="trace", **kw)
    closed = estimate("knn_memory", how="formula", **kw)
    assert closed.source == "formula"
    assert closed.saved_bytes == traced.saved_bytes  # the saved terms are exact
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.05 * traced.peak_bytes, (closed, traced)


def test_knn_memory_short_calls_and_other_options_are_traced():
    kw = dict(batch=1, heads=4, head_dim=24, seq_len=320, causal=True, **KNN_SMALL)  # 10 segments: too short
    assert estimate("knn_memory", **kw).source == "trace"
    with pytest.raises(ValueError, match="no closed-form"):
        estimate("knn_memory", how="formula", **kw)
    with pytest.raises(ValueError, match="no closed-form"):  # a fixed gate keeps no log g: not read off
        estimate("knn_memory", how="formula", **{**kw, "seq_len": 800, "gate": 0.5})


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_knn_memory_at_a_million_tokens_uses_the_formula(monkeypatch, causal, training):
    assert_formula_linear_in_n(monkeypatch, "knn_memory", causal=causal, training=training)  # default S, C, topk
