"""The sweep behind ``attnmem compare``: methods × sequence lengths, written as it goes.

Before a case runs, its peak is predicted; a case predicted above the budget is recorded as
``over budget`` (the memory wall) instead of being run. A case that fails at run time is
recorded with its reason and the sweep goes on. Every finished case is appended to
``results.jsonl`` at once (flushed and synced), so an interrupted sweep loses nothing and
``resume`` redoes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..api import validate, validate_mods
from ..memory.estimate import estimate
from ..version import __version__
from .cases import DTYPES, Case, approx_error, floor_bytes, parse_mask, parse_score_mod, run_case
from .rows import Row

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
    score_mod: str = "none"  # a bench.cases.SCORE_MOD_SPECS spec, applied to every method

    def cases(self) -> list[Case]:
        return [Case(method=m, seq_len=n, batch=self.batch, heads=self.heads, kv_heads=self.kv_heads,
                     head_dim=self.head_dim, dtype=self.dtype, device=self.device, causal=self.causal,
                     mask=self.mask, forward_only=self.forward_only, options=dict(self.options.get(m, {})),
                     score_mod=self.score_mod)
                for n in self.seq_lens for m in self.methods]


def predict_peak(case: Case) -> tuple[int, str]:
    """(predicted peak bytes, how it was predicted) for one case, without running it:
    ``attnmem.estimate`` (a trace under fake tensors, or the method's closed form), or, where
    that cannot answer, a coarse bound (the floor, plus the N×N matrices of a quadratic call)."""
    causal, mask = case.attention_mask
    mod = parse_score_mod(case.score_mod, case.heads)
    extra = {"score_mod": mod} if mod is not None else {}
    try:
        est = estimate(case.method, batch=case.batch, heads=case.heads, seq_len=case.seq_len,
                       head_dim=case.head_dim, dtype=DTYPES[case.dtype], training=not case.forward_only,
                       kv_heads=case.kv_heads, causal=causal, mask=mask, **case.options, **extra)
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
    causal, mask = case.attention_mask
    try:
        one = torch.empty((), dtype=DTYPES[case.dtype], device=case.device)
    except (RuntimeError, AssertionError):
        return []  # the device is not here: the run records why
    one.requires_grad_(not case.forward_only)
    hkv = case.kv_heads or case.heads
    q, k, v = (one.expand(case.batch, h, case.seq_len, case.head_dim) for h in (case.heads, hkv, hkv))
    inp = validate(q, k, v, causal=causal, mask=mask)
    mod = parse_score_mod(case.score_mod, case.heads)
    if mod is not None:
        inp = validate_mods(inp, score_mod=mod)
    return m.not_supported_reasons(inp, m.make_options(case.options))


def load_results(path: Path) -> dict[str, Row]:
    """Rows of a results file by case key (the last row of a key wins). A line an interruption
    cut short (not JSON) is ignored; a byte that is not UTF-8 is corruption, not an interruption
    (rows are written as ASCII JSON), and is refused.

    Raises:
        ValueError: naming the file and line, for text that is not UTF-8.
    """
    done: dict[str, Row] = {}
    if not path.exists():
        return done
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: line {number} is not UTF-8 text (byte {e.start}); repair or delete "
                             "that line, or start again with overwrite (--overwrite)") from None
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("key"), str) and "status" in data:
            try:
                done[data["key"]] = Row.from_dict(data)
            except TypeError:
                continue  # a row missing a case field: not one of ours
    return done


def append_result(path: Path, row: Row) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row.as_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def stale_reason(row: Row, cfg: SweepConfig, *, retry_failed: bool = False) -> str:
    """Why a finished row cannot stand for its case in this sweep ("" when it can): it was made
    by another attnmem or torch, its budget decision differs under this budget, or it failed
    and ``retry_failed`` is set."""
    if row.attnmem != __version__:
        return f"made by attnmem {row.attnmem or '(older)'}, this is {__version__}"
    if row.torch != torch.__version__:
        return f"made with torch {row.torch}, this is {torch.__version__}"
    if row.status == "error" and retry_failed:
        return "failed before; retrying"
    over = bool(cfg.budget_bytes) and row.predicted_bytes is not None and row.predicted_bytes > cfg.budget_bytes
    if row.status == "over budget" and not over:
        return f"over an earlier budget of {row.budget_bytes} bytes, not over this one"
    if row.status in ("ok", "error") and over:
        return "over this budget"
    return ""


def _error_columns(method: str, case: Case, cache: dict[str, dict[str, float]]) -> dict[str, float]:
    """Error against full exact attention under the case's mask, on random inputs. Only the
    ``exact`` family computes that attention; a sparse method, exact under its own pattern,
    drops keys the case's mask allows and is measured like any approximation."""
    if registry.get(method).family == "exact":
        return {"approx_error": 0.0, "approx_error_peaked": 0.0}
    if case.score_mod != "none":
        return {}  # the error measurement knows no score_mod: left out rather than measured without it
    if method not in cache:
        n = min(case.seq_len, ERROR_SEQ_LEN)
        causal, mask = parse_mask(case.mask, n)
        causal = causal or case.causal
        try:
            cache[method] = {
                "approx_error": approx_error(method, n, heads=case.heads, head_dim=case.head_dim,
                                             causal=causal, mask=mask, **case.options),
                "approx_error_peaked": approx_error(method, n, heads=case.heads, head_dim=case.head_dim,
                                                    causal=causal, mask=mask, peaked=True, **case.options),
            }
        except (RuntimeError, ValueError, TypeError):
            cache[method] = {}
    return cache[method]


def prepare_results(path: Path, cfg: SweepConfig, *, resume: bool, overwrite: bool,
                    retry_failed: bool) -> dict[str, Row]:
    """The rows of ``path`` that stand for cases of this sweep, the file rewritten to hold
    exactly those (and rows of other cases) so that the sweep appends after them.

    Raises:
        ValueError: ``path`` holds results and neither ``resume`` nor ``overwrite`` is set, or
            both are; ``retry_failed`` without ``resume``; a results file that is not UTF-8.
    """
    if resume and overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other")
    if retry_failed and not resume:
        raise ValueError("retry_failed (--retry-failed) continues a sweep: use it with resume (--resume)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        if path.exists() and path.stat().st_size and not overwrite:
            raise ValueError(f"{path} already holds results: resume (--resume) continues them, "
                             "overwrite (--overwrite) replaces them")
        path.unlink(missing_ok=True)
        return {}
    done = load_results(path)
    wanted = {case.key() for case in cfg.cases()}
    keep = {key: row for key, row in done.items()
            if key not in wanted or not stale_reason(row, cfg, retry_failed=retry_failed)}
    if path.exists():
        # Drop a line an interruption cut short and the rows to redo, atomically, before appending.
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row.as_dict()) + "\n" for row in keep.values()))
        os.replace(tmp, path)
    return {key: row for key, row in keep.items() if key in wanted}


