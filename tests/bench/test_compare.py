"""attnmem compare: the sweep, its results file, resume, the budget and the report."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from attnmem import registry
from attnmem.cli import main
from attnmem.registry import Method

TINY = ["--seq-lens", "32,64", "--heads", "2", "--head-dim", "8", "--repeats", "0"]
FAST = [*TINY, "--no-plots"]  # drawing the plots is most of a tiny sweep's time


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_sweep_writes_report_and_plots(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked,reference,sdpa", *TINY, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "results.jsonl")
    assert len(rows) == 6 and {row["status"] for row in rows} == {"ok"}
    report = (tmp_path / "report.md").read_text()
    assert "| chunked | exact | 64 | ok |" in report
    assert "Long Range Arena" in report
    for png in ("peak_memory.png", "time.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_over_budget_case_is_marked_and_not_run(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--methods", "reference,chunked", "--seq-lens", "64,512",
                                  "--heads", "2", "--head-dim", "8", "--repeats", "0", "--budget", "1MiB",
                                  "--no-plots", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = {(row["method"], row["seq_len"]): row for row in _rows(tmp_path / "results.jsonl")}
    over = rows[("reference", 512)]
    assert over["status"] == "over budget" and "peak_bytes" not in over
    assert over["predicted_bytes"] > 2**20
    assert rows[("chunked", 64)]["status"] == "ok"
    report = (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png")) and "_Plots not drawn (--no-plots)._" in report


@dataclass(frozen=True)
class _NoOpts:
    pass


class _Broken(Method):
    name = "broken_for_test"
    family = "exact"
    memory = "n/a"
    summary = "raises at run time"

    def forward(self, inp, opts):
        raise RuntimeError("deliberate failure")


@pytest.fixture
def broken_method():
    registry.register(_Broken)
    yield "broken_for_test"
    registry._REGISTRY.pop("broken_for_test")


def test_failing_method_is_recorded_and_sweep_continues(tmp_path, broken_method):
    r = CliRunner().invoke(main, ["compare", "--methods", f"{broken_method},chunked", *FAST, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "results.jsonl")
    assert [row["status"] for row in rows] == ["error", "ok", "error", "ok"]
    assert "deliberate failure" in rows[0]["reason"]


def test_unsupported_method_is_marked_with_its_reasons_and_not_run(tmp_path):
    # adaptive_span_fixed is causal by definition; the default sweep is not causal.
    r = CliRunner().invoke(main, ["compare", "--methods", "adaptive_span_fixed,chunked", *FAST,
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = {(row["method"], row["seq_len"]): row for row in _rows(tmp_path / "results.jsonl")}
    skipped = rows[("adaptive_span_fixed", 64)]
    assert skipped["status"] == "not supported" and "peak_bytes" not in skipped
    assert "causal" in skipped["reason"]
    assert rows[("chunked", 64)]["status"] == "ok"
    report = (tmp_path / "report.md").read_text()
    assert "## Not supported (not run)" in report and "adaptive_span_fixed" in report
    assert "## Failures" not in report


def test_lra_table_puts_published_ratios_beside_ours():
    from attnmem.bench.report import LRA_PUBLISHED, lra_table

    def row(method, n, t, peak):
        return {"method": method, "seq_len": n, "status": "ok", "time_s": t, "peak_bytes": peak}

    rows = [row("reference", 1024, 2.0, 400), row("performer", 1024, 1.0, 100),
            row("reference", 4096, 8.0, 1600), row("performer", 4096, 2.0, 200)]
    table = lra_table(rows).splitlines()
    ours = next(line for line in table if line.startswith("| performer |"))
    assert ours == "| performer | 2.00× | 4.00× | 0.25× | 0.12× |"
    theirs = table[table.index(ours) + 1]
    _, speed, gb = LRA_PUBLISHED["performer"]
    ref_gb = LRA_PUBLISHED["reference"][2]
    # Their 1K and 4K columns, the memory ratio computed from their GB figures.
    assert theirs == (f"| ↳ Tay et al.: Performer | {speed[0]:.1f}× | {speed[3]:.1f}× | "
                      f"{gb[0] / ref_gb[0]:.2f}× | {gb[3] / ref_gb[3]:.2f}× |")


def test_bad_flags_one_clear_line(tmp_path):
    for args in (["--methods", "nope"], ["--seq-lens", "1,x"], ["--budget", "lots"], ["--mask", "zigzag:3"],
                 ["--dtype", "int8"], ["--heads", "0"]):
        r = CliRunner().invoke(main, ["compare", *args, "--out", str(tmp_path)])
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output


def test_resume_after_kill_redoes_nothing_and_loses_nothing(tmp_path):
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "attnmem", "compare", "--methods", "chunked,sdpa",
           "--seq-lens", "64,128,256,512,1024,2048", "--heads", "2", "--head-dim", "16", "--repeats", "3",
           "--no-plots", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows(results)
    assert 3 <= len(before) < 12, "the sweep should have been interrupted midway"
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked,sdpa", "--seq-lens", "64,128,256,512,1024,2048",
                                  "--heads", "2", "--head-dim", "16", "--repeats", "3", "--out", str(out), "--resume",
                                  "--no-plots"])
    assert r.exit_code == 0, r.output
    after = _rows(results)
    keys = [row["key"] for row in after]
    assert len(keys) == len(set(keys)) == 12  # every case exactly once
    assert after[: len(before)] == before  # finished rows untouched, not redone
