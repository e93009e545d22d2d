"""Benchmark cases shared by ``attnmem compare`` and ``benchmarks/*.py``: one code path."""

from .cases import Case, approx_error, floor_bytes, parse_mask, run_case, time_interleaved
from .rows import Row, environment

__all__ = ["Case", "Row", "approx_error", "environment", "floor_bytes", "parse_mask", "run_case", "time_interleaved"]
