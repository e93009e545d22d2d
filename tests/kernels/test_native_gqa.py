"""The cached ``native_gqa`` probe answers from the real kernels wherever it is first asked."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attnmem.kernels import native_gqa
from attnmem.memory.measure import LiveTensorTracker


def test_probe_runs_outside_fake_tensors_and_trackers():
    # Its first call may come inside attnmem.estimate's trace (a fake-tensor mode under a tracker):
    # the probe must run on real tensors there, unseen by the tracker, and agree with a plain call.
    native_gqa.cache_clear()
    try:
        tracker = LiveTensorTracker()
        with FakeTensorMode(), tracker:
            inside = native_gqa()
        assert tracker.peak == 0  # no probe tensor was made under the modes
        native_gqa.cache_clear()
        assert inside == native_gqa()
    finally:
        native_gqa.cache_clear()


def test_only_the_per_head_loop_is_bounded(monkeypatch):
    # GROUPED_CAUSAL_MAX_BYTES bounds the expanded dK/dV of the per-KV-head loop; the one call
    # of native GQA has none, so past the bound it still runs (and its memory model follows).
    import attnmem.kernels.tiled as tiled
    from attnmem import masks as M
    from attnmem.memory.estimate import estimate

    monkeypatch.setattr(tiled, "GROUPED_CAUSAL_MAX_BYTES", 0)  # every size is past the bound
    kw = dict(device="cpu", dtype=torch.float32, mask=M.causal(), batch=1, nq=512, nk=512, q_heads=4,
              kv_heads=2, head_dim=16)
    monkeypatch.setattr(tiled, "native_gqa", lambda: True)
    assert tiled.plan_call("auto", **kw).single_call
    est = dict(batch=1, heads=4, kv_heads=2, seq_len=512, head_dim=16, causal=True)
    traced, closed = estimate("chunked", how="trace", **est), estimate("chunked", how="formula", **est)
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 16, (closed, traced)
    monkeypatch.setattr(tiled, "native_gqa", lambda: False)
    assert not tiled.plan_call("auto", **kw).grouped_causal
