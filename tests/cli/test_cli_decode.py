"""``attnmem decode-bench`` at a tiny configuration: rows, ratios, plot, and bad input."""

import json

from click.testing import CliRunner

from attnmem.cli import main


def test_decode_bench_writes_rows_and_plot(tmp_path):
    r = CliRunner().invoke(main, ["decode-bench", "--contexts", "16,48", "--d-model", "32", "--heads", "4",
                                  "--layers", "2", "--window", "8", "--budget", "8", "--steps", "2",
                                  "--rounds", "1", "--paged-lengths", "5,50", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    mem = {(x["kind"], x["context"]): x for x in rows if x["type"] == "memory"}
    speed = [x for x in rows if x["type"] == "speed"]
    assert len(mem) == len(speed) == 20
    # Expected bytes from the layout: 2 layers × (k, v) × Hkv × L × D=8 × 4 bytes.
    assert mem["full", 48]["nbytes"] == 2 * 2 * 4 * 48 * 8 * 4
    assert mem["gqa2", 48]["ratio_to_full"] == 0.5  # 2 of 4 KV heads
    assert mem["window8", 16]["nbytes"] == mem["window8", 48]["nbytes"] == 2 * 2 * 4 * 8 * 8 * 4
    assert mem["int8", 48]["nbytes"] == 2 * 2 * 4 * 48 * (8 + 4)
    # int2: 48 tokens, residual 128: nothing quantised yet, the float32 residual only.
    assert mem["int2", 48]["nbytes"] == mem["full", 48]["nbytes"]
    # Eviction at budget 8: 8 tokens of K, V (float32) and their int64 positions (H2O: + scores).
    assert mem["sink_window8", 48]["nbytes"] == mem["snapkv8", 48]["nbytes"] == 2 * 4 * 8 * (2 * 8 * 4 + 8)
    assert mem["heavy_hitter8", 48]["nbytes"] == 2 * 4 * 8 * (2 * 8 * 4 + 8 + 4)
    assert all(x["tokens_per_s"] > 0 for x in speed)
    paged = next(x for x in rows if x["type"] == "paged_memory")
    # 5 + 50 tokens in blocks of 16: 1 + 4 blocks of 2 layers × (k, v) × 4 heads × 8 × 4 bytes, + 5 int32 ids
    assert paged["nbytes"] == 5 * 16 * 2 * 2 * 4 * 8 * 4 + 5 * 4 and paged["tokens_held"] == 55
    assert any(x["type"] == "int8_error" for x in rows)
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_decode_bench_bad_kind_is_one_line():
    r = CliRunner().invoke(main, ["decode-bench", "--kinds", "pages", "--contexts", "16", "--out", "/tmp/unused"])
    assert r.exit_code == 2
    assert "unknown cache kind(s) pages" in r.output
