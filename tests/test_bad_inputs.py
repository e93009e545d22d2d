"""A fast subset of ``benchmarks/bad_inputs.py``: bad inputs through the API (each in a forked
child, so a crash is counted, not fatal) and a few through the CLI (subprocesses): no crash,
hang, raw error, silent acceptance or refusal that does not name the argument."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_inputs.py"
spec = importlib.util.spec_from_file_location("bad_inputs", PATH)
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs
spec.loader.exec_module(bad_inputs)

API = bad_inputs.api_cases(quick=True)


@pytest.mark.parametrize("case", API, ids=[c.name for c in API])
def test_api_bad_input(case):
    kind, detail = bad_inputs.run_api(case)
    assert bad_inputs.classify(case, kind, detail) in ("ok", "refused"), (kind, detail)


def test_cli_bad_inputs(tmp_path):
    cases = [c for c in bad_inputs.cli_cases(quick=False, tmp=str(tmp_path))
             if c.name in ("cli compare --mask document:0", "cli estimate --seq-len huge",
                           "cli train --resume empty checkpoint")]
    assert len(cases) == 3
    for case in cases:
        kind, detail = bad_inputs.run_cli(case)
        assert bad_inputs.classify(case, kind, detail) == "refused", (case.name, kind, detail)
