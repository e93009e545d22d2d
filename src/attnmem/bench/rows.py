"""A row of ``attnmem compare``: one case's outcome, typed, built in one place.

A row is written as one JSON object per line of ``results.jsonl`` (``as_dict``) and read
back with ``Row.from_dict``; the report reads the same fields. ``status`` is one of
``STATUSES``: ``ok`` (measured), ``over budget`` (predicted above the budget, not run),
``not supported`` (the method says it cannot run the case), ``error`` (it failed at run time).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ..version import __version__

if TYPE_CHECKING:
    from .cases import Case

STATUSES = ("ok", "over budget", "not supported", "error")


def environment() -> dict[str, Any]:
    """Where a row was measured: versions, machine, threads."""
    return {
        "attnmem": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


@dataclass
class Row:
    """One case's outcome; the case's own fields first, then where and how it was measured."""

    key: str
    method: str
    seq_len: int
    batch: int
    heads: int
    head_dim: int
    kv_heads: int | None
    dtype: str
    device: str
    causal: bool
    mask: str
    forward_only: bool
    options: dict[str, Any]
    status: str
    score_mod: str = "none"
    reason: str = ""
    family: str = ""
    exact: bool = False
    floor_bytes: int = 0
    # environment(): where it ran
    attnmem: str = ""
    torch: str = ""
    python: str = ""
    machine: str = ""
    cpu_threads: int = 0
    processor: str = ""
    # the prediction that decided whether to run it, under this budget
    predicted_bytes: int | None = None
    prediction: str = ""
    budget_bytes: int = 0
    # measured (status ok)
    peak_bytes: int | None = None
    peak_mib: float | None = None
    peak_over_floor: float | None = None
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    approx_error: float | None = None
    approx_error_peaked: float | None = None
    traceback: str = ""

    @classmethod
    def of(cls, case: Case, status: str, **values: Any) -> Row:
        """The row of ``case`` with ``status``: case fields, environment and floor filled in."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return cls(key=case.key(), **asdict(case), **environment(), floor_bytes=case.floor_bytes(),
                   status=status, **values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """A row read back from ``results.jsonl``; fields it lacks (older files) get defaults,
        fields this version does not know are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this row; fields that do not apply to its status are left out."""
        out = asdict(self)
        if self.status != "ok":
            for name in ("peak_bytes", "peak_mib", "peak_over_floor", "time_s", "times_s",
                         "approx_error", "approx_error_peaked"):
                out.pop(name)
        if not self.traceback:
            out.pop("traceback")
        return out

    def __getitem__(self, name: str) -> Any:
        """``row["peak_bytes"]``, as the JSON object reads (for code written against dicts)."""
        return self.as_dict()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.as_dict().get(name, default)
