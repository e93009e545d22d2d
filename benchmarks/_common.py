"""Helpers for the benchmark scripts: run cases, append rows as they finish, print a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Write one finished row at once, so an interrupted run loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def results_args(doc: str, out: Path, quick_help: str) -> argparse.Namespace:
    """The arguments the results-file benchmarks share: ``--quick``, ``--out``, ``--table-only``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--table-only", action="store_true", help="re-print the tables of an existing results file")
    return ap.parse_args()
