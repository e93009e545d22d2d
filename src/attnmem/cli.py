"""The ``attnmem`` command line: methods, compare (and the subcommands later issues add)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import registry
from .bench.cases import DTYPES, Case, floor_bytes, parse_mask, run_case
from .memory.measure import MiB

console = Console()
err_console = Console(stderr=True)


def _int_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(x <= 0 for x in out):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


class CLIGroup(click.Group):
    """Turns a user error raised inside a command into one clear line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, TypeError) as e:
            err_console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
            sys.exit(2)


@click.group(cls=CLIGroup)
@click.version_option(package_name="attnmem")
def main() -> None:
    """See, remove and compare the memory bottleneck of softmax attention."""


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def methods_cmd(as_json: bool) -> None:
    """List every registered attention method with its family and memory cost."""
    infos = registry.methods()
    if as_json:
        click.echo(json.dumps([{
            "name": m.name, "family": m.family, "exact": m.exact, "memory": m.memory,
            "summary": m.summary, "options": list(m.options), "stateful": m.stateful,
            "supports": {"causal": m.supports.causal, "mask": m.supports.mask,
                         "backward": m.supports.backward, "gqa": m.supports.gqa,
                         "devices": list(m.supports.devices)},
        } for m in infos], indent=2))
        return
    table = Table(title="attnmem methods")
    for col in ("name", "family", "exact", "causal", "mask", "backward", "gqa", "memory", "options"):
        table.add_column(col, overflow="fold")
    yes = {True: "✓", False: "·"}
    for m in infos:
        s = m.supports
        table.add_row(m.name, m.family, yes[m.exact], yes[s.causal], yes[s.mask], yes[s.backward],
                      yes[s.gqa], m.memory, ", ".join(m.options))
    console.print(table)


def default_methods() -> list[str]:
    """Methods that run from the functional API with their default options."""
    return [m.name for m in registry.methods() if not m.stateful]


@main.command("compare")
@click.option("--methods", "methods_", default=None, help="Comma-separated method names (default: all).")
@click.option("--seq-lens", default="1024,2048,4096,8192,16384", callback=_int_list,
              help="Comma-separated sequence lengths.")
@click.option("--batch", default=1, type=click.IntRange(min=1))
@click.option("--heads", default=8, type=click.IntRange(min=1))
@click.option("--kv-heads", default=None, type=click.IntRange(min=1))
@click.option("--head-dim", default=64, type=click.IntRange(min=1))
@click.option("--dtype", default="float32", type=click.Choice(sorted(DTYPES)))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--causal", is_flag=True, help="Causal attention.")
@click.option("--mask", "mask_spec", default="none",
              help="none, causal, window:L[:R], dense_window:L, document:LEN, random_blocks:KEEP[:BLOCK].")
@click.option("--forward-only", is_flag=True, help="Measure the forward pass only (inference).")
@click.option("--repeats", default=2, type=click.IntRange(min=0), help="Timed repeats per case (median).")
@click.option("--out", "out_dir", default="report", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True, help="Skip cases already in OUT/results.jsonl.")
def compare_cmd(methods_, seq_lens, batch, heads, kv_heads, head_dim, dtype, device, causal, mask_spec,
                forward_only, repeats, out_dir, resume) -> None:
    """Sweep methods × sequence lengths; print peak memory, peak/floor and time per case."""
    names = [m.strip() for m in methods_.split(",")] if methods_ else default_methods()
    for name in names:
        registry.get(name)  # unknown names fail before anything runs
    parse_mask(mask_spec, 1)  # so does a bad mask spec
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done: dict[str, dict] = {}
    if resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            done[row["key"]] = row
    elif results_path.exists():
        results_path.unlink()
    cases = [Case(method=n, seq_len=s, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  dtype=dtype, device=device, causal=causal, mask=mask_spec, forward_only=forward_only)
             for s in seq_lens for n in names]
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("compare", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.method} N={case.seq_len}")
            if case.key() in done:
                rows.append(done[case.key()])
            else:
                row = run_case(case, repeats=repeats)
                rows.append(row)
                with results_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            progress.advance(task)
    console.print(summary_table(rows))
    console.print(f"results: {results_path}")


def summary_table(rows: list[dict]) -> Table:
    table = Table(title="attnmem compare")
    for col in ("method", "N", "peak MiB", "peak/floor", "time s", "status"):
        table.add_column(col, justify="right" if col not in ("method", "status") else "left")
    for r in rows:
        if r.get("status") == "ok":
            table.add_row(r["method"], str(r["seq_len"]), f"{r['peak_mib']:.1f}", f"{r['peak_over_floor']:.2f}",
                          f"{r['time_s']:.3f}", "ok")
        else:
            floor = floor_bytes(Case(**{k: r[k] for k in Case.__dataclass_fields__}))
            table.add_row(r["method"], str(r["seq_len"]), "-", "-", "-",
                          f"{r.get('status')}: {r.get('reason', '')}"[:80] + f" (floor {floor / MiB:.0f} MiB)")
    return table


from .cli_train import train_cmd  # noqa: E402  (a plain command, so `python -m attnmem.cli` sees it too)

main.add_command(train_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
