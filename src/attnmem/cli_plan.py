"""``attnmem estimate`` and ``attnmem plan``: predicted memory, before anything runs."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from . import registry
from .bench.cases import parse_mask
from .cli import console, main
from .memory.estimate import DTYPES, HOWS, estimate
from .memory.measure import GiB, MiB
from .memory.plan import PRESETS, load_config, parse_budget, plan, plot


def _options(pairs: tuple[str, ...]) -> dict:
    """``--option q_tile=128`` pairs as a dict; values parsed as JSON where they can be."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like NAME=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@main.command("estimate")
@click.argument("method")
@click.option("--seq-len", required=True, type=int, help="Sequence length N.")
@click.option("--batch", default=1, type=int)
@click.option("--heads", default=8, type=int)
@click.option("--kv-heads", default=None, type=int)
@click.option("--head-dim", default=64, type=int)
@click.option("--dtype", default="float32", type=click.Choice(sorted(DTYPES)))
@click.option("--causal", is_flag=True)
@click.option("--mask", "mask_spec", default="none",
              help="none, causal, window:L[:R], document:LEN, random_blocks:KEEP[:BLOCK].")
@click.option("--forward-only", is_flag=True, help="Inference: forward under no_grad.")
@click.option("--how", default="auto", type=click.Choice(HOWS), help="trace, formula, or auto.")
@click.option("--option", "option_pairs", multiple=True, help="A method option, NAME=VALUE (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def estimate_cmd(method, seq_len, batch, heads, kv_heads, head_dim, dtype, causal, mask_spec, forward_only,
                 how, option_pairs, as_json) -> None:
    """Predicted peak memory of one attention call (forward + backward), without running it."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len}")
    mask_causal, mask = parse_mask(mask_spec, seq_len)
    est = estimate(method, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim,
                   dtype=dtype, causal=causal or mask_causal, mask=mask, training=not forward_only, how=how,
                   **_options(option_pairs))
    if as_json:
        click.echo(json.dumps(est.as_dict(), indent=2))
        return
    table = Table(title=f"attnmem estimate: {est.method}, B={batch} H={heads} N={seq_len} D={head_dim} {dtype}")
    for col in ("part", "MiB"):
        table.add_column(col, justify="right" if col == "MiB" else "left")
    for part, val in (("inputs (q, k, v)", est.inputs_bytes), ("saved for backward", est.saved_bytes),
                      ("transient", est.transient_bytes), ("peak", est.peak_bytes)):
        table.add_row(part, f"{val / MiB:,.1f}")
    console.print(table)
    console.print(f"source: {est.source}")


@main.command("plan")
@click.option("--config", "config_src", default=None,
              help=f"Preset ({', '.join(PRESETS)}) or a YAML/JSON file.")
@click.option("--budget", required=True, help="Memory budget, e.g. 24GiB or 80GB.")
@click.option("--layers", type=int)
@click.option("--d-model", type=int)
@click.option("--heads", type=int)
@click.option("--kv-heads", type=int)
@click.option("--ffn-mult", type=int)
@click.option("--vocab", type=int)
@click.option("--seq-len", type=int)
@click.option("--batch", type=int)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)))
@click.option("--inference", is_flag=True, help="Prefill into a KV cache instead of an AdamW training step.")
@click.option("--checkpointing", is_flag=True, help="Activation checkpointing of every block.")
@click.option("--methods", "methods_", default=None, help="Comma-separated method names (default: all).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG of peak memory against sequence length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(config_src, budget, layers, d_model, heads, kv_heads, ffn_mult, vocab, seq_len, batch, dtype,
             inference, checkpointing, methods_, plot_path, as_json) -> None:
    """Which methods fit a transformer in a memory budget; longest sequence and largest batch."""
    limit = parse_budget(budget)
    overrides = dict(layers=layers, d_model=d_model, heads=heads, kv_heads=kv_heads, ffn_mult=ffn_mult,
                     vocab=vocab, seq_len=seq_len, batch=batch, dtype=dtype)
    if inference:
        overrides["training"] = False
    if checkpointing:
        overrides["checkpointing"] = True
    cfg = load_config(config_src, **overrides)
    names = [m.strip() for m in methods_.split(",")] if methods_ else None
    for name in names or []:
        registry.get(name)
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

        rows = plan(cfg, limit, methods=names, on_method=on_method)
    if plot_path:
        ok = [r["method"] for r in rows if r["status"] == "ok"]
        plot(cfg, ok, limit, plot_path)
    if as_json:
        click.echo(json.dumps({"config": {k: v for k, v in cfg.__dict__.items()}, "budget_bytes": limit,
                               "params": cfg.params(), "methods": rows}, indent=2))
        return
    mode = "training, AdamW" if cfg.training else "inference, KV cache"
    table = Table(title=(f"attnmem plan: {cfg.layers}L d={cfg.d_model} H={cfg.heads}/{cfg.hkv} N={cfg.seq_len} "
                         f"B={cfg.batch} {cfg.dtype} ({mode}{', checkpointing' if cfg.checkpointing else ''}); "
                         f"budget {limit / GiB:.1f} GiB"))
    for col in ("method", "peak GiB", "fits", "max seq len", "max batch"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["method"], "-", "-", "-", r["reason"][:60])
            continue
        table.add_row(r["method"], f"{r['peak_gib']:.2f}", "yes" if r["fits"] else "no",
                      str(r["max_seq_len"] or "none fits"), str(r["max_batch"] or "none fits"))
    console.print(table)
    if plot_path:
        console.print(f"plot: {plot_path}")
