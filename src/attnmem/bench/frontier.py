"""Which method should I use: task quality against peak memory and time, one point per method.

Quality comes from the rows ``benchmarks/quality.py`` writes (cached, reproducible training
runs; ``attnmem compare --quality PATH`` reads them, so ``attnmem compare`` itself trains
nothing): bits per byte on the stdlib text task and MQAR accuracy, each *trained* with the
method or *swapped* into an exact-attention model, and the error on the q, k, v captured from
that model. Memory and time are measured here, for the same method and option set at the
quality rows' sequence length, in the standard configuration (B=1, H=8, D=64, causal, forward
+ backward, float32): peak bytes with ``attnmem.measure`` and time as a ratio against the best
exact method, interleaved (A, B, A, B, ...) in one run.

A point is on the *frontier* when no other point is at least as good in quality and at most
as costly, and strictly better in one of the two.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..figures import pyplot, save
from ..memory.measure import MiB

BEST_EXACT = ("chunked", "sdpa")  # the exact methods memory saved is counted against
QUALITY_KEYS = {"text": ("bpb", "bits per byte (validation, lower is better)", False),
                "mqar": ("accuracy", "MQAR accuracy (held out, higher is better)", True)}


def method_style(name: str) -> tuple[str, str]:
    """A colour and a marker of one method: its own ``Method.style`` (distinct across the
    registry, stable between reports); black dots for a method no longer registered."""
    try:
        style = registry.get(name).style
    except ValueError:
        return "#000000", "."
    return style.colour, style.marker


def load_quality(path: Path) -> list[dict[str, Any]]:
    """Rows of a quality JSONL file; a line cut short by an interruption is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class QualityPoint:
    """One (task, method and option set): quality trained and swapped over seeds, captured error."""

    task: str
    spec: str
    seq_len: int
    swapped: list[float] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)
    captured_error: list[float] = field(default_factory=list)
    random_error: float | None = None
    reason: str = ""
    peak_bytes: int | None = None
    time_ratio: float | None = None

    @property
    def method(self) -> str:
        return self.spec.partition(":")[0]

    def quality(self) -> float | None:
        """The figure the frontier ranks by: swapped (every method has one), else trained."""
        values = self.swapped or self.trained
        return statistics.fmean(values) if values else None


def mean_spread(values: list[float], digits: int = 3) -> str:
    """``mean ± half range (n seeds)``, or ``—``."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f} ({len(values)} seeds)"


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[QualityPoint]]:
    """Points per task at each task's longest context (the one methods are swapped into)."""
    out: dict[str, list[QualityPoint]] = {}
    for task, (key, _, _) in QUALITY_KEYS.items():
        task_rows = [r for r in rows if r.get("task") == task and r.get("mode") in ("trained", "swapped")]
        if not task_rows:
            continue
        n = max(r["seq_len"] for r in task_rows)
        points: dict[str, QualityPoint] = {}
        for r in task_rows:
            if r["seq_len"] != n:
                continue
            p = points.setdefault(r["method"], QualityPoint(task=task, spec=r["method"], seq_len=n))
            if r["mode"] == "trained" and r.get(key) is not None:
                p.trained.append(r[key])
            elif r["mode"] == "swapped":
                if r.get(key) is not None and r.get("status", "ok") == "ok":
                    p.swapped.append(r[key])
                if r.get("captured_error_mean") is not None:
                    p.captured_error.append(r["captured_error_mean"])
                if r.get("random_error") is not None:
                    p.random_error = r["random_error"]
                p.reason = p.reason or r.get("captured_reason", "") or r.get("reason", "")
        out[task] = list(points.values())
    return out


def short_context(rows: list[dict[str, Any]], task: str = "text", mode: str = "trained") -> dict[int, list[float]]:
    """Trained exact-attention quality by context length: the long-against-short comparison
    (``mode="trained_equal_steps"``: the shorter contexts stopped at the longest one's step)."""
    key = QUALITY_KEYS[task][0]
    by_n: dict[int, list[float]] = {}
    for r in rows:
        if r.get("task") == task and r.get("mode") == mode and r.get("method") == "sdpa" and key in r:
            by_n.setdefault(r["seq_len"], []).append(r[key])
    return by_n


