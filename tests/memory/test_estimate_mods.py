"""``attnmem.estimate`` with score_mod, sinks and dropout: the kernel path the call takes, traced."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import scores as S
from attnmem.memory import estimate as est_mod
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


# --- closed forms (issue 17, deliverable 7): each feature's formula against the trace ---------
# The trace follows the very kernel path (checked to the byte against measure above); the
# closed forms (kernels/tile.py's *_tile_bytes, sparse_memory's loop) must agree within 5 %.
# Small calls (N = 256, 64 x 128 tiles) so that each trace takes well under a second.

def _features(heads: int) -> dict:
    return {"softcap": {"score_mod": S.softcap(30.0)}, "dropout": {"dropout_p": 0.1},
            "alibi": {"score_mod": S.alibi(heads)},
            "relative_bias": {"score_mod": S.relative_bias(torch.linspace(-1, 1, 32 * heads).view(32, heads))},
            "sinks": {"sinks": torch.zeros(heads, requires_grad=True)}}


FORMULA_CASES = [
    ("chunked", "softcap", dict(causal=True), "float32"),
    ("chunked", "softcap", dict(causal=True, kv_heads=1), "bfloat16"),
    ("chunked", "softcap", dict(causal=True, training=False), "float32"),  # the forward's own peak
    # Dropout hashes every pair in torch ops: larger tiles keep its trace short.
    ("chunked", "dropout", dict(causal=True, q_tile=128), "float32"),
    ("chunked", "dropout", dict(causal=True, kv_heads=1, q_tile=128), "float16"),
    ("chunked", "alibi", dict(causal=True), "float32"),  # ALiBi's row path: 512-query tiles
    ("chunked", "alibi", dict(causal=True, kv_heads=1), "float32"),  # GQA: bias tiles, masked diagonal
    ("chunked", "relative_bias", dict(training=False), "float64"),
    ("chunked", "sinks", dict(causal=True), "float32"),  # one fused call, sinks learned
    ("chunked", "sinks", dict(causal=True, kv_heads=1), "bfloat16"),
    ("sliding_window", "alibi", dict(causal=True, window=(96, 0)), "float32"),  # a window: masked tiles
    ("sliding_window", "softcap", dict(causal=True, window=(96, 0)), "float32"),  # the native kernel's window
    ("sliding_window", "softcap", dict(causal=True, window=(96, 0)), "bfloat16"),  # half: the torch-ops tiles
]


@pytest.mark.parametrize("method,feature,call,dtype", FORMULA_CASES)
def test_closed_form_of_each_modification_against_the_trace(method, feature, call, dtype):
    heads = 2
    kw = dict(batch=1, heads=heads, seq_len=256, head_dim=8, dtype=dtype, **{"q_tile": 64, "kv_tile": 128, **call},
              **_features(heads)[feature])
    traced, closed = estimate(method, how="trace", **kw), estimate(method, how="formula", **kw)
    assert closed.source == "formula" and traced.source == "trace"
    assert abs(closed.peak_bytes / traced.peak_bytes - 1) <= 0.05, (closed.peak_bytes, traced.peak_bytes)
    # The default how takes the closed form inside its domain.
    assert estimate(method, **kw).source == "formula"


@pytest.mark.parametrize("score_mod,reason", [
    (lambda score, b, h, q_idx, kv_idx: score * 0.5, "generic score_mod"),
    (S.relative_bias(torch.zeros(32, H, requires_grad=True)), "generic score_mod"),  # its table learns
])
def test_generic_score_mods_stay_traced_naming_why(score_mod, reason, monkeypatch):
    kw = dict(batch=1, heads=H, seq_len=N, head_dim=D, causal=True, q_tile=64, kv_tile=64, score_mod=score_mod)
    with pytest.raises(ValueError, match=reason):
        estimate("chunked", how="formula", **kw)
    # The default how traces them (the trace itself is checked above): a stub stands in for it.
    monkeypatch.setattr(est_mod, "trace_peak", lambda call, q, k, v, training: (1, 0, 0))
    assert estimate("chunked", **kw).source == "trace"


def test_half_precision_alibi_stays_traced():
    # The fused operator would round the bias in bfloat16: the generic torch kernel runs it.
    with pytest.raises(ValueError, match="plain-PyTorch tile kernel"):
        estimate("chunked", batch=1, heads=H, seq_len=N, head_dim=D, dtype="bfloat16", how="formula",
                 score_mod=S.alibi(H))
