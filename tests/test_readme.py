"""Every fenced ```python block of README.md runs as written. The README reads as one session
(later blocks use the ``q``, ``k``, ``v`` of the first), so the blocks run in order in one
namespace; the ring-attention block, written for ``torchrun``, runs as a one-rank gloo group."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    # What torchrun would set for a one-rank group.
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    namespace: dict = {"__name__": "readme"}
    torch.manual_seed(0)
    try:
        for line, block in blocks:
            exec(compile(block, f"README.md:{line}", "exec"), namespace)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
