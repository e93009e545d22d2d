"""Byte quantities as people write them: ``24GiB``, ``80GB``, ``512 MiB``, ``24G``, ``1e9``.

The one parser behind every flag and argument that takes a size (``compare --budget``,
``plan --budget``, ``train --max-batch-under``, ``attnmem.plan(cfg, budget)``):

- decimal units are powers of 10: ``kB``/``KB`` = 10**3, ``MB`` = 10**6, ``GB`` = 10**9,
  ``TB`` = 10**12;
- binary units are powers of 2: ``KiB`` = 2**10, ``MiB`` = 2**20, ``GiB`` = 2**30, ``TiB`` = 2**40;
- a bare letter (``K``, ``M``, ``G``, ``T``) is binary, as in ``free -g``/``ls -h`` and as attnmem
  reports sizes (MiB/GiB): ``24G`` = ``24GiB``;
- a plain number (``1e9``, ``1000``, ``1.5e9``) is bytes. Case does not matter.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")
MAX_BYTES = 2**62  # far above any memory; keeps every later product of sizes inside int64


def parse_bytes(text: str | int | float, arg: str = "budget") -> int:
    """``"24GiB"`` -> 25769803776; see the module docstring for the units.

    Raises:
        ValueError: naming ``arg``, for anything that is not a positive, finite size of at most
            2**62 bytes (a bool, a negative or zero size, an unknown unit, ``inf``, ``nan``).
    """
    expected = "a size like 24GiB, 24G, 80GB, 512MiB or 1e9 (bytes)"
    if isinstance(text, bool):
        raise ValueError(f"{arg} must be {expected}, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        m = _SIZE.fullmatch(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{arg} must be {expected}, got {text!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{arg} must be {expected}, got {type(text).__name__} {text!r}")
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{arg} must be at least one byte, got {text!r}")
    if value > MAX_BYTES:
        raise ValueError(f"{arg} must be at most 2**62 bytes, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int:
    """Bytes of memory available to a new allocation on this machine (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
