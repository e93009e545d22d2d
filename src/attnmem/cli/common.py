"""What every subcommand shares: the consoles, the group that turns a user error into one
line, and the parsers of list, size and method flags (one of each, for every flag)."""

from __future__ import annotations

import sys
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
