"""Argument checks shared by the sparse patterns (the error names the pattern and argument)."""

from __future__ import annotations


def check_count(fn: str, arg: str, val: object, minimum: int = 0) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{fn}: {arg} must be an int {kind}, got {val!r}")
    return val


def window_sides(fn: str, window: object) -> tuple[int, int]:
    """``(left, right)`` from ``w`` (symmetric) or ``(left, right)``; ValueError otherwise."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{fn}: window must be an int or (left, right), got {window!r}")
        return check_count(fn, "window left", window[0]), check_count(fn, "window right", window[1])
    w = check_count(fn, "window", window)
    return w, w
