"""Adding a method takes its module and its tests, nothing else: shown with a toy method.

``ToyWindow`` below is a whole method, defined in this file only: a symmetric sliding window
run by the tiled kernel. Registered at test time (``registry.registered``), it must appear in
``attnmem.methods()``, run through ``attnmem.attention``, be measured by ``attnmem compare``,
estimated by ``attnmem.estimate`` and planned by ``attnmem.plan``, and get the registry-
generated checks of tests/test_registry_matrix.py; afterwards it is gone again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

import attnmem
from attnmem import masks as M
from attnmem import registry
from attnmem.cli import main
from attnmem.kernels import tiled_attention
from attnmem.registry import Capabilities, Inputs, Method

from . import test_registry_matrix as matrix
from .conftest import rand_qkv


@dataclass(frozen=True)
class ToyOptions:
    """window: keys each side of the (aligned) query (non-negative int, default 4)."""

    window: int = 4

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"window must be a non-negative int, got {self.window!r}")


class ToyWindow(Method):
    name = "toy_window"
    family = "toy"
    exact = True  # exact under its own pattern (effective_mask)
    memory = "O(B·H·N·D); O(N·w) scores, a tile at a time"
    summary = "a test-time toy: symmetric sliding window over the tiled kernel"
    caps = Capabilities()
    Options = ToyOptions
    check_options = {"window": 5}

    def effective_mask(self, inp: Inputs, opts: ToyOptions) -> M.Mask:
        pattern = M.sliding_window(opts.window, opts.window)
        return pattern if inp.mask is None else inp.mask & pattern

    def forward(self, inp: Inputs, opts: ToyOptions):
        return tiled_attention(inp.q, inp.k, inp.v, mask=self.effective_mask(inp, opts), scale=inp.scale,
                               q_tile=16, kv_tile=16)


@pytest.fixture
def toy():
    with registry.registered(ToyWindow) as method:
        yield method
    assert "toy_window" not in registry.names()


def test_listed_and_callable(toy):
    info = {m.name: m for m in attnmem.methods()}["toy_window"]
    assert (info.family, info.exact, info.options) == ("toy", True, ("window",))
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16)
    out = attnmem.attention(q, k, v, method="toy_window", window=3)
    want = attnmem.attention(q, k, v, method="reference", mask=M.sliding_window(3, 3))
    assert (out - want).abs().max().item() < 1e-12


def test_generated_checks_pick_it_up(toy):
    """The matrix generator, run while the toy is registered, gives it cases; they pass (runs
    against its definition, refusals with reasons)."""
    runs, refusals = matrix.generate()
    mine = [p.values[0] for p in runs if p.values[0].method == "toy_window"]
    refused = [p.values[0] for p in refusals if p.values[0].method == "toy_window"]
    assert len(mine) + len(refused) == len(matrix.SHAPES) * len(matrix.CALLS)
    assert mine, "the toy runs every case; none may be counted on refusals alone"
    for case in mine:
        matrix.test_runs(case)
    for case in refused:
        matrix.test_refuses(case)


def test_generated_checks_catch_a_wrong_toy(toy, monkeypatch):
    """The generated run check fails when the method computes something else than it declares:
    here its forward uses a window one wider than its options say."""
    forward = ToyWindow.forward
    monkeypatch.setattr(ToyWindow, "forward", lambda self, inp, opts: forward(self, inp, ToyOptions(opts.window + 1)))
    case = next(p.values[0] for p in matrix.generate()[0] if p.values[0].method == "toy_window")
    with pytest.raises(AssertionError, match="against the definition"):
        matrix.test_runs(case)


def test_estimate_and_plan(toy):
    """No closed form is written for the toy: the estimate traces it, and plan searches over
    that estimate like any other method."""
    est = attnmem.estimate("toy_window", batch=1, heads=2, seq_len=256, head_dim=16, window=8)
    q, k, v = rand_qkv(1, 2, 2, 256, 256, 16, dtype=torch.float32)

    def step(q, k, v):
        attnmem.attention(q, k, v, method="toy_window", window=8).sum().backward()

    measured = attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes
    # tests/memory/test_estimate.py holds every registered method's trace to 5 % of measure.
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est, measured)
    # A one-layer model and a short search keep this to a few traces.
    config = dict(layers=1, d_model=32, heads=2, vocab=64, seq_len=64)
    row, = attnmem.plan(config, "64MiB", methods=["toy_window"], max_seq_len=256, max_batch=2)
    assert (row["method"], row["status"], row["fits"]) == ("toy_window", "ok", True), row
    assert row["parts"]["attention"] > 0 and row["max_seq_len"] == 256, row


def test_compare_cli_measures_it(toy, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["compare", "--methods", "toy_window,chunked", "--seq-lens", "64",
                                       "--heads", "2", "--head-dim", "16", "--repeats", "0", "--no-plots",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    toy_rows = [r for r in rows if r["method"] == "toy_window"]
    assert toy_rows and all(r["status"] == "ok" for r in toy_rows), toy_rows