def measure_points(points: list[QualityPoint], *, heads: int = 8, head_dim: int = 64, rounds: int = 3) -> None:
    """Fill ``peak_bytes`` and ``time_ratio`` (time / the best exact method's, interleaved) of
    each point that runs, at its ``seq_len``, causal, forward + backward."""
    from ..method_spec import parse_method_spec
    from .cases import Case, run_case, time_interleaved

    runnable: list[tuple[QualityPoint, Case]] = []
    for p in points:
        name, opts = parse_method_spec(p.spec)
        case = Case(method=name, seq_len=p.seq_len, heads=heads, head_dim=head_dim, causal=True, options=opts)
        row = run_case(case, repeats=0, warmup=0)
        if row.status == "ok":
            p.peak_bytes = row.peak_bytes
            runnable.append((p, case))
    exact = [i for i, (p, _) in enumerate(runnable) if p.spec in BEST_EXACT]
    if not exact or len(runnable) < 2:
        return
    times = time_interleaved([c for _, c in runnable], rounds=rounds, warmup=1)
    best = min(times[i] for i in exact)
    for (p, _), t in zip(runnable, times):
        p.time_ratio = t / best


def cost_rows(points: list[QualityPoint]) -> list[dict[str, Any]]:
    """``mode=cost`` rows of measured points, for a quality file to cache."""
    from .rows import environment

    return [{"mode": "cost", "task": p.task, "method": p.spec, "seq_len": p.seq_len, "peak_bytes": p.peak_bytes,
             "time_ratio": p.time_ratio, "heads": 8, "head_dim": 64, "causal": True, **environment()}
            for p in points if p.peak_bytes is not None]


def cached_costs(rows: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[int | None, float | None]]:
    """(spec, N) -> (peak bytes, time ratio) of the ``mode=cost`` rows, the last of each kept."""
    return {(r["method"], r["seq_len"]): (r.get("peak_bytes"), r.get("time_ratio"))
            for r in rows if r.get("mode") == "cost"}


def best_exact_peak(points: list[QualityPoint]) -> int | None:
    peaks = [p.peak_bytes for p in points if p.spec in BEST_EXACT and p.peak_bytes]
    return min(peaks) if peaks else None


def frontier(points: list[QualityPoint], cost: str, higher_is_better: bool) -> list[QualityPoint]:
    """The points no other point dominates in (quality, ``cost``), cheapest first."""
    def sign(q: float) -> float:
        return q if higher_is_better else -q

    scored = [p for p in points if p.quality() is not None and getattr(p, cost) is not None]
    keep = []
    for p in scored:
        dominated = any(
            sign(o.quality()) >= sign(p.quality()) and getattr(o, cost) <= getattr(p, cost)
            and (sign(o.quality()) > sign(p.quality()) or getattr(o, cost) < getattr(p, cost))
            for o in scored if o is not p)
        if not dominated:
            keep.append(p)
    return sorted(keep, key=lambda p: getattr(p, cost))


