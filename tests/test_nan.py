"""What a NaN in the inputs reaches, as the README's Conventions state it, for every method."""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import registry

FUNCTIONAL = [m.name for m in registry.methods() if not m.stateful]
N, J = 256, 150
# Where a NaN in q row i may go besides row i (README): hierarchical's block, nystrom's everything.
Q_SPREADS = {"hierarchical": "block", "nystrom": "all"}


def _run(method, which, causal, **opts):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[which][0, 0, J, 3] = float("nan")
    if registry.get(method).not_supported_reasons(attnmem.validate(q, k, v, causal=causal),
                                                  registry.get(method).make_options(opts)):
        with pytest.raises(ValueError, match=method):  # a stated refusal: nothing reaches anything
            attnmem.attention(q, k, v, method=method, causal=causal, **opts)
        return None
    out = attnmem.attention(q, k, v, method=method, causal=causal, **opts)
    return (~torch.isfinite(out)).any(-1)[0]  # (H, N): which rows are non-finite


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", FUNCTIONAL)
def test_nan_in_a_query_row_stays_in_that_row(method, causal):
    bad = _run(method, "q", causal)
    if bad is None:
        return
    assert not bad[1].any()  # the other head is untouched in every method
    rows = set(bad[0].nonzero().flatten().tolist())
    if Q_SPREADS.get(method) == "all":
        return
    if Q_SPREADS.get(method) == "block":
        block = registry.get(method).make_options({}).block
        assert rows <= set(range(J // block * block, (J // block + 1) * block)), rows
        return
    assert rows == {J}, rows


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("method", [m.name for m in registry.methods() if m.exact and not m.stateful])
def test_exact_methods_spread_nan_to_every_reader(method, which):
    bad = _run(method, which, True)
    assert bad[0, J:].all()  # causal: rows J.. read key J
    assert not bad[1].any()


def test_rows_whose_tiles_never_meet_the_poisoned_key_stay_finite():
    """chunked's torch kernel at q_tile = kv_tile = 64: the query tiles before J's tile never
    compute J's key tile under the causal mask, so their rows stay finite; the rest of J's
    query tile may not (0 · NaN in the tile's product)."""
    for which in ("k", "v"):
        bad = _run("chunked", which, True, kernel="torch", q_tile=64, kv_tile=64)
        start = J // 64 * 64
        assert not bad[0, :start].any() and bad[0, J:].all()
