"""One benchmark case: build inputs at a configuration, measure a method, return a row.

Every row records the device, dtype, B, H, N, D, the torch version and the method's options,
so a figure can always be traced to how it was obtained.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import masks as M
from .. import registry
from ..api import attention
from ..memory.measure import MiB, measure
from .rows import Row

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class Case:
    """One (method, configuration) point. Defaults are DESIGN.md's standard configuration."""

    method: str
    seq_len: int
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    kv_heads: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    mask: str = "none"
    forward_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    score_mod: str = "none"  # a SCORE_MOD_SPECS spec

    def key(self) -> str:
        """Identifies a case in results files (for --resume); rows without a score_mod keep
        the key they had before score_mod existed."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        mod = f"|score_mod={self.score_mod}" if self.score_mod != "none" else ""
        return (f"{self.method}|N={self.seq_len}|B={self.batch}|H={self.heads}|Hkv={self.kv_heads}|"
                f"D={self.head_dim}|{self.dtype}|{self.device}|causal={self.causal}|mask={self.mask}|"
                f"fwd={self.forward_only}|{opts}{mod}")

    @functools.cached_property
    def attention_mask(self) -> tuple[bool, Any]:
        """``(causal, mask)`` of this case at its ``seq_len``: the mask spec parsed once, then
        shared by the prediction, the support check and the run (``causal`` includes
        ``self.causal``)."""
        causal, mask = parse_mask(self.mask, self.seq_len)
        return causal or self.causal, mask

    def floor_bytes(self) -> int:
        """q, k, v, out (+ dq, dk, dv when training): the least any exact method must hold."""
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        hkv = self.kv_heads or self.heads
        per_q = self.batch * self.heads * self.seq_len * self.head_dim * itemsize
        per_kv = self.batch * hkv * self.seq_len * self.head_dim * itemsize
        if self.forward_only:
            return 2 * per_q + 2 * per_kv
        return 3 * per_q + 4 * per_kv


def floor_bytes(case: Case) -> int:
    """q, k, v, out (+ dq, dk, dv when training): the least any exact method must hold."""
    return case.floor_bytes()


MASK_SPECS = "none, causal, window:L[:R], dense_window:L[:R], document:LEN or random_blocks:KEEP[:BLOCK]"


def _spec_int(spec: str, what: str, raw: str, least: int) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < least:
        raise ValueError(f"mask spec {spec!r}: {what} must be an integer >= {least}, got {raw!r}")
    return int(value)


def parse_mask(spec: str, n: int) -> tuple[bool, Any]:
    """``(causal, mask)`` from a spec: none, causal, window:L[:R], document:LEN,
    random_blocks:KEEP[:BLOCK], dense_window:L (the window as a dense bool tensor).

    Raises:
        ValueError: naming the spec, for an unknown name or an argument out of range
            (window sizes ≥ 0, document length ≥ 1, 0 ≤ KEEP ≤ 1, block ≥ 1).
    """
    name, *args = spec.split(":")
    limits = {"none": 0, "causal": 0, "window": 2, "dense_window": 2, "document": 1, "random_blocks": 2}
    if name not in limits or len(args) > limits[name] or (limits[name] and not args):
        raise ValueError(f"unknown mask spec {spec!r}; expected {MASK_SPECS}")
    if name == "none":
        return False, None
    if name == "causal":
        return True, None
    if name in ("window", "dense_window"):
        left = _spec_int(spec, "L", args[0], 0)
        right = _spec_int(spec, "R", args[1], 0) if len(args) > 1 else left
        w = M.sliding_window(left, right)
        return (False, w) if name == "window" else (False, w.to_dense(n, n)[0, 0])
    if name == "document":
        return False, M.document(torch.arange(n) // _spec_int(spec, "LEN", args[0], 1))
    try:
        keep = float(args[0])
    except ValueError:
        keep = math.nan
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"mask spec {spec!r}: KEEP must be a fraction in [0, 1], got {args[0]!r}")
    block = _spec_int(spec, "BLOCK", args[1], 1) if len(args) > 1 else 256
    return False, M.random_blocks(n, n, block, keep=keep, seed=0)


SCORE_MOD_SPECS = "none, softcap[:CAP] (default cap 50, Gemma 2's) or alibi (the standard slopes of H heads)"


def parse_score_mod(spec: str, heads: int):
    """The score_mod of a spec (``SCORE_MOD_SPECS``), or None for "none".

    Raises:
        ValueError: naming the spec, for an unknown name or a cap that is not a positive number.
    """
    from .. import scores

    name, *args = spec.split(":")
    if name == "none" and not args:
        return None
    if name == "alibi" and not args:
        return scores.alibi(heads)
    if name == "softcap" and len(args) <= 1:
        try:
            cap = float(args[0]) if args else 50.0
        except ValueError:
            cap = math.nan
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"score_mod spec {spec!r}: CAP must be a positive number, got {args[0]!r}")
        return scores.softcap(cap)
    raise ValueError(f"unknown score_mod spec {spec!r}; expected {SCORE_MOD_SPECS}")


def make_inputs(case: Case, seed: int = 0):
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    g = torch.Generator().manual_seed(seed)
    hkv = case.kv_heads or case.heads
    shape_q = (case.batch, case.heads, case.seq_len, case.head_dim)
    shape_kv = (case.batch, hkv, case.seq_len, case.head_dim)
    q = torch.randn(shape_q, generator=g).to(dev, dtype)
    k = torch.randn(shape_kv, generator=g).to(dev, dtype)
    v = torch.randn(shape_kv, generator=g).to(dev, dtype)
    if not case.forward_only:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def attend_fn(method: str, *, heads: int, kv_heads: int | None, head_dim: int, seq_len: int,
              options: dict[str, Any], device: str = "cpu", dtype: str = "float32", seed: int = 0,
              score_mod: str = "none"):
    """``f(q, k, v, causal, mask)`` running ``method``. A stateful method (``linformer``,
    memory attention) gets its module built here, seeded, with the options its method gives a
    call of ``seq_len`` tokens (``Method.options_for_length``: linformer's max_len = max(N, k));
    its learned parameters start untrained, and a memory is cleared before every call so that
    each repeat reads the same stream."""
    m = registry.get(method)
    mod = parse_score_mod(score_mod, heads)
    if not m.stateful:
        extra = {"score_mod": mod} if mod is not None else {}

        def functional(q, k, v, causal, mask):
            return attention(q, k, v, method=method, causal=causal, mask=mask, **options, **extra)
        return functional
    if mod is not None:
        raise ValueError(f"score_mod {score_mod!r}: method {method!r} has learned state; its module takes no score_mod")
    opts = m.options_for_length(dict(options), seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = m.build_module(heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim,
                                opts=m.make_options(opts))
    module = module.to(torch.device(device), DTYPES[dtype])

    reset = getattr(module, "reset", None)

    def stateful(q, k, v, causal, mask):
        if callable(reset):
            reset()
        return module(q, k, v, causal=causal, mask=mask)
    return stateful


def case_fn(case: Case):
    """The function a case measures: forward (+ backward), inputs passed as arguments so the
    tracker counts them."""
    causal, mask = case.attention_mask
    attend = attend_fn(case.method, heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
                       seq_len=case.seq_len, options=case.options, device=case.device, dtype=case.dtype,
                       score_mod=case.score_mod)

    def run(q, k, v):
        if case.forward_only:
            with torch.no_grad():
                attend(q, k, v, causal, mask)
            return
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, causal, mask)
        out.sum().backward()

    return run


def run_case(case: Case, *, repeats: int = 3, warmup: int = 1, time_budget_s: float | None = None) -> Row:
    """Measure one case (``attnmem.measure``'s repeats, warm-up and time budget). Failures
    (out of memory, errors) are recorded in the row, not raised."""
    m = registry.get(case.method)
    kind = dict(family=m.family, exact=m.exact)
    try:
        q, k, v = make_inputs(case)
        got = measure(case_fn(case), q, k, v, repeats=repeats, warmup=warmup, time_budget_s=time_budget_s)
    except (RuntimeError, MemoryError, ValueError, TypeError) as e:
        return Row.of(case, "error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      traceback=traceback.format_exc(limit=3), **kind)
    floor = floor_bytes(case)
    return Row.of(case, "ok", peak_bytes=got.peak_bytes, peak_mib=got.peak_bytes / MiB,
                  peak_over_floor=got.peak_bytes / floor, time_s=got.time_s, times_s=list(got.times_s), **kind)


def time_interleaved(cases: list[Case], rounds: int = 3, warmup: int = 1) -> list[float]:
    """Median seconds per case, running the cases in turn (A, B, A, B, ...) so that load from
    other processes falls on all of them alike; the ratios are what to read."""
    prepared = [(case_fn(c), make_inputs(c)) for c in cases]
    for _ in range(warmup):
        for fn, args in prepared:
            fn(*args)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, (fn, args) in enumerate(prepared):
            t0 = time.perf_counter()
            fn(*args)
            if args[0].device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def approx_error(method: str, seq_len: int, *, heads: int = 8, head_dim: int = 64, causal: bool = False,
                 peaked: bool = False, seed: int = 0, mask: Any = None, **options: Any) -> float:
    """Relative Frobenius error of ``method``'s output against exact attention under the same
    ``causal`` and ``mask`` (full attention, not the method's own pattern), same inputs.

    ``peaked`` builds queries close to a few keys (sharp attention), where low-rank and kernel
    approximations suffer most; otherwise q, k, v are standard normal. Stateful methods
    (``linformer``) run as a freshly built, untrained module (``attend_fn``).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (1, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    if peaked:
        # Each query is a scaled copy of one random key: attention concentrates on it.
        idx = torch.randint(0, seq_len, (seq_len,), generator=g)
        q = 3.0 * k[:, :, idx] + 0.1 * q
    with torch.no_grad():
        exact = attention(q, k, v, method="chunked", causal=causal, mask=mask)
        attend = attend_fn(method, heads=heads, kv_heads=None, head_dim=head_dim, seq_len=seq_len,
                           options=options, seed=seed)
        approx = attend(q, k, v, causal, mask)
    return ((approx - exact).norm() / exact.norm()).item()
