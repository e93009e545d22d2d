"""Causal sliding windows as one fused call per query segment (kernels/banded.py).

Expected values: the float64 reference (``compare_with_reference``, ≤ 1e-10 on the output and
all three gradients), and ``attnmem.measure`` of the same call for the memory trace. Each case
also checks that ``plan_call`` sent it down the banded path, so a case that silently fell back
to the tile loop fails.
"""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem.kernels import banded, plan_call
from attnmem.memory.estimate import estimate

from ..conftest import compare_with_reference, rand_qkv


def _plan(mask, q, k):
    B, Hq, n, D = q.shape
    return plan_call("auto", device="cpu", dtype=q.dtype, mask=mask, batch=B, nq=n, nk=k.shape[2], q_heads=Hq,
                     kv_heads=k.shape[1], head_dim=D)


def _padding(B: int, n: int) -> torch.Tensor:
    """Left padding in row 0, right padding and a hole in the last row: rows whose whole window
    is padding (nothing to attend), partly padded and unpadded segments."""
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, :50] = False
    valid[-1, -7:] = False
    valid[-1, 60:70] = False
    return valid


@pytest.mark.parametrize("B, Hq, Hkv, n, D, left, q_tile, pad", [
    (2, 4, 2, 131, 40, 37, 32, True),   # GQA, awkward sizes, padding
    (1, 2, 2, 113, 16, 5, 16, False),   # narrow window, many segments
    (2, 4, 1, 160, 24, 200, 32, True),  # MQA, window past the sequence start
    (1, 3, 3, 64, 8, 0, 16, True),      # a window of one key (itself)
    (1, 2, 2, 97, 16, 20, 256, False),  # one segment shorter than q_tile
])
def test_banded_matches_reference(B, Hq, Hkv, n, D, left, q_tile, pad):
    q, k, v = rand_qkv(B, Hq, Hkv, n, n, D)
    mask = M.sliding_window(left, 0)
    if pad:
        mask = mask & M.key_padding(_padding(B, n))
    assert _plan(mask, q, k).band == left
    out = compare_with_reference("chunked", q, k, v, mask=mask, q_tile=q_tile, kv_tile=q_tile)
    if pad:
        assert (out[0, :, :50] == 0).all()  # rows whose window holds only padding: zeros


def test_banded_output_is_laid_out_for_hf_transpose():
    # (B, Hq, N, D) with (B, N, Hq, D) strides: HF's transpose(1, 2) is a view, not a copy.
    q, k, v = rand_qkv(1, 4, 2, 100, 100, 16, dtype=torch.float32)
    out = attnmem.attention(q, k, v, method="chunked", mask=M.sliding_window(30, 0), q_tile=32)
    assert out.transpose(1, 2).is_contiguous()


def test_float32_error_is_near_sdpa():
    """flash-attention's rule: the error against float64 at most twice PyTorch's own."""
    q64, k64, v64 = rand_qkv(1, 4, 2, 300, 300, 64, grad=False)
    mask = M.sliding_window(40, 0)
    ref = attnmem.attention(q64, k64, v64, method="reference", mask=mask)
    q, k, v = (t.float() for t in (q64, k64, v64))
    assert _plan(mask, q, k).band == 40
    ours = attnmem.attention(q, k, v, method="chunked", mask=mask, q_tile=64)
    allowed = torch.ones(300, 300, dtype=torch.bool).tril().triu(-40)  # key j in [i - 40, i]
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                              attn_mask=allowed)
    err_ours = (ours.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + 2e-6


@pytest.mark.parametrize("why, kwargs", [
    ("bfloat16: the tile loop accumulates in float32", dict(dtype=torch.bfloat16)),
    ("Nq != Nk: the band's alignment is the square one's", dict(nk=150)),
    ("a window with keys after the query", dict(mask=M.sliding_window(8, 2))),
    ("causal & window is an intersection, not one window", dict(mask=M.causal() & M.sliding_window(8, 0))),
    ("Band (the pieces methods split windows into) is not the user's window", dict(mask=M.Band(-8, 0))),
    ("the torch kernel", dict(kernel="torch")),
])
def test_other_calls_keep_the_tile_loop(why, kwargs):
    dtype = kwargs.get("dtype", torch.float32)
    k = torch.zeros(1, 2, kwargs.get("nk", 100), 16, dtype=dtype)
    mask = kwargs.get("mask", M.sliding_window(8, 0))
    plan = plan_call(kwargs.get("kernel", "auto"), device="cpu", dtype=dtype, mask=mask, batch=1, nq=100,
                     nk=k.shape[2], q_heads=2, kv_heads=2, head_dim=16)
    assert plan.band is None, why


def test_band_of_reads_the_window_and_padding():
    pad = M.key_padding(torch.ones(1, 10, dtype=torch.bool))
    assert banded.band_of(M.sliding_window(5, 0)) == (5, None)
    assert banded.band_of(M.sliding_window(5, 0) & pad) == (5, pad)
    assert banded.band_of(pad & M.sliding_window(5, 0)) == (5, pad)
    assert banded.band_of(M.causal()) is None
    assert banded.band_of(None) is None


def test_trace_equals_measurement(monkeypatch):
    # The fake-tensor trace of a banded call (what estimate_step runs) allocates what the real
    # call allocates, to the byte; the method's closed form refuses it (traced instead).
    calls = []
    monkeypatch.setattr(banded, "banded_forward", _counting(banded.banded_forward, calls))
    import attnmem.kernels.tiled as tiled
    monkeypatch.setattr(tiled, "banded_forward", banded.banded_forward)
    kw = dict(batch=1, heads=4, kv_heads=2, seq_len=300, head_dim=32, window=(40, 0))
    est = estimate("sliding_window", **kw)
    assert est.source == "trace" and calls
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 32, dtype=torch.float32)

    def run(q, k, v):
        attnmem.attention(q, k, v, method="sliding_window", window=(40, 0)).sum().backward()

    assert attnmem.measure(run, q, k, v, repeats=0, warmup=0).peak_bytes == est.peak_bytes
    with pytest.raises(ValueError, match="kernels.banded"):
        estimate("sliding_window", how="formula", **kw)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped
