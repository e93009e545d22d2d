"""The front door: dispatch, the registry listing, and clear errors for bad input."""

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import registry

from .conftest import rand_qkv


def test_methods_listing():
    infos = {m.name: m for m in attnmem.methods()}
    assert {"reference", "sdpa", "chunked"} <= set(infos)
    for m in infos.values():
        assert m.family and m.memory and m.summary
    assert infos["chunked"].exact and "q_tile" in infos["chunked"].options


def _chosen(q, k, v, **kw):
    inp = attnmem.validate(q, k, v, **kw)
    return registry.choose(inp, {}).method.name


def test_auto_dispatch():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    assert _chosen(q, k, v) == "sdpa"
    assert _chosen(q, k, v, causal=True) == "sdpa"
    assert _chosen(q, k, v, mask=M.sliding_window(2)) == "chunked"
    assert _chosen(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool)) == "chunked"
    q2, k2, v2 = rand_qkv(1, 4, 2, 16, 16, 8)
    assert _chosen(q2, k2, v2) == "chunked"  # SDPA would expand K/V to 4 heads on CPU
    q3, k3, v3 = rand_qkv(1, 2, 2, 8, 16, 8)
    assert _chosen(q3, k3, v3, causal=True) == "chunked"  # bottom-right alignment


def test_auto_error_lists_every_reason(monkeypatch):
    monkeypatch.setattr(registry, "AUTO_PRIORITY", ["sdpa"])
    q, k, v = rand_qkv(1, 4, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="sdpa: would expand K/V") as e:
        attnmem.attention(q, k, v)
    assert "chunked" in str(e.value)


@pytest.mark.parametrize("bad,match,exc", [
    (dict(q=torch.randn(2, 2, 4, 8)), "batch sizes differ", ValueError),
    (dict(q=torch.randn(1, 3, 4, 8)), "multiple of key/value heads", ValueError),
    (dict(q=torch.randn(1, 2, 4, 6)), "head dims differ", ValueError),
    (dict(q=torch.randn(1, 2, 4)), "q must have shape", ValueError),
    (dict(q=torch.ones(1, 2, 4, 8, dtype=torch.int64)), "floating-point", TypeError),
    (dict(q=torch.randn(1, 2, 4, 8, dtype=torch.float64)), "share one dtype", TypeError),
    (dict(q=torch.randn(1, 2, 4, 8, device="meta")), "one device", ValueError),
    (dict(v=torch.randn(1, 2, 5, 8)), "same shape", ValueError),
    (dict(mask=torch.ones(4, 3, dtype=torch.bool)), "does not broadcast", ValueError),
    (dict(mask=torch.ones(4, 4)), "bool tensor", TypeError),
    (dict(mask="causal"), "mask must be", TypeError),
    (dict(method="nope"), "unknown method 'nope'", ValueError),
    (dict(method="chunked", window=3), "unknown option", TypeError),
    (dict(method="chunked", q_tile=0), "q_tile must be a positive int", ValueError),
    (dict(method="chunked", kernel="cuda"), "kernel must be one of", ValueError),
    (dict(scale=float("nan")), "scale must be", ValueError),
    (dict(causal=1), "causal must be a bool", TypeError),
    (dict(method=3), "method must be a str", TypeError),
])
def test_bad_input_errors(bad, match, exc):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8))
    args.update({k: v for k, v in bad.items() if k in "qkv"})
    kw = {k: v for k, v in bad.items() if k not in "qkv"}
    with pytest.raises(exc, match=match):
        attnmem.attention(args["q"], args["k"], args["v"], **kw)


def test_explicit_method_that_cannot_run_says_why():
    q, k, v = rand_qkv(1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="sdpa.*expand K/V"):
        attnmem.attention(q, k, v, method="sdpa")


def test_document_mask_length_mismatch():
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="document mask was built for 5"):
        attnmem.attention(q, k, v, mask=M.document(torch.zeros(5, dtype=torch.long)))


def test_nan_policy():
    q, k, v = rand_qkv(1, 1, 1, 8, 8, 8, grad=False)
    q[0, 0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        attnmem.attention(q, k, v, check_finite=True)
    out = attnmem.attention(q, k, v, method="chunked")
    # NaN propagates to the rows that read it, and only to those.
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 2, 4, 5, 6, 7]]).all()
