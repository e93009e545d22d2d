"""Argument checks shared across the package; each error names the argument, what was received
and what was expected.

``bool`` is an ``int`` to Python, but ``window=True`` is a mistake, not a window of 1: every
check here refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable


def check_positive_int(name: str, val: object, *, allow_none: bool = False, where: str = "") -> None:
    """ValueError unless ``val`` is an int > 0 (or None, with ``allow_none``).

    ``where`` prefixes the message (``"mqar: seq_len must be ..."``) for checks whose caller is
    not plain from the argument's name.
    """
    if allow_none and val is None:
        return
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be a positive int{' or None' if allow_none else ''}, got {val!r}")


def check_positive_fields(obj: object, names: Iterable[str], *, where: str = "") -> None:
    """``check_positive_int`` on each attribute of ``obj`` in ``names``, in order (an options
    dataclass's ``__post_init__``)."""
    for name in names:
        check_positive_int(name, getattr(obj, name), where=where)


def check_count(fn: str, arg: str, val: object, minimum: int = 0) -> int:
    """``val`` if it is an int >= ``minimum`` (a count, a block size, a seed); ValueError naming
    ``fn`` and ``arg`` otherwise."""
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{fn}: {arg} must be an int {kind}, got {val!r}")
    return val
