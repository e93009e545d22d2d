"""Memory-augmented attention (recurrent_memory, knn_memory) against their definitions.

Expected values come from the float64 ``reference`` (causal attention over the concatenated
sequence, or a dense mask that spells out which past tokens each definition lets a query see)
and, for kNN retrieval, from a brute-force top-k over the stored keys written in the test.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import attnmem
from attnmem import registry
from attnmem.bench import Case, run_case
from attnmem.mechanisms.memory import KNNMemoryAttention, topk_search
from attnmem.reference import reference_attention

from ..conftest import rand_qkv, rel_err

TOL = 1e-12


def build(method, heads=4, kv_heads=None, head_dim=16, **options):
    m = registry.get(method)
    return m.build_module(heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim,
                          opts=m.make_options(options)).double()


def dense_ref(q, k, v, allowed):
    """Reference attention under a dense (Nq, Nk) bool mask."""
    return reference_attention(q, k, v, mask=attnmem.masks.as_mask(allowed, "mask"))


def segment_start(i, S):
    return (i // S) * S


def save_load(module, fresh):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    return fresh


# ---------------------------------------------------------------- recurrent_memory

@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])
def test_recurrent_full_memory_equals_causal_exact(Hq, Hkv):
    # M >= total length: every token sees all earlier tokens = causal attention over the whole.
    q, k, v = rand_qkv(Hq=Hq, Hkv=Hkv, Nq=23, D=16, grad=False)
    mod = build("recurrent_memory", heads=Hq, kv_heads=Hkv, segment=5, memory=64)
    out = mod(q, k, v, causal=True)
    ref = attnmem.attention(q, k, v, method="reference", causal=True)
    assert rel_err(out, ref) <= TOL
    # The same stream fed in uneven pieces (7 tokens, split again into S = 5 inside).
    mod.reset()
    pieces = torch.cat(list(mod.stream(q, k, v, segment=7)), dim=2)
    assert rel_err(pieces, ref) <= TOL


@pytest.mark.parametrize("causal", [True, False])
def test_recurrent_window_matches_definition(causal):
    # A token in the segment starting at a sees keys [a - M, a) from memory plus its segment
    # (up to itself when causal, all of it otherwise).
    N, S, M = 29, 6, 8
    q, k, v = rand_qkv(Hq=2, Nq=N, D=8, grad=False)
    mod = build("recurrent_memory", heads=2, head_dim=8, segment=S, memory=M)
    out = mod(q, k, v, causal=causal)
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    a = segment_start(i, S)
    last = i if causal else torch.clamp(a + S - 1, max=N - 1)
    allowed = (j >= a - M) & (j <= last)
    assert rel_err(out, dense_ref(q, k, v, allowed)) <= TOL


def test_recurrent_memory_is_detached_and_gradient_of_segment_is_exact():
    q, k, v = rand_qkv(Hq=2, Nq=12, D=8)
    mod = build("recurrent_memory", heads=2, head_dim=8, segment=6, memory=6)
    mod(q[:, :, :6], k[:, :, :6], v[:, :, :6])
    assert not mod.mem_k.requires_grad and mod.mem_k.grad_fn is None
    q2, k2, v2 = (t[:, :, 6:].detach().requires_grad_() for t in (q, k, v))
    out = mod(q2, k2, v2)
    # Oracle: causal attention of segment 2 over [detached segment 1 ; segment 2].
    k_all = torch.cat([k[:, :, :6].detach(), k2], 2)
    v_all = torch.cat([v[:, :, :6].detach(), v2], 2)
    ref = attnmem.attention(q2, k_all, v_all, method="reference", causal=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q2, k2, v2), g)
    want = torch.autograd.grad(ref, (q2, k2, v2), g)
    assert rel_err(out, ref) <= TOL
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL


def test_recurrent_reset_and_state_dict_round_trip():
    q, k, v = rand_qkv(Hq=2, Nq=30, D=8, grad=False)
    mod = build("recurrent_memory", heads=2, head_dim=8, segment=5, memory=7)
    first = mod(q[:, :, :10], k[:, :, :10], v[:, :, :10])
    restored = save_load(mod, build("recurrent_memory", heads=2, head_dim=8, segment=5, memory=7))
    cont = mod(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:])
    assert torch.equal(restored(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:]), cont)
    mod.reset()
    assert torch.equal(mod(q[:, :, :10], k[:, :, :10], v[:, :, :10]), first)


# ---------------------------------------------------------------- knn_memory

@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])
def test_knn_all_keys_gate_one_equals_causal_exact(Hq, Hkv):
    # capacity >= all tokens and k = capacity: each segment retrieves every earlier token; with
    # g = 1 one softmax over retrieved ∪ causal segment is causal attention over the whole.
    N = 27
    q, k, v = rand_qkv(Hq=Hq, Hkv=Hkv, Nq=N, D=16, grad=False)
    mod = build("knn_memory", heads=Hq, kv_heads=Hkv, segment=5, capacity=32, topk=32, gate=1.0)
    out = mod(q, k, v, causal=True)
    assert rel_err(out, attnmem.attention(q, k, v, method="reference", causal=True)) <= TOL


def test_knn_gate_zero_is_local_attention():
    N, S = 20, 6
    q, k, v = rand_qkv(Hq=2, Nq=N, D=8, grad=False)
    mod = build("knn_memory", heads=2, head_dim=8, segment=S, capacity=64, topk=4, gate=0.0)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = (j >= segment_start(i, S)) & (j <= i)
    assert rel_err(mod(q, k, v, causal=True), dense_ref(q, k, v, allowed)) <= TOL


def knn_definition(q, k, v, S, topk, log_g):
    """Memorizing-Transformer attention written out per query: brute-force top-k over all
    earlier segments' keys (store never full here), one softmax over retrieved (+ log g) and
    the causal keys of the query's own segment. q, k, v: (1, H, N, D), one KV head per head."""
    _, H, N, D = q.shape
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(N):
            a = segment_start(i, S)
            qi = q[0, h, i]
            loc = (k[0, h, a:i + 1] @ qi) / math.sqrt(D)
            vals = [loc]
            vs = [v[0, h, a:i + 1]]
            if a > 0:
                scores = k[0, h, :a] @ qi
                idx = scores.topk(min(topk, a)).indices
                vals.insert(0, scores[idx] / math.sqrt(D) + log_g[h])
                vs.insert(0, v[0, h, idx])
            p = torch.softmax(torch.cat(vals), 0)
            out[0, h, i] = p @ torch.cat(vs)
    return out


