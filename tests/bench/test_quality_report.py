"""The compare report's quality columns: memory saved against the best exact method, sparse
methods' error against full attention, and the quality-against-memory frontier."""

from __future__ import annotations

import json

import pytest

from attnmem import registry
from attnmem.bench.cases import Case
from attnmem.bench.frontier import QualityPoint, frontier, method_style, quality_section, ranking_table, summarize
from attnmem.bench.report import best_exact_peaks, memory_saved, results_table
from attnmem.bench.sweep import _error_columns
from attnmem.cli.compare import quality_file


def test_sparse_error_is_against_full_attention_not_its_own_pattern():
    window = Case(method="sliding_window", seq_len=128, heads=2, head_dim=16, causal=True, options={"window": 8})
    assert _error_columns("sliding_window", window, {})["approx_error"] > 0.1  # N = 128 > window: keys dropped
    wide = Case(method="sliding_window", seq_len=64, heads=2, head_dim=16, causal=True, options={"window": 64})
    assert _error_columns("sliding_window", wide, {})["approx_error"] < 1e-5  # every causal key kept
    exact = Case(method="chunked", seq_len=128, heads=2, head_dim=16, causal=True)
    assert _error_columns("chunked", exact, {})["approx_error"] == 0.0


def _row(method, peak, n=1024, **extra):
    return {"method": method, "seq_len": n, "status": "ok", "peak_bytes": peak, "peak_mib": peak / 2**20,
            "peak_over_floor": 1.0, "time_s": 0.1, "family": registry.get(method).family, **extra}


def test_memory_saved_is_against_the_best_exact_method_not_reference():
    rows = [_row("reference", 400), _row("chunked", 100), _row("sdpa", 80), _row("linear", 40),
            _row("chunked", 1000, n=2048)]
    best = best_exact_peaks(rows)
    assert best == {1024: 80, 2048: 1000}
    assert memory_saved(rows[3], best) == pytest.approx(0.5)
    assert memory_saved(rows[0], best) == pytest.approx(-4.0)  # reference costs 5× the best exact
    table = results_table(rows)
    assert "saved vs best exact" in table.splitlines()[0]
    assert "| 50 % |" in table and "| -400 % |" in table


def test_every_method_has_its_own_colour_and_marker():
    styles = [method_style(name) for name in registry.names()]
    assert len(set(styles)) == len(styles)
    assert len({colour for colour, _ in styles}) == min(len(styles), 20)


def test_frontier_keeps_only_undominated_points():
    pts = [QualityPoint(task="text", spec=s, seq_len=512, swapped=[q], peak_bytes=b)
           for s, q, b in (("sdpa", 3.0, 100), ("sliding_window:window=64", 3.2, 50), ("linear", 3.5, 60),
                           ("topk:topk=64", 3.0, 300))]
    kept = [p.spec for p in frontier(pts, "peak_bytes", higher_is_better=False)]
    assert kept == ["sliding_window:window=64", "sdpa"]  # linear: worse and dearer than the window
    assert "| 1 | sliding_window:window=64 | 3.200 (1 seed) | 0.0 | 50 % |" in ranking_table(pts, "text")


def test_quality_section_reads_cached_rows(tmp_path):
    rows = [{"task": "text", "mode": "trained", "method": "sdpa", "seq_len": 512, "bpb": b, "seed": s,
             "preset_note": "tiny", "corpus_sha256": "ab" * 32} for s, b in ((0, 3.0), (1, 3.1))]
    rows += [{"task": "text", "mode": "trained", "method": "sdpa", "seq_len": 64, "bpb": 3.4, "seed": 0}]
    rows += [{"task": "text", "mode": "swapped", "method": m, "seq_len": 512, "bpb": b, "status": "ok",
              "captured_error_mean": e, "random_error": 0.5, "seed": 0}
             for m, b, e in (("sdpa", 3.0, 0.0), ("sliding_window:window=64", 3.3, 0.4))]
    rows += [{"task": "text", "mode": "swapped", "method": "nystrom", "seq_len": 512, "status": "not applicable",
              "captured_status": "not applicable", "captured_reason": "does not support causal=True", "seed": 0}]
    rows += [{"mode": "cost", "task": "text", "method": m, "seq_len": 512, "peak_bytes": b, "time_ratio": t}
             for m, b, t in (("sdpa", 2 << 20, 1.0), ("sliding_window:window=64", 1 << 20, 0.8))]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_task = summarize(rows)
    sdpa = next(p for p in by_task["text"] if p.spec == "sdpa")
    assert sdpa.trained == [3.0, 3.1] and sdpa.swapped == [3.0]
    text = "\n".join(quality_section(path, tmp_path))
    assert "cached" in text and "benchmarks/quality.py" in text and "ab" * 32 in text
    assert "N = 512: 3.050 ± 0.050 (2 seeds), N = 64: 3.400 (1 seed)" in text
    assert "| sliding_window:window=64 | 3.300 (1 seed) | — | 0.400 (1 seed) | 0.5 | 1.0 | 50 % | 0.80 | yes |" in text
    assert "n/a: does not support causal=True" in text
    assert (tmp_path / "quality_frontier.png").stat().st_size > 0


def test_compare_quality_flag(tmp_path):
    assert quality_file("none") is None
    with pytest.raises(ValueError, match="--quality"):
        quality_file(str(tmp_path / "missing.jsonl"))
