"""The sweep behind ``attnmem compare``: methods × sequence lengths, written as it goes.

Before a case runs, its peak is predicted; a case predicted above the budget is recorded as
``over budget`` (the memory wall) instead of being run. A case that fails at run time is
recorded with its reason and the sweep goes on. Every finished case is appended to
``results.jsonl`` at once (flushed and synced), so an interrupted sweep loses nothing and
``resume`` redoes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..api import validate
from ..memory.estimate import estimate
from .cases import DTYPES, Case, approx_error, environment, floor_bytes, parse_mask, run_case

ERROR_SEQ_LEN = 1024  # approximation errors are measured at min(N, this)


@dataclass
class SweepConfig:
    methods: list[str]
    seq_lens: list[int]
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    mask: str = "none"
    forward_only: bool = False
    # The tracked run (peak memory) is a full run of the same call on the same inputs: it is
    # the warm-up of the timed repeats that follow. Up to ``repeats`` of those run, until they
    # have taken ``time_budget_s`` together (at least one); the time is their median.
    repeats: int = 3
    warmup: int = 0
    time_budget_s: float | None = 1.0
    budget_bytes: int = 0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cases(self) -> list[Case]:
        return [Case(method=m, seq_len=n, batch=self.batch, heads=self.heads, kv_heads=self.kv_heads,
                     head_dim=self.head_dim, dtype=self.dtype, device=self.device, causal=self.causal,
                     mask=self.mask, forward_only=self.forward_only, options=dict(self.options.get(m, {})))
                for n in self.seq_lens for m in self.methods]


def predict_peak(case: Case) -> tuple[int, str]:
    """(predicted peak bytes, how it was predicted) for one case, without running it:
    ``attnmem.estimate`` (a trace under fake tensors, or the method's closed form), or, where
    that cannot answer, a coarse bound (the floor, plus the N×N matrices of a quadratic call)."""
    causal, mask = parse_mask(case.mask, case.seq_len)
    try:
        est = estimate(case.method, batch=case.batch, heads=case.heads, seq_len=case.seq_len,
                       head_dim=case.head_dim, dtype=DTYPES[case.dtype], training=not case.forward_only,
                       kv_heads=case.kv_heads, causal=causal or case.causal, mask=mask, **case.options)
        return int(est.peak_bytes), f"attnmem.estimate ({est.source})"
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        pass
    floor = floor_bytes(case)
    if registry.get(case.method).quadratic or case.mask.startswith("dense"):
        itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
        matrices = 2 if case.forward_only else 4  # scores and probabilities (+ their gradients)
        return floor + matrices * case.batch * case.heads * case.seq_len**2 * itemsize, "coarse bound"
    return int(1.5 * floor), "coarse bound"


def unsupported_reasons(case: Case) -> list[str]:
    """Why the case's method cannot run the case's inputs, asked of the method itself on
    stand-in tensors (one element broadcast to each shape; nothing is allocated). Empty when it
    can, and for stateful methods, whose modules answer only when they run."""
    m = registry.get(case.method)
    if m.stateful:
        return []
    causal, mask = parse_mask(case.mask, case.seq_len)
    try:
        one = torch.empty((), dtype=DTYPES[case.dtype], device=case.device)
    except (RuntimeError, AssertionError):
        return []  # the device is not here: the run records why
    one.requires_grad_(not case.forward_only)
    hkv = case.kv_heads or case.heads
    q, k, v = (one.expand(case.batch, h, case.seq_len, case.head_dim) for h in (case.heads, hkv, hkv))
    inp = validate(q, k, v, causal=causal or case.causal, mask=mask)
    return m.not_supported_reasons(inp, m.make_options(case.options))


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a results file by case key; a line cut short by an interruption is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            done[row["key"]] = row
    return done


def append_result(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _error_columns(method: str, case: Case, cache: dict[str, dict[str, float]]) -> dict[str, float]:
    info = registry.get(method).info()
    if info.exact:
        return {"approx_error": 0.0, "approx_error_peaked": 0.0}
    if method not in cache:
        n = min(case.seq_len, ERROR_SEQ_LEN)
        causal, _ = parse_mask(case.mask, n)
        try:
            cache[method] = {
                "approx_error": approx_error(method, n, heads=case.heads, head_dim=case.head_dim,
                                             causal=causal or case.causal, **case.options),
                "approx_error_peaked": approx_error(method, n, heads=case.heads, head_dim=case.head_dim,
                                                    causal=causal or case.causal, peaked=True, **case.options),
            }
        except (RuntimeError, ValueError, TypeError):
            cache[method] = {}
    return cache[method]


def run_sweep(cfg: SweepConfig, results_path: Path, *, resume: bool = False,
              on_case: Callable[[Case, int, int], None] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; return every row in case order."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(results_path) if resume else {}
    if resume and results_path.exists():
        # Drop a line an interruption cut short, atomically, before appending after it.
        tmp = results_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
        os.replace(tmp, results_path)
    elif results_path.exists():
        results_path.unlink()
    cases = cfg.cases()
    rows: list[dict[str, Any]] = []
    errors: dict[str, dict[str, float]] = {}
    for i, case in enumerate(cases):
        if on_case:
            on_case(case, i, len(cases))
        if case.key() in done:
            rows.append(done[case.key()])
            continue
        reasons = unsupported_reasons(case)
        if reasons:
            # Not run, and not a failure: the method says it does not do this (e.g. a causal-only
            # method in a non-causal sweep). The report lists it with the method's own reasons.
            row = {"key": case.key(), **asdict(case), **environment(), "floor_bytes": floor_bytes(case),
                   "status": "not supported", "reason": "; ".join(reasons),
                   "family": registry.get(case.method).family, "exact": registry.get(case.method).exact}
            append_result(results_path, row)
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        predicted, source = predict_peak(case)
        if cfg.budget_bytes and predicted > cfg.budget_bytes:
            row = {"key": case.key(), **asdict(case), **environment(), "floor_bytes": floor_bytes(case),
                   "status": "over budget",
                   "reason": f"predicted {predicted / 2**20:.0f} MiB > budget {cfg.budget_bytes / 2**20:.0f} MiB"}
        else:
            row = run_case(case, repeats=cfg.repeats, warmup=cfg.warmup, time_budget_s=cfg.time_budget_s)
        row.update(predicted_bytes=predicted, prediction=source, budget_bytes=cfg.budget_bytes,
                   family=registry.get(case.method).family, exact=registry.get(case.method).exact)
        if row["status"] == "ok":
            row.update(_error_columns(case.method, case, errors))
        append_result(results_path, row)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
