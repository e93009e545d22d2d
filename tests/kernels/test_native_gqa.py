"""The cached ``native_gqa`` probe answers from the real kernels wherever it is first asked."""

from __future__ import annotations

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
