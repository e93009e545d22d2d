"""Argument checks shared by the sparse patterns (the error names the pattern and argument)."""

from __future__ import annotations

from ..checks import check_count


def window_sides(fn: str, window: object) -> tuple[int, int]:
    """``(left, right)`` from ``w`` (symmetric) or ``(left, right)``; ValueError otherwise."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{fn}: window must be an int or (left, right), got {window!r}")
        return check_count(fn, "window left", window[0]), check_count(fn, "window right", window[1])
    w = check_count(fn, "window", window)
    return w, w
