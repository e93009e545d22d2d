"""``kernels.merge_partials``: the one log-sum-exp merge the tiled kernel, ring attention and
the sparse methods share, against softmax over the union of the keys (float64).

Expected values: attention over all keys at once, written out below; each partial result is
the same formula over its own keys, with its log-sum-exp.
"""

import math

import pytest
import torch

from attnmem.kernels import merge_partials, tiled_attention_lse


def _partial(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the scores ``s`` (..., N, K), with the rows' log-sum-exp; rows
    whose scores are all -inf give zeros and -inf."""
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("inplace", [False, True])
def test_merge_equals_softmax_over_all_keys(inplace):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 37, 29, generator=g, dtype=torch.float64)  # (B, H, N, K)
    v = torch.randn(2, 3, 29, 24, generator=g, dtype=torch.float64)
    s[:, :, 5, :11] = -math.inf  # a row with nothing in the first part
    s[:, :, 9, :] = -math.inf  # a row with nothing anywhere
    want, want_lse = _partial(s, v)
    out_a, lse_a = _partial(s[..., :11], v[:, :, :11])
    out_b, lse_b = _partial(s[..., 11:], v[:, :, 11:])
    out, lse = merge_partials(out_a.clone(), lse_a.clone(), out_b, lse_b, inplace=inplace)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert (out[:, :, 9] == 0).all() and torch.isneginf(lse[:, :, 9]).all()


def test_inplace_merge_writes_into_views_of_a_larger_buffer():
    """Ring attention merges into slices of its (B, H, N, D) accumulators."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 2, 16, 10, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    out_a, lse_a = _partial(s[..., :4], v[:, :, :4])
    out_b, lse_b = _partial(s[..., 4:], v[:, :, 4:])
    buf, buf_lse = out_a.clone(), lse_a.clone()
    rows = slice(3, 12)
    got, got_lse = merge_partials(buf[:, :, rows], buf_lse[:, :, rows], out_b[:, :, rows], lse_b[:, :, rows],
                                  inplace=True)
    want, want_lse = _partial(s, v)
    assert got.data_ptr() == buf[:, :, rows].data_ptr()
    torch.testing.assert_close(buf[:, :, rows], want[:, :, rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf_lse[:, :, rows], want_lse[:, :, rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf[:, :, :3], out_a[:, :, :3])  # rows outside the view untouched
    torch.testing.assert_close(got_lse, want_lse[:, :, rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_partial_attention_of_two_key_halves_merges_to_the_whole(kernel):
    """``tiled_attention_lse`` over two halves of the keys, merged, is attention over all."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 37, 24, generator=g, dtype=torch.float64)  # GQA: 4 query heads
    k = torch.randn(1, 2, 41, 24, generator=g, dtype=torch.float64)  # on 2 KV heads
    v = torch.randn(1, 2, 41, 24, generator=g, dtype=torch.float64)
    scale = 24 ** -0.5
    whole, whole_lse = tiled_attention_lse(q, k, v, mask=None, scale=scale, q_tile=16, kv_tile=16, kernel=kernel)
    a = tiled_attention_lse(q, k[:, :, :20], v[:, :, :20], mask=None, scale=scale, kernel=kernel)
    b = tiled_attention_lse(q, k[:, :, 20:], v[:, :, 20:], mask=None, scale=scale, kernel=kernel)
    out, lse = merge_partials(a[0].double(), a[1], b[0], b[1])
    torch.testing.assert_close(out, whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-10, atol=1e-10)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # (B, Hq, Nk, D)
    want, _ = _partial(q @ kr.transpose(-1, -2) * scale, vr)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
