"""The one grammar for naming a method with options, shared by every command and sweep.

A *method spec* is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``::

    chunked
    chunked:q_tile=128,kernel=torch
    sliding_window:window=256
    longformer:window=64,global_tokens=[0,1,2]

A *list* of specs separates specs by ``;`` or by ``,``: an item with ``=`` and no ``:``
continues the options of the spec before it, so ``chunked,sdpa``,
``chunked:q_tile=64,kernel=torch;linear`` and ``chunked:q_tile=64,sdpa`` all read as meant.
Values are JSON or Python literals where they parse as one (``128``, ``0.5``, ``true``/``True``,
``[0, 1]``, ``(1, 2)``, ``null``/``None``), else strings (``kernel=torch``); commas inside
brackets belong to the value.
"""

from __future__ import annotations

import ast
import json
from typing import Any

_OPEN, _CLOSE = "([{", ")]}"


def _split_top(text: str, seps: str) -> list[str]:
    """``text`` split at characters of ``seps`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c in seps and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_value(raw: str) -> Any:
    """``"128"`` -> 128, ``"true"`` -> True, ``"[0,1]"`` -> [0, 1], ``"(1,2)"`` -> [1, 2],
    ``"None"`` -> None, ``"torch"`` -> ``"torch"``."""
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    if text.lower() in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(text.lower())
    return text


def parse_option(item: str, where: str) -> tuple[str, Any]:
    """``"q_tile=128"`` -> ("q_tile", 128).

    Raises:
        ValueError: naming ``where``, for an item without ``KEY=``.
    """
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"{where}: expected key=value, got {item!r}")
    return key.strip(), parse_value(raw)


def parse_options(items: list[str] | tuple[str, ...], where: str) -> dict[str, Any]:
    """``["q_tile=128", "kernel=torch"]`` -> {"q_tile": 128, "kernel": "torch"}; a later key wins."""
    return dict(parse_option(item, where) for item in items if item.strip())


def parse_method_spec(spec: str, where: str = "method") -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, options).

    Raises:
        ValueError: naming ``where``, for an empty name or an option without ``=``.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name or "=" in name:
        raise ValueError(f"{where}: expected name[:key=value,...], got {spec!r}")
    return name, parse_options(_split_top(rest, ","), f"{where} {spec.strip()!r}")


def parse_method_list(text: str, where: str = "--methods", *,
                      distinct: str = "name") -> list[tuple[str, dict[str, Any]]]:
    """``"chunked:q_tile=64,kernel=torch;linear"`` -> [("chunked", {...}), ("linear", {})].

    ``distinct="name"``: each method at most once (compare, plan: rows are keyed by method);
    ``distinct="spec"``: each name-with-options at most once (a training sweep may train
    ``chunked`` and ``chunked:mask_window=32``).

    Raises:
        ValueError: naming ``where``, for an empty list, an item that is neither a spec nor an
            option, or an entry listed twice (its rows would be indistinguishable).
    """
    specs: list[str] = []
    for chunk in _split_top(text, ";"):
        for item in _split_top(chunk, ","):
            if not item.strip():
                continue
            if "=" in item and ":" not in item.split("=", 1)[0] and specs:
                specs[-1] += "," + item  # an option of the spec before
            else:
                specs.append(item)
    if not specs:
        raise ValueError(f"{where}: expected one or more method names, got {text!r}")
    out = [parse_method_spec(s, where) for s in specs]
    names = [name if distinct == "name" else format_method_spec(name, opts) for name, opts in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where}: {', '.join(twice)} listed more than once in {text!r}; list each method once")
    return out


def format_method_spec(name: str, options: dict[str, Any]) -> str:
    """The inverse of ``parse_method_spec``: ``("chunked", {"q_tile": 64})`` -> ``"chunked:q_tile=64"``."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                 for k, v in sorted(options.items()))
