"""``attnmem decode-bench`` at a tiny configuration: rows, ratios, plot, and bad input."""

import json

from click.testing import CliRunner

from attnmem.cli import main


def test_decode_bench_writes_rows_and_plot(tmp_path):
    r = CliRunner().invoke(main, ["decode-bench", "--contexts", "16,48", "--d-model", "32", "--heads", "4",
                                  "--layers", "2", "--window", "8", "--steps", "2", "--rounds", "1",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    mem = {(x["kind"], x["context"]): x for x in rows if x["type"] == "memory"}
    speed = [x for x in rows if x["type"] == "speed"]
    assert len(mem) == len(speed) == 10
    # Expected bytes from the layout: 2 layers × (k, v) × Hkv × L × D=8 × 4 bytes.
    assert mem["full", 48]["nbytes"] == 2 * 2 * 4 * 48 * 8 * 4
    assert mem["gqa2", 48]["ratio_to_full"] == 0.5  # 2 of 4 KV heads
    assert mem["window8", 16]["nbytes"] == mem["window8", 48]["nbytes"] == 2 * 2 * 4 * 8 * 8 * 4
    assert mem["int8", 48]["nbytes"] == 2 * 2 * 4 * 48 * (8 + 4)
    assert all(x["tokens_per_s"] > 0 for x in speed)
    assert any(x["type"] == "int8_error" for x in rows)
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_decode_bench_bad_kind_is_one_line():
    r = CliRunner().invoke(main, ["decode-bench", "--kinds", "paged", "--contexts", "16", "--out", "/tmp/unused"])
    assert r.exit_code == 2
    assert "unknown cache kind(s) paged" in r.output
