"""`attnmem estimate` and `attnmem plan` on the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnmem.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_estimate_prints_the_breakdown_and_json():
    res = run("estimate", "chunked", "--seq-len", "300", "--heads", "2", "--head-dim", "16", "--causal")
    assert res.exit_code == 0, res.output
    assert "saved for backward" in res.output and "peak" in res.output
    res = run("estimate", "sdpa", "--seq-len", "256", "--json")
    data = json.loads(res.stdout)
    assert data["peak_bytes"] == data["inputs_bytes"] + data["saved_bytes"] + data["transient_bytes"]


def test_estimate_passes_method_options():
    res = run("estimate", "chunked", "--seq-len", "512", "--causal", "--how", "formula",
              "--option", "q_tile=128", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["options"] == {"q_tile": 128}


def test_plan_table_json_and_plot(tmp_path):
    png = tmp_path / "peak.png"
    res = run("plan", "--config", "tiny", "--budget", "64MiB", "--methods", "chunked,reference",
              "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert "chunked" in res.output and png.stat().st_size > 1000
    res = run("plan", "--config", "tiny", "--budget", "64MiB", "--methods", "chunked", "--json",
              "--checkpointing", "--seq-len", "512")
    data = json.loads(res.stdout)
    assert data["config"]["checkpointing"] and data["config"]["seq_len"] == 512
    assert data["methods"][0]["max_seq_len"] % 256 == 0


def test_plan_from_a_yaml_file(tmp_path):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("layers: 2\nd_model: 64\nheads: 4\nvocab: 100\nseq_len: 256\n")
    res = run("plan", "--config", str(cfg), "--budget", "1GB", "--methods", "sdpa", "--inference", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"]["training"] is False


@pytest.mark.parametrize("args, message", [
    (["--layers", "2", "--d-model", "100", "--heads", "3", "--budget", "1GB"], "heads=3 does not divide d_model=100"),
    (["--config", "tiny", "--kv-heads", "3", "--budget", "1GB"], "kv_heads=3 does not divide heads=4"),
    (["--config", "tiny", "--layers", "-1", "--budget", "1GB"], "layers must be a positive int"),
    (["--config", "gpt-17", "--budget", "1GB"], "unknown preset or missing file 'gpt-17'"),
    (["--config", "tiny", "--budget", "lots"], "budget must be a size like"),
    (["--config", "tiny", "--budget", "1GB", "--methods", "nope"], "unknown method 'nope'"),
])
def test_bad_plan_input_is_one_line_and_exit_2(args, message):
    res = run("plan", *args)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output


def test_bad_estimate_input_is_one_line_and_exit_2():
    res = run("estimate", "chunked", "--seq-len", "-5")
    assert res.exit_code == 2
    assert "seq_len must be an int >= 1, got -5" in res.output


def test_estimate_takes_a_mask_spec():
    res = run("estimate", "chunked", "--seq-len", "384", "--heads", "2", "--head-dim", "16",
              "--mask", "window:64", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["shape"]["masked"] is True


def test_plan_world_size_table_and_json():
    res = run("plan", "--config", "tiny", "--budget", "1GiB", "--world-size", "4", "--seq-len", "1024")
    assert res.exit_code == 0, res.output
    assert all(s in res.output for s in ("ring", "ulysses", "hybrid", "2×2"))
    res = run("plan", "--config", "tiny", "--budget", "1GiB", "--world-size", "4", "--seq-len", "1024", "--json",
              "--schemes", "ulysses", "--ulysses-heads-per-pass", "1")
    (row,) = json.loads(res.stdout)["schemes"]
    assert row["scheme"] == "ulysses" and row["status"] == "ok" and len(row["sent_bytes_per_step"]) == 4
    res = run("plan", "--config", "tiny", "--budget", "1GiB", "--ulysses", "2")
    assert res.exit_code != 0 and "--ulysses describes a sequence-parallel plan" in res.output
