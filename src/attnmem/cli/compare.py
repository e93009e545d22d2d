"""``attnmem compare``: methods × sequence lengths on this device, written as it goes, then a report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import registry
from ..bench.cases import DTYPES, Case, floor_bytes, parse_mask
from ..bench.report import write_report
from ..bench.sweep import SweepConfig, run_sweep
from ..memory.measure import MiB
from ..memory.units import available_memory
from . import common
from .common import console, err_console


def default_methods() -> list[str]:
    """Methods that run from the functional API with their default options."""
    return [m.name for m in registry.methods() if not m.stateful]


@click.command("compare")
@click.option("--methods", "methods_", default=None, callback=common.methods,
              help="Method specs, NAME[:KEY=VALUE,...], separated by ',' or ';' (default: all).")
@click.option("--seq-lens", default="1024,2048,4096,8192,16384", callback=common.int_list,
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
@click.option("--budget", default=None, callback=common.size,
              help="Memory budget, e.g. 8GiB, 8G, 8.6GB or 8e9 (default: half the free memory).")
@click.option("--repeats", default=3, type=click.IntRange(min=0),
              help="Timed repeats per case, after the tracked run that warms them up (median).")
@click.option("--repeat-budget", default=1.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Seconds of timed repeats per case: a slow case stops after fewer repeats (at least one).")
@click.option("--out", "out_dir", default="report", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue OUT/results.jsonl: finished cases are not redone.")
def compare_cmd(methods_, seq_lens, batch, heads, kv_heads, head_dim, dtype, device, causal, mask_spec,
                forward_only, budget, repeats, repeat_budget, out_dir, resume) -> None:
    """Sweep methods × sequence lengths: peak memory, peak/floor, time and error per case.

    Cases predicted above the budget are recorded as over budget (the memory wall) instead of
    run; failures are recorded and the sweep goes on. Every finished case is appended to
    OUT/results.jsonl at once; the report (OUT/report.md and PNG plots) is written at the end.
    """
    import torch

    specs = methods_ or [(name, {}) for name in default_methods()]
    names = [name for name, _ in specs]
    for name, opts in specs:
        if registry.get(name).stateful:  # unknown names fail here too, before anything runs
            raise ValueError(f"--methods: {name!r} has learned state; compare runs functional methods only")
        registry.get(name).make_options(opts)  # an unknown or bad option fails before anything runs
    parse_mask(mask_spec, 1)  # so does a bad mask spec
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    budget_bytes = budget
    if budget_bytes is None:
        budget_bytes = (torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory()) // 2
    cfg = SweepConfig(methods=names, seq_lens=seq_lens, batch=batch, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype=dtype, device=device, causal=causal, mask=mask_spec,
                      forward_only=forward_only, repeats=repeats, time_budget_s=repeat_budget,
                      budget_bytes=budget_bytes, options={name: opts for name, opts in specs if opts})
    out = Path(out_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("compare", total=len(seq_lens) * len(names))

        def on_case(case, i, total):
            progress.update(task, completed=i, description=f"{case.method} N={case.seq_len}")

        rows = run_sweep(cfg, out / "results.jsonl", resume=resume, on_case=on_case)
        progress.update(task, completed=len(rows))
    console.print(summary_table(rows))
    report = write_report(rows, out, budget_bytes)
    console.print(f"results: {out / 'results.jsonl'}\nreport: {report}")


def summary_table(rows: list[dict]) -> Table:
    table = Table(title="attnmem compare")
    for col in ("method", "N", "peak MiB", "peak/floor", "time s", "error", "status"):
        table.add_column(col, justify="right" if col not in ("method", "status") else "left")
    for r in rows:
        if r.get("status") == "ok":
            err = r.get("approx_error")
            table.add_row(r["method"], str(r["seq_len"]), f"{r['peak_mib']:.1f}", f"{r['peak_over_floor']:.2f}",
                          f"{r['time_s']:.3f}", "" if err is None else f"{err:.2g}", "ok")
        else:
            floor = floor_bytes(Case(**{k: r[k] for k in Case.__dataclass_fields__}))
            table.add_row(r["method"], str(r["seq_len"]), "-", "-", "-", "",
                          f"{r.get('status')}: {r.get('reason', '')}"[:70] + f" (floor {floor / MiB:.0f} MiB)")
    return table
