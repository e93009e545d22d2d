"""Checkpoints carry a checksum: a flipped bit, an empty or foreign file is refused, clearly."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from attnmem.cli import main
from attnmem.training import CHECKPOINT, TrainConfig, fit, load_checkpoint, save_atomic

TINY = dict(task="mqar", task_options={"num_pairs": 2, "vocab_size": 16}, seq_len=32, d_model=32, n_heads=2,
            n_layers=1, batch_size=4, eval_examples=8, warmup_steps=1, eval_every=1, checkpoint_every=1)
CLI_TINY = ["--task-option", "num_pairs=2", "--task-option", "vocab_size=16", "--seq-len", "32", "--d-model", "32",
            "--layers", "1", "--batch", "4", "--eval-examples", "8", "--warmup", "1", "--threads", "1",
            "--no-progress", "--steps", "2"]


def _one_error_line(r, *words):
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], r.output


def test_round_trip_and_a_flipped_bit(tmp_path):
    path = tmp_path / "c.pt"
    weight = torch.randn(64, 64)
    save_atomic({"w": weight, "step": 3}, path)
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["w"], weight)
    data = bytearray(path.read_bytes())
    for position in (len(data) // 2, len(data) - 100):  # inside the weight; in the zip's directory
        flipped = bytearray(data)
        flipped[position] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="corrupt"):
            load_checkpoint(path)


@pytest.mark.parametrize("content, word", [(b"", "empty"), (b"garbage, not a checkpoint", "not an attnmem checkpoint"),
                                           (None, "not an attnmem checkpoint")])
def test_foreign_files_are_refused(tmp_path, content, word):
    path = tmp_path / "c.pt"
    if content is None:  # a plain torch.save file: written before checksums, or by someone else
        torch.save({"step": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=word):
        load_checkpoint(path)


def test_fit_refuses_a_corrupted_checkpoint_and_a_missing_one(tmp_path):
    fit(TrainConfig(**TINY, steps=2, out_dir=str(tmp_path)))
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        fit(TrainConfig(**TINY, steps=3, out_dir=str(tmp_path)), resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        fit(TrainConfig(**TINY, steps=3, out_dir=str(tmp_path / "fresh")), resume=True)


@pytest.mark.parametrize("damage, word", [("empty", "empty"), ("flip", "corrupt"), ("garbage", "not an attnmem")])
def test_train_resume_on_a_bad_checkpoint_is_one_line(tmp_path, damage, word):
    r = CliRunner().invoke(main, ["train", *CLI_TINY, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = bytearray(b"\x00\x01 not a checkpoint")
    path.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["train", *CLI_TINY, "--out", str(tmp_path), "--resume"])
    _one_error_line(r, word, str(path))


def test_train_resume_without_a_checkpoint_is_one_line(tmp_path):
    _one_error_line(CliRunner().invoke(main, ["train", *CLI_TINY, "--out", str(tmp_path), "--resume"]),
                    "no checkpoint")
    _one_error_line(CliRunner().invoke(main, ["train", *CLI_TINY, "--sweep", "--methods", "chunked;sdpa",
                                              "--out", str(tmp_path / "s"), "--resume"]), "no checkpoint")


@pytest.mark.parametrize("command", [
    ["train", *CLI_TINY, "--out"],
    ["decode-bench", "--contexts", "8", "--d-model", "16", "--heads", "2", "--layers", "1", "--rounds", "1",
     "--steps", "1", "--no-int8-error", "--out"],
    ["plan", "--config", "tiny", "--budget", "1GB", "--methods", "chunked", "--plot"],
])
def test_unwritable_outputs_are_one_line(tmp_path, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    flag = "--plot" if command[-1] == "--plot" else "--out"
    _one_error_line(CliRunner().invoke(main, [*command, str(blocker / "sub" / "x.png")]), flag, "cannot write")
    _one_error_line(CliRunner().invoke(main, [*command, ""]), flag, "empty")
