"""``attnmem compare``: methods × sequence lengths on this device, written as it goes, then a report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .. import registry
from ..bench.cases import DTYPES, SCORE_MOD_SPECS, parse_mask, parse_score_mod
from ..bench.report import write_report
from ..bench.rows import Row
from ..bench.sweep import SweepConfig, run_sweep
from ..memory.measure import MiB
from ..memory.units import available_memory
from . import common
from .common import console

# The cached quality results committed with the repository (benchmarks/quality.py --preset reduced).
DEFAULT_QUALITY = Path("benchmarks/results/quality/reduced.jsonl")


def default_methods(*, score_mod: bool = False) -> list[str]:
    """Methods that run from the functional API with their default options (and, with
    ``score_mod``, honour a score_mod)."""
    return [m.name for m in registry.methods() if not m.stateful and (m.supports.score_mod or not score_mod)]


def check_score_mod_spec(spec: str, heads: int) -> None:
    """A bad ``--score-mod`` fails here, before anything runs."""
    try:
        parse_score_mod(spec, heads)
    except ValueError as e:
        raise ValueError(f"--score-mod: {e}") from None


def refuse_without_score_mod(names: list[str], spec: str) -> None:
    """A listed method that cannot honour a score_mod is an error, never a run without it."""
    cannot = [name for name in names if not registry.get(name).caps.score_mod]
    if cannot:
        able = ", ".join(default_methods(score_mod=True))
        raise ValueError(f"--score-mod {spec}: {', '.join(cannot)} cannot apply a score_mod; methods that can: {able}")


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
@click.option("--score-mod", "score_mod", default="none", show_default=True,
              help=f"A built-in score modification for every method: {SCORE_MOD_SPECS}. Without --methods, "
                   "only the methods that honour a score_mod run; a listed method that cannot is an error.")
@click.option("--forward-only", is_flag=True, help="Measure the forward pass only (inference).")
@click.option("--budget", default=None, callback=common.size,
              help="Memory budget, e.g. 8GiB, 8G, 8.6GB or 8e9 (default: half the free memory).")
@click.option("--repeats", default=3, type=click.IntRange(min=0),
              help="Timed repeats per case, after the tracked run that warms them up (median).")
@click.option("--repeat-budget", default=1.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Seconds of timed repeats per case: a slow case stops after fewer repeats (at least one).")
@click.option("--out", "out_dir", default="report", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--resume", is_flag=True,
              help="Continue OUT/results.jsonl: finished cases are kept unless their conditions changed "
                   "(attnmem or torch version, a budget decision this --budget reverses).")
@click.option("--retry-failed", is_flag=True, help="With --resume: run the cases that failed again.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/results.jsonl.")
@click.option("--quality", "quality", default="auto", show_default=True,
              help="Cached training results (benchmarks/quality.py) for the report's quality-against-memory "
                   f"section; 'auto' reads {DEFAULT_QUALITY} when it exists, 'none' leaves the section out.")
@click.option("--no-plots", is_flag=True, help="Write report.md with its tables only, no PNG plots (drawing "
                                                "them takes a few seconds).")
def compare_cmd(methods_, seq_lens, batch, heads, kv_heads, head_dim, dtype, device, causal, mask_spec,
                score_mod, forward_only, budget, repeats, repeat_budget, out_dir, resume, retry_failed, overwrite,
                quality, no_plots) -> None:
    """Sweep methods × sequence lengths: peak memory, peak/floor, time and error per case.

    Cases predicted above the budget are recorded as over budget (the memory wall) instead of
    run; failures are recorded and the sweep goes on. Every finished case is appended to
    OUT/results.jsonl at once; the report (OUT/report.md and PNG plots) is written at the end.
    An existing OUT/results.jsonl is continued with --resume or replaced with --overwrite.
    """
    import torch

    check_score_mod_spec(score_mod, heads)
    specs = methods_ or [(name, {}) for name in default_methods(score_mod=score_mod != "none")]
    if score_mod != "none":
        refuse_without_score_mod([name for name, _ in specs], score_mod)
    names = [name for name, _ in specs]
    for name, opts in specs:
        if registry.get(name).stateful:  # unknown names fail here too, before anything runs
            raise ValueError(f"--methods: {name!r} has learned state; compare runs functional methods only")
        registry.get(name).make_options(opts)  # an unknown or bad option fails before anything runs
    check_mask_spec(mask_spec)
    quality_path = quality_file(quality)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    out = common.writable_dir(out_dir, "--out")
    budget_bytes = budget
    if budget_bytes is None:
        budget_bytes = (torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory()) // 2
    cfg = SweepConfig(methods=names, seq_lens=seq_lens, batch=batch, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype=dtype, device=device, causal=causal, mask=mask_spec,
                      forward_only=forward_only, repeats=repeats, time_budget_s=repeat_budget,
                      budget_bytes=budget_bytes, options={name: opts for name, opts in specs if opts},
                      score_mod=score_mod)
    with common.StepProgress("compare", len(seq_lens) * len(names)) as progress:
        def on_case(case, i, total):
            progress.start(i, f"{case.method} N={case.seq_len}", total)

        def on_row(row):
            progress.finish(outcome(row))

        rows = run_sweep(cfg, out / "results.jsonl", resume=resume, overwrite=overwrite,
                         retry_failed=retry_failed, on_case=on_case, on_row=on_row)
    console.print(summary_table(rows))
    report = write_report(rows, out, budget_bytes, quality=quality_path, plots=not no_plots)
    console.print(f"results: {out / 'results.jsonl'}\nreport: {report}")


def quality_file(spec: str) -> Path | None:
    """``--quality``: a path, ``auto`` (the committed cache, when run from the repository) or ``none``.

    Raises:
        ValueError: a path that does not exist.
    """
    if spec == "none":
        return None
    if spec == "auto":
        return DEFAULT_QUALITY if DEFAULT_QUALITY.exists() else None
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--quality: {spec!r} is not a file; expected a JSONL of benchmarks/quality.py, "
                         "'auto' or 'none'")
    return path


def check_mask_spec(spec: str) -> None:
    """A bad ``--mask`` fails here, before anything runs (the spec is parsed at N = 1; what
    depends on N is checked per case)."""
    try:
        parse_mask(spec, 1)
    except ValueError as e:
        raise ValueError(f"--mask: {e}") from None


def outcome(row: Row) -> str:
    """A row in a few words, for a progress line."""
    if row.status == "ok":
        return f"ok, peak {row.peak_mib:.1f} MiB, {row.time_s:.3f} s"
    return f"{row.status}: {row.reason[:80]}"


def summary_table(rows: list[Row]) -> Table:
    mods = sorted({r.score_mod for r in rows if r.score_mod != "none"})
    table = Table(title="attnmem compare" + (f", score_mod {', '.join(mods)}" if mods else ""))
    for col in ("method", "N", "peak MiB", "peak/floor", "time s", "error", "status"):
        table.add_column(col, justify="right" if col not in ("method", "status") else "left")
    for r in rows:
        method = r.method if r.score_mod == "none" else f"{r.method} ({r.score_mod})"
        if r.status == "ok":
            err = r.approx_error
            table.add_row(method, str(r.seq_len), f"{r.peak_mib:.1f}", f"{r.peak_over_floor:.2f}",
                          f"{r.time_s:.3f}", "" if err is None else f"{err:.2g}", "ok")
        else:
            table.add_row(method, str(r.seq_len), "-", "-", "-", "",
                          f"{r.status}: {r.reason}"[:70] + f" (floor {r.floor_bytes / MiB:.0f} MiB)")
    return table
