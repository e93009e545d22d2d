"""The command line: tables, results files, and one clear line on bad input."""

import json

from click.testing import CliRunner

from attnmem.cli import main


def test_methods_table_and_json():
    r = CliRunner().invoke(main, ["methods", "--json"])
    assert r.exit_code == 0
    names = {m["name"] for m in json.loads(r.output)}
    assert {"reference", "sdpa", "chunked"} <= names
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0 and "chunked" in r.output


def test_compare_writes_results(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked,reference", "--seq-lens", "64,128",
                                  "--heads", "2", "--head-dim", "16", "--repeats", "0", "--no-plots",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert all(row["torch"] and row["heads"] == 2 for row in rows)


def test_compare_bad_flags_one_line():
    runner = CliRunner()
    for args in (["--methods", "nope"], ["--seq-lens", "12,x"], ["--mask", "windowz:3"], ["--seq-lens", "-5"]):
        r = runner.invoke(main, ["compare", *args])
        assert r.exit_code == 2, (args, r.output)