def test_knn_topk_retrieval_and_learned_gate_match_definition():
    N, S, K = 26, 6, 3
    q, k, v = rand_qkv(Hq=2, Nq=N, D=8, grad=False)
    mod = build("knn_memory", heads=2, head_dim=8, segment=S, capacity=64, topk=K, search_chunk=4)
    with torch.no_grad():
        mod.gate_logit.copy_(torch.tensor([0.7, -1.3], dtype=torch.float64))
    gate_logit = mod.gate_logit.detach().clone().requires_grad_()
    out = mod(q, k, v, causal=True)
    want = knn_definition(q, k, v, S, K, torch.nn.functional.logsigmoid(gate_logit))
    assert rel_err(out, want) <= TOL
    # The gate learns: its gradient matches the definition's.
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, mod.gate_logit, g)
    (exp,) = torch.autograd.grad(want, gate_logit, g)
    assert rel_err(got, exp) <= 1e-10


@pytest.mark.parametrize("S", [4, 16])
def test_knn_eviction_keeps_newest(S):
    C, N = 10, 27
    q, k, v = rand_qkv(Hq=2, Hkv=1, Nq=N, D=8, grad=False)
    mod = build("knn_memory", heads=2, kv_heads=1, head_dim=8, segment=S, capacity=C, topk=2)
    mod(q, k, v)
    ks, vs = mod.contents()
    assert mod.stored == C and torch.equal(ks, k[:, :, -C:]) and torch.equal(vs, v[:, :, -C:])
    mod.reset()
    assert mod.stored == 0


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_topk_search_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(2, 3, 9, 16, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 3, 83, 16, generator=g, dtype=torch.float64)
    val, idx = topk_search(queries, keys, 11, chunk=chunk)
    want_val, want_idx = (queries @ keys.transpose(-1, -2)).topk(11, dim=-1)
    assert torch.equal(idx, want_idx)
    assert torch.allclose(val, want_val, rtol=0, atol=1e-12)


def test_knn_save_load_continue_identical():
    q, k, v = rand_qkv(Hq=2, Nq=40, D=8, grad=False)
    opts = dict(heads=2, head_dim=8, segment=5, capacity=12, topk=3)
    mod = build("knn_memory", **opts)
    mod(q[:, :, :25], k[:, :, :25], v[:, :, :25])  # 25 written, store wrapped
    restored = save_load(mod, build("knn_memory", **opts))
    assert restored.written == mod.written
    cont = mod(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:])
    assert torch.equal(restored(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:]), cont)