def sweep_row(case: Case, cfg: SweepConfig, errors: dict[str, dict[str, float]]) -> Row:
    """Decide and, when it fits, run one case: not supported, over budget, ok or error."""
    m = registry.get(case.method)
    kind = dict(family=m.family, exact=m.exact)
    reasons = unsupported_reasons(case)
    if reasons:
        # Not run, and not a failure: the method says it does not do this (e.g. a causal-only
        # method in a non-causal sweep). The report lists it with the method's own reasons.
        return Row.of(case, "not supported", reason="; ".join(reasons), budget_bytes=cfg.budget_bytes, **kind)
    predicted, source = predict_peak(case)
    decided = dict(predicted_bytes=predicted, prediction=source, budget_bytes=cfg.budget_bytes)
    if cfg.budget_bytes and predicted > cfg.budget_bytes:
        return Row.of(case, "over budget", **kind, **decided,
                      reason=f"predicted {predicted / 2**20:.0f} MiB > budget {cfg.budget_bytes / 2**20:.0f} MiB")
    row = run_case(case, repeats=cfg.repeats, warmup=cfg.warmup, time_budget_s=cfg.time_budget_s)
    row = dataclasses.replace(row, **decided)
    if row.status == "ok":
        row = dataclasses.replace(row, **_error_columns(case.method, case, errors))
    return row


def run_sweep(cfg: SweepConfig, results_path: Path, *, resume: bool = False, overwrite: bool = False,
              retry_failed: bool = False, on_case: Callable[[Case, int, int], None] | None = None,
              on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run (or resume) a sweep; return every row in case order.

    ``resume``: rows already in ``results_path`` stand for their cases unless ``stale_reason``
    finds they no longer can (another attnmem or torch version, a budget decision this budget
    reverses, a failure with ``retry_failed``): those are redone. Without ``resume``, an
    existing results file is replaced only with ``overwrite``.
    """
    done = prepare_results(results_path, cfg, resume=resume, overwrite=overwrite, retry_failed=retry_failed)
    cases = cfg.cases()
    rows: list[Row] = []
    errors: dict[str, dict[str, float]] = {}
    for i, case in enumerate(cases):
        if on_case:
            on_case(case, i, len(cases))
        row = done.get(case.key())
        if row is None:
            row = sweep_row(case, cfg, errors)
            append_result(results_path, row)
        vars(case).pop("attention_mask", None)  # a parsed mask (a dense one is N×N) lives for its case only
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
