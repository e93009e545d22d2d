"""Offline long-range tasks: seeded generators, no downloads.

``make_task(name, seq_len=..., **options)`` builds one of ``TASKS``; ``task.sample(n, generator)``
draws a batch of inputs and labels. Training on them lives in ``attnmem.training``.
"""

from __future__ import annotations

from typing import Any

from .listops import ListOps
from .mqar import IGNORE, MQAR
from .selective_copy import SelectiveCopy
from .text import TextLM

TASKS = {"mqar": MQAR, "listops": ListOps, "selective_copy": SelectiveCopy, "text": TextLM}


def make_task(name: str, *, seq_len: int | None = None, **options: Any):
    """Build a task by name; ``seq_len`` maps to ListOps' ``max_length``.

    Raises:
        ValueError: an unknown task name or option, or an option out of range.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    cls = TASKS[name]
    if seq_len is not None:
        options["max_length" if cls is ListOps else "seq_len"] = seq_len
    fields = cls.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(fields)}")
    return cls(**options)


__all__ = ["TASKS", "IGNORE", "MQAR", "ListOps", "SelectiveCopy", "TextLM", "make_task"]