# ---------------------------------------------------------------- options and errors

@pytest.mark.parametrize("method,options,words", [
    ("recurrent_memory", {"segment": 0}, "segment"),
    ("recurrent_memory", {"segment": -3}, "segment"),
    ("recurrent_memory", {"memory": -1}, "memory"),
    ("knn_memory", {"segment": 0}, "segment"),
    ("knn_memory", {"topk": 33, "capacity": 32}, "topk"),
    ("knn_memory", {"capacity": 0}, "capacity"),
    ("knn_memory", {"gate": 1.5}, "gate"),
    ("knn_memory", {"backend": "annoy"}, "backend"),
])
def test_bad_options(method, options, words):
    with pytest.raises(ValueError, match=words):
        attnmem.nn.MultiHeadAttention(16, 2, method=method, **options)


def test_mask_batch_change_and_functional_call_rejected():
    q, k, v = rand_qkv(Hq=2, Nq=8, D=8, grad=False)
    mod = build("knn_memory", heads=2, head_dim=8, segment=4, capacity=8, topk=2)
    with pytest.raises(ValueError, match="mask"):
        mod(q, k, v, mask=attnmem.masks.sliding_window(2, 2))
    mod(q, k, v)
    with pytest.raises(ValueError, match="reset"):
        mod(*(t.repeat(2, 1, 1, 1) for t in (q, k, v)))
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        attnmem.attention(q, k, v, method="recurrent_memory")


# ---------------------------------------------------------------- Transformer and compare

@pytest.mark.parametrize("method,options", [
    ("recurrent_memory", {"segment": 8, "memory": 12}),
    ("knn_memory", {"segment": 8, "capacity": 20, "topk": 5}),
])
def test_transformer_stream_equals_forward_and_resumes(method, options):
    # Each layer sees only the past, so layer-by-layer over the whole input (forward) equals
    # all layers segment by segment (stream) when the segment boundaries match.
    torch.manual_seed(0)
    model = attnmem.nn.Transformer(50, 32, 4, 2, method=method, **options).double()
    tokens = torch.randint(0, 50, (2, 37))
    model.reset_memory()
    full = model(tokens)
    streamed = torch.cat(list(model.stream(tokens, segment=8)), dim=1)
    assert rel_err(streamed, full) <= TOL
    from_iter = torch.cat(list(model.stream(iter(tokens.split(8, dim=1)))), dim=1)
    assert torch.equal(from_iter, streamed)
    # Save mid-stream, load into a fresh model, continue: identical to continuing.
    pieces = tokens.split(8, dim=1)
    list(model.stream(pieces[:2]))
    fresh = save_load(model, attnmem.nn.Transformer(50, 32, 4, 2, method=method, **options).double())
    cont = model.head(model.hidden(pieces[2], position_offset=16))
    assert torch.equal(fresh.head(fresh.hidden(pieces[2], position_offset=16)), cont)


def test_reachable_through_compare_cases():
    for method, options in (("recurrent_memory", {"segment": 16, "memory": 32}),
                            ("knn_memory", {"segment": 16, "capacity": 64, "topk": 8})):
        for fwd in (True, False):
            row = run_case(Case(method, 64, heads=2, head_dim=8, causal=True, forward_only=fwd,
                                options=options), repeats=0, warmup=0)
            assert row["status"] == "ok", row.get("reason")


def test_knn_module_type():
    mha = attnmem.nn.MultiHeadAttention(16, 2, method="knn_memory", capacity=8, topk=2)
    assert isinstance(mha.inner, KNNMemoryAttention)


def test_transformer_stream_needs_segment_for_a_tensor():
    model = attnmem.nn.Transformer(10, 16, 2, 1, method="recurrent_memory", segment=4, memory=4)
    with pytest.raises(ValueError, match="segment"):
        next(model.stream(torch.zeros(1, 8, dtype=torch.long)))


@pytest.mark.parametrize("method", ["recurrent_memory", "knn_memory"])
def test_checkpointing_with_memory_is_refused(method):
    # Checkpointing reruns each block's forward in the backward; a memory method would advance
    # its memory a second time there, so the model refuses the combination up front.
    from attnmem.nn import Transformer

    with pytest.raises(ValueError, match="checkpointing=True cannot be used with method="):
        Transformer(32, 16, 2, 1, method=method, checkpointing=True)
    Transformer(32, 16, 2, 1, method=method, checkpointing=False)  # fine without
