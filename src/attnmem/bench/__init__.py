"""Benchmark cases shared by ``attnmem compare`` and ``benchmarks/*.py``: one code path."""

from .cases import Case, approx_error, environment, floor_bytes, parse_mask, run_case, time_interleaved

__all__ = ["Case", "approx_error", "environment", "floor_bytes", "parse_mask", "run_case", "time_interleaved"]
