"""``attnmem.measure``: peak bytes of every live tensor and wall time of a call.

CPU has no allocator statistics, so peak memory is tracked at the operator level: a
``TorchDispatchMode`` sees every tensor an operator returns, counts each storage once while it
is alive (a weakref callback subtracts it when freed) and keeps the running maximum. Inputs
passed to ``fn`` (and their ``.grad``) count from the start. Scratch buffers that a fused C++
kernel allocates and frees inside one operator are invisible to it — for SDPA's CPU kernel
that is O(threads · block²), not O(N²). On CUDA the caching allocator's own statistics are
used instead. This module is the only place that knows how; a torch upgrade touches one file.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 2**20
GiB = 2**30


class Peak:
    """What every measured or predicted result has: ``peak_bytes``, and that in MiB."""

    peak_bytes: int

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return  # sparse or otherwise storage-less tensors
        key = id(st)
        size = st.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))
        self._sizes[key] = size
        self.live += size - (old or 0)
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track_tree(self, obj: Any) -> None:
        for leaf in tree_flatten(obj)[0]:
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
                if leaf.grad is not None:
                    self.track(leaf.grad)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        if func._schema.is_mutable:
            # In-place and out= operators may resize their outputs' storage.
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) in self._sizes:
                    self.track(leaf)
        return out


@dataclass
class Measurement(Peak):
    """Peak bytes of all live tensors during one run, and the median wall time of repeats."""

    peak_bytes: int
    time_s: float
    baseline_bytes: int
    times_s: list[float] = field(default_factory=list)
    device: str = "cpu"

    def __str__(self) -> str:
        return f"peak {self.peak_mib:.1f} MiB, time {self.time_s * 1e3:.1f} ms ({self.device})"


def _device_of(args: Any) -> torch.device:
    for leaf in tree_flatten(args)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def track_peak(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, int]:
    """(peak, baseline) bytes of one run of ``fn`` on CPU (or fake) tensors."""
    tracker = LiveTensorTracker()
    tracker.track_tree((args, kwargs))
    baseline = tracker.live
    with tracker:
        result = fn(*args, **kwargs)
        del result
    return tracker.peak, baseline


def measure(fn: Callable[..., Any], *args: Any, repeats: int = 3, warmup: int = 1,
            time_budget_s: float | None = None, **kwargs: Any) -> Measurement:
    """Run ``fn(*args, **kwargs)`` for real; return its peak memory and median time.

    One tracked run gives the peak (tensors in ``args`` count from the start; whatever ``fn``
    returns is dropped at its end); ``warmup`` untimed runs come first and ``repeats`` timed,
    untracked runs after (with ``repeats=0`` the tracked run is timed). With ``time_budget_s``,
    the timed repeats stop once they have taken that long together (at least one runs), so a
    slow case costs one repeat and a fast one gets all ``repeats``.

    Raises:
        ValueError: ``repeats`` or ``warmup`` negative, ``time_budget_s`` not positive.
    """
    if repeats < 0 or warmup < 0:
        raise ValueError(f"repeats and warmup must be >= 0, got repeats={repeats}, warmup={warmup}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s!r}")
    device = _device_of((args, kwargs))
    for _ in range(warmup):
        fn(*args, **kwargs)
    _sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        baseline = before
    else:
        peak, baseline = track_peak(fn, *args, **kwargs)
    tracked_time = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time_budget_s is not None and sum(times) >= time_budget_s:
            break
    time_s = statistics.median(times) if times else tracked_time
    return Measurement(peak, time_s, baseline, times, str(device))
