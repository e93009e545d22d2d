"""``attnmem compare --score-mod``: the grammar, rows that say it, and refusal by methods that cannot."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnmem import scores as S
from attnmem.bench import sweep
from attnmem.bench.cases import parse_score_mod
from attnmem.bench.report import _config_line
from attnmem.cli import compare as compare_mod
from attnmem.cli import main
from attnmem.cli.compare import default_methods


def test_score_mod_grammar():
    assert parse_score_mod("none", 8) is None
    assert parse_score_mod("softcap", 8).cap == 50.0  # Gemma 2's default
    assert parse_score_mod("softcap:30", 8).cap == 30.0
    alibi = parse_score_mod("alibi", 4)
    assert isinstance(alibi, S.ALiBi) and alibi.slopes.tolist() == S.alibi_slopes(4).tolist()
    for bad, word in (("softcap:-1", "positive"), ("softcap:x", "positive"), ("cap", "unknown"),
                      ("alibi:3", "unknown"), ("softcap:1:2", "unknown")):
        with pytest.raises(ValueError, match=word):
            parse_score_mod(bad, 8)


def test_compare_runs_the_score_mod_and_rows_say_it(tmp_path, monkeypatch):
    # The prediction would trace on fake tensors (seconds to import): the budget check is not tested here.
    monkeypatch.setattr(sweep, "predict_peak", lambda case: (0, "not predicted (test)"))
    # The report's plots import matplotlib (seconds): its header line is checked on the rows below.
    monkeypatch.setattr(compare_mod, "write_report", lambda rows, out, budget, quality, plots: out / "report.md")
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked,reference", "--seq-lens", "48", "--heads", "2",
                                  "--head-dim", "8", "--causal", "--score-mod", "softcap:20", "--repeats", "0",
                                  "--out", str(out), "--quality", "none"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(row["method"], row["status"], row["score_mod"]) for row in rows] == [
        ("chunked", "ok", "softcap:20"), ("reference", "ok", "softcap:20")]
    assert "score_mod=softcap:20" in rows[0]["key"]
    assert "chunked (softcap:20)" in r.output and "score_mod softcap:20" in r.output
    assert "score_mod softcap:20" in _config_line(rows)


@pytest.mark.parametrize("spec", ["softcap", "alibi"])
def test_methods_that_cannot_apply_a_score_mod_are_refused(tmp_path, spec):
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked,linear", "--seq-lens", "64",
                                  "--score-mod", spec, "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "linear cannot apply a score_mod" in r.output, r.output
    assert not (tmp_path / "c").exists()


def test_bad_spec_is_one_line_and_default_methods_are_those_that_can():
    r = CliRunner().invoke(main, ["compare", "--score-mod", "softcap:0", "--seq-lens", "64"])
    assert r.exit_code == 2 and "--score-mod" in r.output and "positive" in r.output, r.output
    able = default_methods(score_mod=True)
    assert "chunked" in able and "sliding_window" in able and "linear" not in able and "sdpa" not in able


def test_methods_table_shows_the_modifications():
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0, r.output
    block = r.output.split("\nchunked ")[1].split("\n\n")[0]
    assert "score_mod ✓  sinks ✓  dropout ✓  return_lse ✓" in block, block
    linear = r.output.split("\nlinear ")[1].split("\n\n")[0]
    assert "score_mod ·" in linear, linear
    js = {m["name"]: m["supports"] for m in json.loads(CliRunner().invoke(main, ["methods", "--json"]).output)}
    assert js["chunked"]["score_mod"] and js["chunked"]["dropout"] and not js["sdpa"]["score_mod"]
