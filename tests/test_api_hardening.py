"""Inputs at the edges, through every registered method: zero sizes, non-bool flags."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import registry

FUNCTIONAL = ["auto"] + [m.name for m in registry.methods() if not m.stateful]
# (q shape, k/v shape): a zero batch, head dim, query length, key length, or both lengths
ZERO_SIZES = {"B=0": ((0, 2, 16, 8), (0, 2, 16, 8)), "D=0": ((1, 2, 16, 0), (1, 2, 16, 0)),
              "Nq=0": ((1, 2, 0, 8), (1, 2, 16, 8)), "Nk=0": ((1, 2, 16, 8), (1, 2, 0, 8)),
              "N=0": ((1, 2, 0, 8), (1, 2, 0, 8))}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", sorted(ZERO_SIZES))
@pytest.mark.parametrize("method", FUNCTIONAL)
def test_zero_sizes_return_the_empty_or_zero_output_or_are_refused(method, size, causal):
    shape_q, shape_kv = ZERO_SIZES[size]
    q = torch.randn(shape_q, requires_grad=True)
    k, v = (torch.randn(shape_kv, requires_grad=True) for _ in range(2))
    try:
        out = attnmem.attention(q, k, v, method=method, causal=causal)
    except ValueError as e:  # a refusal is allowed when it is the method's stated reason
        assert method in str(e) or "cannot run" in str(e) or "no method" in str(e).lower(), e
        return
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out, torch.zeros_like(q))  # rows with no keys are zeros; empty is empty
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("method", FUNCTIONAL)
def test_zero_query_heads_are_refused_naming_the_heads(method):
    q, k = torch.randn(1, 0, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="Hq=0"):
        attnmem.attention(q, k, k, method=method)


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None, 1.0])
def test_check_finite_takes_a_bool_only(value):
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        attnmem.attention(q, q, q, check_finite=value)
    poisoned = q.clone()
    poisoned[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attnmem.attention(poisoned, q, q, check_finite=True)


@pytest.mark.parametrize("value", [None, 3, ["chunked"]])
def test_method_must_be_a_name(value):
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match="method must be a str"):
        attnmem.attention(q, q, q, method=value)


def test_an_unbounded_window_side_points_to_the_causal_mask():
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match=r"window must be .*\(None, 0\) is causal attention, pass causal=True"):
        attnmem.attention(q, q, q, method="sliding_window", window=(None, 0))
    out = attnmem.attention(q, q, q, method="sliding_window", window=(32, 0))  # the spelled-out bound
    assert torch.allclose(out, attnmem.attention(q, q, q, method="chunked", causal=True), atol=1e-6)