def plot_frontier(points_by_task: dict[str, list[QualityPoint]], path: Path) -> bool:
    """Quality against peak memory (left) and time (right), a row per task; filled markers are
    the swapped-in quality, hollow ones the trained-from-scratch quality, and the line joins
    the frontier's points."""
    plt = pyplot()

    tasks = [t for t, ps in points_by_task.items() if any(p.peak_bytes for p in ps)]
    if not tasks:
        return False
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        key, label, higher = QUALITY_KEYS[task]
        pts = points_by_task[task]
        for col, (cost, xlabel) in enumerate((("peak_bytes", "peak memory of one attention call (MiB)"),
                                              ("time_ratio", "time / best exact method's (same run)"))):
            ax = axes[row][col]
            for p in pts:
                x = getattr(p, cost)
                if x is None:
                    continue
                x = x / MiB if cost == "peak_bytes" else x
                colour, marker = method_style(p.method)
                if p.swapped:
                    ax.scatter(x, statistics.fmean(p.swapped), color=colour, marker=marker, s=55, label=p.spec)
                if p.trained:
                    ax.scatter(x, statistics.fmean(p.trained), facecolors="none", edgecolors=colour, marker=marker,
                               s=90, label=f"{p.spec} (trained)")
            front = frontier(pts, cost, higher)
            if len(front) > 1:
                xs = [getattr(p, cost) / (MiB if cost == "peak_bytes" else 1) for p in front]
                ax.plot(xs, [p.quality() for p in front], color="black", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(f"{task}, N = {pts[0].seq_len}: filled = swapped in, hollow = trained with it")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][1].legend(fontsize=6, ncol=2, loc="best")
    save(fig, path)
    return True


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def quality_table(points: list[QualityPoint], task: str) -> str:
    """Every method: quality swapped / trained with seeds and spread, captured error, peak, time."""
    key, _, higher = QUALITY_KEYS[task]
    best = best_exact_peak(points)
    on_front = {p.spec for p in frontier(points, "peak_bytes", higher)}
    lines = [f"| method | {key} swapped into exact | {key} trained with it | error (captured q, k, v) | "
             "error (random) | peak MiB | saved vs best exact | time / best exact | frontier |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.quality() is None, -(p.quality() or 0) if higher else p.quality() or 0)):
        saved = None if best is None or p.peak_bytes is None else 1 - p.peak_bytes / best
        err = mean_spread(p.captured_error, 3) if p.captured_error else f"n/a: {p.reason[:60]}"
        lines.append(f"| {p.spec} | {mean_spread(p.swapped)} | {mean_spread(p.trained)} | {err} | "
                     f"{_fmt(p.random_error)} | {_fmt(p.peak_bytes and p.peak_bytes / MiB, '.1f')} | "
                     f"{_fmt(saved and 100 * saved, '.0f')}{'' if saved is None else ' %'} | "
                     f"{_fmt(p.time_ratio, '.2f')} | {'yes' if p.spec in on_front else ''} |")
    return "\n".join(lines)


def ranking_table(points: list[QualityPoint], task: str) -> str:
    """The frontier against peak memory, cheapest first: the methods worth choosing."""
    key, _, higher = QUALITY_KEYS[task]
    best = best_exact_peak(points)
    lines = [f"| rank | method | {key} (mean ± half range over seeds) | peak MiB | saved vs best exact |",
             "|---|---|---|---|---|"]
    for i, p in enumerate(frontier(points, "peak_bytes", higher), 1):
        saved = None if best is None else 1 - p.peak_bytes / best
        lines.append(f"| {i} | {p.spec} | {mean_spread(p.swapped or p.trained)} | {p.peak_bytes / MiB:.1f} | "
                     f"{_fmt(saved and 100 * saved, '.0f')}{'' if saved is None else ' %'} |")
    return "\n".join(lines)


def quality_section(path: Path, out_dir: Path, *, measure: bool = False, plot: bool = True) -> list[str]:
    """The report's "which method should I use" section (markdown lines) and, with ``plot``, its
    plot. Peak memory and time come from the file's ``mode=cost`` rows, or are measured now when
    it has none or ``measure`` is set."""
    rows = load_quality(path)
    by_task = summarize(rows)
    if not by_task:
        return [f"_No quality rows in {path}._", ""]
    costs = cached_costs(rows)
    for pts in by_task.values():
        for p in pts:
            p.peak_bytes, p.time_ratio = costs.get((p.spec, p.seq_len), (None, None))
        if measure or not costs:
            measure_points(pts)
    notes = sorted({r.get("preset_note", "") for r in rows if r.get("preset_note")})
    hashes = sorted({r["corpus_sha256"] for r in rows if r.get("corpus_sha256")})
    parts = ["## Which method should I use: quality against memory", "",
             f"Quality is read from cached training results, `{path}` (not trained by this command); "
             "regenerate them with `python benchmarks/quality.py all --preset reduced` (or `--preset full`, "
             "the issue's 15-minute-per-run configuration). Configuration of those runs: "
             + "; ".join(notes) + "." + (f" Text corpus sha256: `{', '.join(hashes)}`." if hashes else ""), "",
             "Peak memory and time are measured for the same method and options at the quality rows' N "
             f"({'now' if measure or not costs else 'cached in the same file, `mode=cost` rows'}; "
             "B=1, H=8, D=64, causal, forward + backward); time is a ratio against the best exact method "
             f"({' / '.join(BEST_EXACT)}), interleaved in one run. Memory saved is against the best exact "
             "method at that N, not `reference`. Errors are relative Frobenius errors against full exact "
             "attention under the model's causal mask, on the q, k, v captured from the trained exact model; "
             "random inputs are the secondary column.", ""]
    if plot and plot_frontier(by_task, out_dir / "quality_frontier.png"):
        parts += ["![quality against peak memory and time](quality_frontier.png)", ""]
    contexts = short_context(rows)
    if len(contexts) > 1:
        parts += ["Exact attention trained at each context (text, bits per byte, same time budget): "
                  + ", ".join(f"N = {n}: {mean_spread(v)}" for n, v in sorted(contexts.items(), reverse=True))
                  + "; " + "; ".join(f"{r['method']}: {r['bpb']:.3f}" for r in rows if r.get("mode") == "baseline")
                  + ".", ""]
    equal = short_context(rows, mode="trained_equal_steps")
    if equal and contexts:
        longest = max(contexts)
        parts += [f"The shorter contexts stopped at the step N = {longest} reached (same steps, same tokens): "
                  + ", ".join(f"N = {n}: {mean_spread(v)}" for n, v in sorted(equal.items(), reverse=True))
                  + f", against N = {longest}: {mean_spread(contexts[longest])}.", ""]
    for task, pts in by_task.items():
        parts += [f"### {task}, N = {pts[0].seq_len}: the frontier against peak memory", "",
                  ranking_table(pts, task), "", f"### {task}: every method", "", quality_table(pts, task), ""]
    return parts
