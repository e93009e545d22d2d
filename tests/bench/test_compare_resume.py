"""``compare``'s results file: resume redoes what changed, nothing is replaced unasked, bad
files and folders are one clear line, and progress shows in a log file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnmem.bench import Row
from attnmem.bench.sweep import SweepConfig, load_results, run_sweep
from attnmem.cli import main

TINY = ["--seq-lens", "32,64", "--heads", "2", "--head-dim", "8", "--repeats", "0", "--no-plots"]


def _compare(out, *args):
    return CliRunner().invoke(main, ["compare", "--methods", "chunked,reference", *TINY, "--out", str(out), *args])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_error_line(r, *words):
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith("compare [")]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], r.output


def test_existing_results_need_resume_or_overwrite(tmp_path):
    assert _compare(tmp_path).exit_code == 0
    before = (tmp_path / "results.jsonl").read_text()
    _one_error_line(_compare(tmp_path), "already holds results", "--resume", "--overwrite")
    assert (tmp_path / "results.jsonl").read_text() == before  # not deleted
    r = _compare(tmp_path, "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(_rows(tmp_path / "results.jsonl")) == 4
    _one_error_line(_compare(tmp_path, "--resume", "--overwrite"), "exclude each other")
    _one_error_line(_compare(tmp_path, "--retry-failed", "--overwrite"), "--retry-failed")


def test_empty_or_unwritable_out_is_one_line(tmp_path):
    _one_error_line(_compare(""), "--out", "empty")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _one_error_line(_compare(blocker / "sub"), "--out", "cannot write")


def test_resume_with_a_larger_budget_redoes_over_budget_rows(tmp_path):
    args = ["compare", "--methods", "reference,chunked", "--seq-lens", "64,512", "--heads", "2", "--head-dim", "8",
            "--repeats", "0", "--no-plots", "--out", str(tmp_path)]
    assert CliRunner().invoke(main, [*args, "--budget", "1MiB"]).exit_code == 0
    rows = {(r["method"], r["seq_len"]): r for r in _rows(tmp_path / "results.jsonl")}
    assert rows[("reference", 512)]["status"] == "over budget"
    ok_before = rows[("chunked", 64)]
    r = CliRunner().invoke(main, [*args, "--budget", "8GiB", "--resume"])
    assert r.exit_code == 0, r.output
    after = {(r["method"], r["seq_len"]): r for r in _rows(tmp_path / "results.jsonl")}
    assert len(_rows(tmp_path / "results.jsonl")) == 4  # each case once
    assert after[("reference", 512)]["status"] == "ok"
    assert after[("chunked", 64)] == ok_before  # unchanged conditions: kept, not redone
    report = (tmp_path / "report.md").read_text()
    assert "> budget 1 MiB" not in report
    # A smaller budget again: the measured row it now exceeds becomes over budget.
    r = CliRunner().invoke(main, [*args, "--budget", "1MiB", "--resume"])
    again = {(r["method"], r["seq_len"]): r for r in _rows(tmp_path / "results.jsonl")}
    assert again[("reference", 512)]["status"] == "over budget"


def test_failures_are_retried_only_with_retry_failed(tmp_path):
    assert _compare(tmp_path).exit_code == 0
    path = tmp_path / "results.jsonl"
    rows = _rows(path)
    rows[0].update(status="error", reason="RuntimeError: pretend it failed")
    for r in rows[0:1]:
        for k in ("peak_bytes", "peak_mib", "time_s"):
            r.pop(k)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _compare(tmp_path, "--resume").exit_code == 0
    assert _rows(path)[0]["status"] == "error"
    assert _compare(tmp_path, "--resume", "--retry-failed").exit_code == 0
    statuses = [r["status"] for r in _rows(path)]
    assert statuses.count("ok") == 4 and len(statuses) == 4


def test_rows_of_another_version_are_redone(tmp_path):
    assert _compare(tmp_path).exit_code == 0
    path = tmp_path / "results.jsonl"
    rows = _rows(path)
    rows[1]["attnmem"] = "0.0.1"
    del rows[2]["attnmem"]  # a row from before versions were recorded
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _compare(tmp_path, "--resume").exit_code == 0
    after = _rows(path)
    assert len(after) == 4 and {r["attnmem"] for r in after} == {__import__("attnmem").__version__}
    assert after[0] == rows[0]


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    assert _compare(tmp_path).exit_code == 0
    path = tmp_path / "results.jsonl"
    data = path.read_bytes().splitlines(keepends=True)
    data[1] = data[1][:10] + b"\xff" + data[1][10:]
    path.write_bytes(b"".join(data))
    _one_error_line(_compare(tmp_path, "--resume"), str(path), "line 2", "UTF-8")
    with pytest.raises(ValueError, match="line 2"):
        load_results(path)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = _compare(tmp_path)
    assert r.exit_code == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("compare [")]
    # one line when a case starts, one when it ends, for each of the 4 cases
    assert len(lines) == 8, r.stderr
    assert lines[0].startswith("compare [1/4] chunked N=32") and "ok, peak" in lines[1]


def test_heartbeat_while_a_case_runs(capsys):
    import time

    from attnmem.cli.common import StepProgress

    with StepProgress("compare", 1, heartbeat_s=0.2, terminal=False) as p:
        p.start(0, "slow N=1")
        time.sleep(1.6)
        p.finish("ok")
    err = capsys.readouterr().err
    assert err.count("still running") >= 2 and err.strip().endswith("s)")


def test_sweep_rows_are_typed(tmp_path):
    cfg = SweepConfig(methods=["chunked"], seq_lens=[32], heads=2, head_dim=8, repeats=0)
    rows = run_sweep(cfg, tmp_path / "r.jsonl")
    assert isinstance(rows[0], Row) and rows[0].status == "ok" and rows[0].peak_bytes > 0
    assert Row.from_dict(_rows(tmp_path / "r.jsonl")[0]) == rows[0]
