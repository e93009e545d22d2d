"""What every subcommand shares: the consoles, the group that turns a user error into one
line, and the parsers of list, size and method flags (one of each, for every flag)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..memory.units import parse_bytes
from ..method_spec import parse_method_list, parse_method_spec, parse_options

console = Console()
err_console = Console(stderr=True)

MAX_SEQ_LEN = 2**31 - 1  # beyond int32 indexing and any memory; refused before anything runs


def flag_name(param: click.Parameter) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


def int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``"1024,2048"`` -> [1024, 2048]: positive integers, each at most ``MAX_SEQ_LEN``."""
    if value is None:
        return None
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag_name(param)}: expected comma-separated integers, got {value!r}") from None
    if not out or any(x <= 0 for x in out):
        raise ValueError(f"{flag_name(param)}: expected positive integers, got {value!r}")
    if any(x > MAX_SEQ_LEN for x in out):
        raise ValueError(f"{flag_name(param)}: each value must be at most {MAX_SEQ_LEN}, got {value!r}")
    return out


def seq_len(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """A sequence length: 1 ≤ N ≤ ``MAX_SEQ_LEN``."""
    if value is not None and value < 1:
        raise ValueError(f"{flag_name(param)}: seq_len must be an int >= 1, got {value}")
    if value is not None and value > MAX_SEQ_LEN:
        raise ValueError(f"{flag_name(param)}: seq_len must be an int <= {MAX_SEQ_LEN}, got {value}")
    return value


def size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A size flag (``--budget 24GiB``) in bytes, by ``attnmem.memory.units.parse_bytes``."""
    return None if value is None else parse_bytes(value, flag_name(param))


def methods(ctx: click.Context, param: click.Parameter, value: str | None) -> list[tuple[str, dict]] | None:
    """A ``--methods`` list of method specs (``attnmem.method_spec``), each method once."""
    return None if value is None else parse_method_list(value, flag_name(param))


def method(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, dict] | None:
    """One method spec, ``NAME[:KEY=VALUE,...]``."""
    return None if value is None else parse_method_spec(value, flag_name(param))


def options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    """Repeated ``--option KEY=VALUE`` flags as a dict (the spelling ``estimate`` had first)."""
    return parse_options(value, flag_name(param))


class CLIGroup(click.Group):
    """Turns a user error raised inside a command, or while parsing its flags, into one line
    on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            click.echo(f"error: {e.format_message()}".replace("\n", " "), err=True)
            sys.exit(2)
        except BrokenPipeError:
            raise  # the reader went away (``| head``): nothing to tell it
        except (ValueError, TypeError, OSError) as e:
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(2)


def one_line(e: BaseException) -> str:
    """An exception as one line: its first line, and for a file error the file it names."""
    if isinstance(e, OSError) and not isinstance(e, UnicodeError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


HEARTBEAT_S = 20.0  # a line at least this often while a case runs, when stderr is not a terminal


class StepProgress:
    """Progress of a long command, one step (a case, a method) at a time.

    On a terminal: a rich progress bar. Otherwise (a log file, CI): one line when a step
    starts, one when it ends with its outcome, and a "still running" line every
    ``HEARTBEAT_S`` seconds while a step runs, so that ``make run > log 2>&1`` shows life.
    """

    def __init__(self, label: str, total: int | None, *, heartbeat_s: float = HEARTBEAT_S,
                 terminal: bool | None = None) -> None:
        self.label, self.total, self.heartbeat_s = label, total, heartbeat_s
        self.terminal = err_console.is_terminal if terminal is None else terminal
        self.step, self.desc, self.t0 = 0, label, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_line = time.monotonic()
        self._bar: Any = None

    def __enter__(self) -> StepProgress:
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        else:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        else:
            self._stop.set()
            self._thread.join()

    def _line(self, text: str) -> None:
        with self._lock:
            of = f"/{self.total}" if self.total else ""
            print(f"{self.label} [{self.step + 1}{of}] {text}", file=sys.stderr, flush=True)
            self._last_line = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat_s / 4)):
            if time.monotonic() - self._last_line >= self.heartbeat_s:
                self._line(f"{self.desc}: still running ({time.monotonic() - self.t0:.0f} s)")

    def start(self, step: int, desc: str, total: int | None = None) -> None:
        """Step ``step`` (0-based) begins."""
        self.step, self.desc, self.t0 = step, desc, time.monotonic()
        self.total = total or self.total
        if self._bar is not None:
            self._bar.update(self._task, completed=step, total=self.total, description=f"{self.label}: {desc}")
        else:
            self._line(f"{desc} ...")

    def finish(self, outcome: str) -> None:
        """The current step ended with ``outcome`` (one short phrase)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=self.step + 1)
        else:
            self._line(f"{self.desc}: {outcome} ({time.monotonic() - self.t0:.1f} s)")


def writable_dir(path: str, flag: str) -> Path:
    """An output folder that exists and can be written, made if missing.

    Raises:
        ValueError: naming ``flag``, for an empty path or a folder that cannot be made or written.
    """
    if not path or not path.strip():
        raise ValueError(f"{flag}: expected a folder, got an empty path")
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".attnmem-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return out


def writable_file(path: str, flag: str) -> Path:
    """An output file whose folder exists and can be written (checked before the work).

    Raises:
        ValueError: naming ``flag``, for an empty path, a folder, or an unwritable place.
    """
    if not path or not path.strip():
        raise ValueError(f"{flag}: expected a file name, got an empty path")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
    writable_dir(str(target.parent), flag)
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write there (permission denied)")
    return target
