"""``attnmem.bench.decode_quality`` on a tiny untrained MQAR model: the full cache reproduces the
model's own forward, budgets covering the sequence reproduce the full cache, runs repeat exactly."""

from __future__ import annotations

import dataclasses
import json

import torch
from click.testing import CliRunner

from attnmem.bench.decode_quality import QualityConfig, run_quality, summarize
from attnmem.cli import main
from attnmem.training import TrainConfig, build

N = 32


def _tiny_model(path):
    config = TrainConfig(task="mqar", seq_len=N, task_options={"vocab_size": 16, "num_pairs": 4,
                                                               "random_non_queries": False},
                         method="sdpa", d_model=16, n_heads=2, n_layers=1, tie_embeddings=True, steps=1)
    _, model, _, _ = build(config)
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict(), "step": 0}, path)
    return path


Q = QualityConfig(examples=24, budgets=(4, 8, N), residuals=(0, N), group=8, sinks=2, snap_window=2)


def test_quality_rows_check_themselves_and_repeat(tmp_path):
    path = _tiny_model(tmp_path / "m.pt")
    rows = run_quality(path, Q)
    by = {r["name"]: r for r in rows}
    assert by["full"]["forward_disagreements"] == 0 and by["full"]["prompt"] == N // 2
    for name in (f"sink_window{N}", f"heavy_hitter{N}", f"snapkv{N}", f"int4_r{N}", f"int2_r{N}"):
        assert by[name]["correct"] == by["full"]["correct"], name  # nothing evicted or quantised
        assert by[name]["nbytes"] >= by["full"]["nbytes"] * 0.5
    assert by["sink_window4"]["nbytes"] < by["full"]["nbytes"]
    assert [r["correct"] for r in run_quality(path, Q)] == [r["correct"] for r in rows]  # deterministic
    summary = summarize(rows)
    assert summary["smallest_within"]["sink_window"]["budget"] <= N
    assert {v["budget"] for v in summary["snapkv_vs_sink_window"]} == {4, 8, N}


def test_cli_quality_writes_rows_summary_and_plot(tmp_path):
    path = _tiny_model(tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["decode-bench", "--quality", str(path), "--examples", "4", "--prompt", "20",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "decode_quality.jsonl").read_text().splitlines()]
    assert rows[-1]["type"] == "summary" and rows[0]["name"] == "full" and rows[0]["prompt"] == 20
    assert (tmp_path / "out" / "decode_quality.png").stat().st_size > 0
