"""Closed forms of the approximate methods (their ``Method.memory_model`` under mechanisms/) and the plan's
searches over them.

Expected values: the fake-tensor trace of the same call (``how="trace"``), which
tests/test_estimate.py checks against real measurements; the N = 2**20 checks only ask for a
formula answer, given without tracing, that is linear in N (the trace would take minutes there).
"""

from __future__ import annotations

import pytest

import attnmem
from attnmem import registry
from attnmem.mechanisms.linear import orthogonal_random_features
from attnmem.memory import estimate as estimate_mod
from attnmem.memory.estimate import estimate

MINE = ("linear", "performer", "nystrom", "hierarchical")
# nystrom's trace makes ~1,800 operator calls whatever N is, so "auto" traces it (≈ 0.4 s warm at
# N = 2**20); here its closed form is asked for by name.
HOW = {"nystrom": "formula"}
NO_CAUSAL = {"nystrom"}


@pytest.mark.parametrize("name", MINE)
def test_my_methods_have_closed_forms(name):
    m = registry.get(name)
    assert type(m).memory_model is not registry.Method.memory_model  # the method states its own model
    assert type(m).memory_domain_reasons is not registry.Method.memory_domain_reasons


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("causal", [True, False])
def test_a_million_tokens_by_formula_untraced_and_linear(name, causal, monkeypatch):
    kw = dict(batch=1, heads=8, head_dim=64, causal=causal, how=HOW.get(name, "auto"))
    if causal and name in NO_CAUSAL:
        with pytest.raises(ValueError, match="causal"):
            estimate(name, seq_len=2**20, **kw)
        return  # no causal form: the refusal above is what this case checks

    def no_trace(*a, **k):
        raise AssertionError("traced: a million tokens must be answered by the closed form")

    # No trace happens (its time is the benchmark's business, not a test's).
    monkeypatch.setattr(estimate_mod, "trace_peak", no_trace)
    big = estimate(name, seq_len=2**20, **kw)
    half = estimate(name, seq_len=2**19, **kw)
    assert big.source == "formula" and half.source == "formula"
    assert 1.9 <= big.peak_bytes / half.peak_bytes <= 2.1
    # At least q, k, v, the output and the three gradients.
    assert big.peak_bytes >= 7 * 8 * 2**20 * 64 * 4


LINEAR, FAVOR = ("linear", dict(chunk=128)), ("performer", dict(features=128, chunk=256))
NYS, HIER = "nystrom", "hierarchical"


@pytest.mark.parametrize("name, opts, causal, training, kv_heads", [
    (*LINEAR, True, True, None), (*LINEAR, False, True, None), (*LINEAR, True, False, None),
    (*LINEAR, False, False, None), (*FAVOR, True, True, None), (*FAVOR, False, True, None),
    (*FAVOR, True, False, None), (*FAVOR, False, False, None), (*LINEAR, False, True, 2), (*FAVOR, False, True, 2),
])
def test_closed_form_follows_the_options(name, opts, causal, training, kv_heads):
    # Several chunks (N = 4 chunks) with non-default sizes: the terms scale with the options;
    # non-causal with GQA (kv_heads=2) peaks in the query block over the H heads instead.
    kw = dict(batch=1, heads=4, head_dim=32, seq_len=4 * opts["chunk"], causal=causal, training=training, **opts)
    if kv_heads:
        kw["kv_heads"] = kv_heads
    if name == "performer":
        # The float64 draw of W is cached (lru_cache): a process's first trace would count the
        # cache's copy as saved, which the closed form leaves out. Draw it first.
        orthogonal_random_features(opts["features"], 32, seed=0)
    traced, closed = estimate(name, how="trace", **kw), estimate(name, how="formula", **kw)
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.05 * traced.peak_bytes, (closed, traced)
    assert closed.saved_bytes == traced.saved_bytes


