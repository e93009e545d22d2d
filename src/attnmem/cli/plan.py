"""``attnmem plan``: which methods fit a transformer in a memory budget, before anything runs."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
from rich.console import Console
from rich.table import Table

from .. import registry
from ..memory.estimate import DTYPES
from ..memory.measure import GiB
from ..memory.plan import PRESETS, load_config, plan, plot
from . import common
from .common import console


def plan_specs(cfg, limit: int, specs: list[tuple[str, dict]] | None, on_method) -> list[dict]:
    """``plan`` over method specs, in their order: a method with its own options is planned
    with them (added to the config's), the rest together."""
    if not specs:
        return plan(cfg, limit, on_method=on_method)
    rows = []
    for i, (name, opts) in enumerate(specs):
        on_method(name, i, len(specs))
        rows += plan(cfg.replace(options={**cfg.options, **opts}), limit, methods=[name])
    return rows


def fit_table(title: str, first: str, rows: list[dict], peak_gib: Callable[[dict], float]) -> Table:
    """One row per planned method (column ``first`` names it): its peak, whether it fits, and the
    longest sequence and largest batch that do; a refused method shows why."""
    table = Table(title=title)
    for col in (first, "peak GiB", "fits", "max seq len", "max batch"):
        table.add_column(col, justify="left" if col == first else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["method"], "-", "-", "-", r["reason"][:60])
            continue
        table.add_row(r["method"], f"{peak_gib(r):.2f}", "yes" if r["fits"] else "no",
                      str(r["max_seq_len"] or "none fits"), str(r["max_batch"] or "none fits"))
    return table


@click.command("plan")
@click.option("--config", "config_src", default=None,
              help=f"Preset ({', '.join(PRESETS)}) or a YAML/JSON file.")
@click.option("--hf-config", "hf_config", default=None, type=click.Path(),
              help="A Hugging Face config.json (or its directory): plan that model's training step "
                   "with eager, sdpa and attnmem (needs attnmem[hf]).")
@click.option("--budget", required=True, callback=common.size,
              help="Memory budget, e.g. 24GiB, 24G, 80GB or 8e10.")
@click.option("--layers", type=int)
@click.option("--d-model", type=int)
@click.option("--heads", type=int)
@click.option("--kv-heads", type=int)
@click.option("--ffn-mult", type=int)
@click.option("--vocab", type=int)
@click.option("--seq-len", type=int, callback=common.seq_len)
@click.option("--batch", type=int)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)))
@click.option("--inference", is_flag=True, help="Prefill into a KV cache instead of an AdamW training step.")
@click.option("--checkpointing", is_flag=True, help="Activation checkpointing of every block.")
@click.option("--methods", "methods_", default=None, callback=common.methods,
              help="Method specs, NAME[:KEY=VALUE,...], separated by ',' or ';' (default: all).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG of peak memory against sequence length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(config_src, hf_config, budget, layers, d_model, heads, kv_heads, ffn_mult, vocab, seq_len, batch,
             dtype, inference, checkpointing, methods_, plot_path, as_json) -> None:
    """Which methods fit a transformer in a memory budget; longest sequence and largest batch."""
    limit = budget
    if plot_path is not None:
        common.writable_file(plot_path, "--plot")
    if hf_config is not None:
        if config_src is not None or any(x is not None for x in (layers, d_model, heads, kv_heads, ffn_mult, vocab)):
            raise ValueError("--hf-config describes the whole model: do not combine it with --config or shape options")
        plan_hf(hf_config, limit, seq_len or 4096, batch or 1, dtype, not inference, checkpointing, methods_,
                as_json)
        return
    overrides = dict(layers=layers, d_model=d_model, heads=heads, kv_heads=kv_heads, ffn_mult=ffn_mult,
                     vocab=vocab, seq_len=seq_len, batch=batch, dtype=dtype)
    if inference:
        overrides["training"] = False
    if checkpointing:
        overrides["checkpointing"] = True
    cfg = load_config(config_src, **overrides)
    for name, opts in methods_ or []:
        registry.get(name).make_options(opts)  # unknown names and options fail before any search
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Methods without a closed form are traced at every step of the searches: show progress.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("plan", total=None)

        err = Console(stderr=True)

        def on_method(name, i, total):
            progress.update(task, total=total, completed=i, description=f"plan: {name}")
            if not err.is_terminal:
                # A log file or CI: one line per method instead of the live bar.
                err.print(f"plan: {i + 1}/{total} {name}", highlight=False)

        rows = plan_specs(cfg, limit, methods_, on_method)
    if plot_path:
        ok = [r["method"] for r in rows if r["status"] == "ok"]
        plot(cfg, ok, limit, plot_path)
    if as_json:
        click.echo(json.dumps({"config": {k: v for k, v in cfg.__dict__.items()}, "budget_bytes": limit,
                               "params": cfg.params(), "methods": rows}, indent=2))
        return
    mode = "training, AdamW" if cfg.training else "inference, KV cache"
    title = (f"attnmem plan: {cfg.layers}L d={cfg.d_model} H={cfg.heads}/{cfg.hkv} N={cfg.seq_len} "
             f"B={cfg.batch} {cfg.dtype} ({mode}{', checkpointing' if cfg.checkpointing else ''}); "
             f"budget {limit / GiB:.1f} GiB")
    console.print(fit_table(title, "method", rows, lambda r: r["peak_gib"]))
    if plot_path:
        console.print(f"plot: {plot_path}")


def plan_hf(path, limit, seq_len, batch, dtype, training, checkpointing, methods_, as_json) -> None:
    """``plan --hf-config``: each HF attention implementation and attnmem method, traced."""
    # Imported only here: transformers is the optional extra attnmem[hf].
    from ..integrations import hf

    config = hf.load_hf_config(path)
    rows = hf.plan_step(config, limit, seq_len=seq_len, batch=batch, methods=methods_ or [("chunked", {})],
                        training=training,
                        checkpointing=checkpointing, dtype=DTYPES[dtype] if dtype else None)
    if as_json:
        click.echo(json.dumps({"hf_config": path, "budget_bytes": limit, "seq_len": seq_len, "batch": batch,
                               "methods": rows}, indent=2))
        return
    mode = "training, AdamW" if training else "inference"
    title = (f"attnmem plan: {config.model_type} from {path}, N={seq_len} B={batch} ({mode}"
             f"{', checkpointing' if checkpointing else ''}); budget {limit / GiB:.1f} GiB")
    console.print(fit_table(title, "attention", rows, lambda r: r["peak_bytes"] / GiB))
