"""attnmem.measure counts every live tensor: inputs, outputs, gradients, transients."""

import pytest
import torch

import attnmem
from attnmem.memory.measure import MiB, track_peak


def test_counts_inputs_and_transients():
    x = torch.zeros(MiB // 4)  # 1 MiB

    def fn(x):
        y = x + 1  # +1 MiB
        z = y * 2  # +1 MiB
        del y
        return z.sum()

    m = attnmem.measure(fn, x, repeats=1, warmup=0)
    assert m.baseline_bytes == MiB
    assert 3 * MiB <= m.peak_bytes < 3 * MiB + 4096


def test_freed_tensors_do_not_accumulate():
    x = torch.zeros(MiB // 4)

    def fn(x):
        for _ in range(10):
            y = x * 2
            del y

    peak, base = track_peak(fn, x)
    assert peak < 2 * MiB + 4096 and base == MiB


def test_reference_peak_grows_quadratically_and_chunked_linearly():
    peaks = {}
    for n in (256, 512):
        q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
        for method in ("reference", "chunked"):
            def fn(q, k, v, method=method):
                attnmem.attention(q, k, v, method=method).sum().backward()
            peaks[method, n] = attnmem.measure(fn, q, k, v, repeats=0, warmup=0).peak_bytes
    # The reference holds at least the n×n probability matrix.
    assert peaks["reference", 512] >= 2 * 512 * 512 * 4
    assert peaks["reference", 512] / peaks["reference", 256] > 3
    assert peaks["chunked", 512] / peaks["chunked", 256] < 2.5


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        attnmem.measure(lambda: None, repeats=-1)


def test_time_budget_stops_repeats_once_spent():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    m = attnmem.measure(slow, repeats=5, warmup=0, time_budget_s=0.001)
    assert len(m.times_s) == 1 and len(calls) == 2  # the tracked run, then one timed repeat
    calls.clear()
    m = attnmem.measure(slow, repeats=3, warmup=0, time_budget_s=60)
    assert len(m.times_s) == 3 and len(calls) == 4
    with pytest.raises(ValueError, match="time_budget_s"):
        attnmem.measure(slow, time_budget_s=0)