# Options that change the terms: landmarks m (MM = m², MD = m·D buffers), Newton–Schulz steps
# (6 MM each), N not a multiple of m (segment means by index_add); block sizes Nr with and without
# padding (N = 640 pads to 1024), GQA (expanded K, V held by the broadcast matmuls), forward only.
@pytest.mark.parametrize("name, kw", [
    (NYS, dict(seq_len=1024, landmarks=32)),
    (NYS, dict(seq_len=1000, landmarks=128, pinv_iterations=3, kv_heads=2)),
    (NYS, dict(seq_len=1024, landmarks=128, training=False)),
    (HIER, dict(seq_len=1024, block=16, causal=True)),
    (HIER, dict(seq_len=640, block=16, kv_heads=2)),
    (HIER, dict(seq_len=1024, block=64, training=False, causal=True)),
    (HIER, dict(seq_len=2048, block=64, kv_heads=2)),
])
def test_closed_form_follows_the_options_lowrank_hierarchical(name, kw):
    kw = dict(batch=1, heads=8, head_dim=64, **kw)
    traced, closed = estimate(name, how="trace", **kw), estimate(name, how="formula", **kw)
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.05 * traced.peak_bytes, (closed, traced)
    # The saved part is counted term by term: within 1 % (small per-level vectors are left out).
    assert abs(closed.saved_bytes - traced.saved_bytes) <= 0.01 * max(traced.saved_bytes, 1), (closed, traced)


def test_plan_searches_use_closed_forms(monkeypatch):
    # Every step of both searches asks for an estimate; with a closed form none of them traces,
    # except hierarchical below four levels (N <= 8 blocks of 32), which has none by design.
    traces = []
    real = estimate_mod.trace_peak
    monkeypatch.setattr(estimate_mod, "trace_peak", lambda *a, **k: traces.append(a[1].shape[2]) or real(*a, **k))
    # gpt2-small is causal: nystrom cannot run it (its row is an error, by design).
    methods = ["sdpa", "chunked", *(m for m in MINE if m not in NO_CAUSAL)]
    rows = attnmem.plan("gpt2-small", "24GiB", methods=methods)
    assert [r["status"] for r in rows] == ["ok"] * len(methods)
    assert all(r["max_seq_len"] and r["max_batch"] for r in rows)
    assert all(n <= 8 * 32 for n in traces), traces


def test_plan_remembers_traced_estimates(monkeypatch):
    # A method without a closed form is traced once per attention shape, not once per question.
    from attnmem.memory import plan as plan_mod

    calls = []
    real = estimate_mod.trace_peak
    monkeypatch.setattr(estimate_mod, "trace_peak", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(plan_mod, "_ESTIMATES", {})
    nystrom = registry.get("nystrom")
    # As if it had no closed form: its declared domain excludes every call.
    monkeypatch.setattr(nystrom, "memory_domain_reasons", lambda s, o: ["no closed form (this test)"])
    cfg = plan_mod.ModelConfig(layers=2, d_model=64, heads=4, vocab=256, seq_len=256, causal=False)
    first = plan_mod.model_peak(cfg, "nystrom")["peak"]
    assert plan_mod.model_peak(cfg, "nystrom")["peak"] == first
    assert len(calls) == 1


def test_linformer_is_estimated_as_built_for_the_sequence_and_refuses_causal():
    # Without max_len, the module is built with max_len = N (Linformer.options_for_length, as the
    # benchmarks build it); an explicit max_len below N is the user's mistake and is reported as
    # the method's own reason.
    kw = dict(batch=1, heads=2, head_dim=16, k=32)
    est = estimate("linformer", seq_len=8192, **kw)
    assert est.options["max_len"] == 8192 and est.peak_bytes > est.inputs_bytes
    with pytest.raises(ValueError, match="exceeds max_len=4096"):
        estimate("linformer", seq_len=8192, max_len=4096, **kw)
    with pytest.raises(ValueError, match="causal Linformer is not supported"):
        estimate("linformer", seq_len=1024, causal=True, **kw)


def test_hierarchical_is_traced_below_four_levels():
    # N = 128 with blocks of 32 is 2 levels: no closed form (it would be 10-90 % off), the trace answers.
    kw = dict(batch=1, heads=2, head_dim=16, seq_len=128)
    assert estimate("hierarchical", **kw).source == "trace"
    with pytest.raises(ValueError, match="no closed-form estimate"):
        estimate("hierarchical", how="formula", **kw)
