"""``attnmem train``: a run, a sweep, a batch search and one clear line on bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnmem.cli import main
from attnmem.memory.units import parse_bytes
from attnmem.training import CHECKPOINT, load_checkpoint

TINY = ["--task-option", "num_pairs=2", "--task-option", "vocab_size=16", "--seq-len", "32", "--d-model", "32",
        "--layers", "1", "--batch", "8", "--eval-examples", "16", "--warmup", "1", "--threads", "1", "--no-progress"]


def test_train_writes_metrics_and_resumes(tmp_path):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "2", "--eval-every", "1", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["peak_mib"] > 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "3", "--eval-every", "1", "--out", str(tmp_path),
                                  "--resume"])
    assert r.exit_code == 0, r.output
    assert [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_train_sweep_and_batch_search(tmp_path):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "1", "--sweep", "--methods", "chunked;sdpa",
                                  "--max-batch-under", "2MiB", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["method"] for row in rows] == ["chunked", "sdpa"]
    assert all(row["peak_mib"] <= 2.0 * 1.1 for row in rows)  # the chosen batch fits the budget (±10 % fit)
    assert (tmp_path / "sweep.png").exists()


def test_train_target_accuracy_and_mix(tmp_path):
    # Accuracy 0.01 is reached at the first evaluation (chance on 8 values is 1/8), so the run stops at step 1.
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "50", "--eval-every", "1", "--target-accuracy", "0.01",
                                  "--train-mix", "seq_len=16,num_pairs=1", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == summary["target_step"] == 1 and summary["target_wall_s"] > 0
    assert "target accuracy 0.01 reached at step 1" in " ".join(r.output.split())


def test_stop_at_ends_early_on_the_full_schedule(tmp_path):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "10", "--stop-at", "2", "--eval-every", "1",
                                  "--window-warmup", "4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert load_checkpoint(tmp_path / CHECKPOINT)["config"]["window_warmup"] == 4  # the flag reaches the run


def test_context_warmup_flags_reach_the_run(tmp_path):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "4", "--stop-at", "1", "--positions", "rotary",
                                  "--context-warmup", "2", "--context-start", "16", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    saved = load_checkpoint(tmp_path / CHECKPOINT)["config"]
    assert (saved["context_warmup"], saved["context_start"]) == (2, 16)
    r = CliRunner().invoke(main, ["train", *TINY, "--context-warmup", "2", "--context-start", "16",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "positions='rotary'" in r.output  # sinusoidal positions are refused


@pytest.mark.parametrize("args,word", [
    (["--method", "nope"], "nope"),
    (["--task-option", "pairs=3"], "pairs"),
    (["--task-option", "vocab_size=33"], "vocab_size"),
    (["--methods", "chunked"], "--sweep"),
    (["--sweep"], "--methods"),
    (["--max-batch-under", "lots"], "max-batch-under"),
    (["--max-batch-under", "1KiB"], "batch of 1"),
    (["--method", "chunked:q_tile=-1"], "q_tile"),
    (["--train-mix", "vocab_size=32"], "vocabulary"),
    (["--train-mix", "seq_len"], "--train-mix"),
])
def test_train_bad_options_clear_error(tmp_path, args, word):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "1", "--out", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and word in r.output and "Traceback" not in r.output, r.output


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GiB") == 2**31
    assert parse_bytes("1e9") == 10**9 and parse_bytes("1.5 GB") == 1_500_000_000


def test_train_positions_option_reaches_the_model(tmp_path):
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "1", "--positions", "rotary", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / CHECKPOINT)["config"]["positions"] == "rotary"
    r = CliRunner().invoke(main, ["train", *TINY, "--steps", "1", "--positions", "learned", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "learned" in r.output
