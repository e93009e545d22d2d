"""``attnmem decode-bench``: cache memory and decoding speed against context length."""

from __future__ import annotations

import json

import click

from ..bench.decode import DecodeConfig, cache_specs, int8_error, markdown_tables, plot, run_decode_bench
from . import common
from .common import console, err_console


@click.command("decode-bench")
@click.option("--contexts", default="1024,4096,16384,65536", callback=common.int_list,
              help="Comma-separated context lengths (tokens already in the cache).")
@click.option("--kinds", default=None,
              help=f"Comma-separated cache kinds (default: all of {', '.join(cache_specs(DecodeConfig()))}).")
@click.option("--d-model", default=512, type=click.IntRange(min=1))
@click.option("--heads", default=8, type=click.IntRange(min=1))
@click.option("--layers", default=4, type=click.IntRange(min=1))
@click.option("--window", default=1024, type=click.IntRange(min=1), help="Sliding-window cache size.")
@click.option("--steps", default=8, type=click.IntRange(min=1), help="Tokens decoded per timed round.")
@click.option("--rounds", default=5, type=click.IntRange(min=1), help="Timed rounds (median).")
@click.option("--threads", default=1, type=click.IntRange(min=1), help="torch threads while timing.")
@click.option("--int8-error/--no-int8-error", "with_int8_error", default=True,
              help="Also report the int8 cache's error.")
@click.option("--out", "out_dir", default="report", type=click.Path(file_okay=False), help="Output folder.")
def decode_bench_cmd(contexts, kinds, d_model, heads, layers, window, steps, rounds, threads, with_int8_error,
                     out_dir):
    """Decode with each cache kind: cache MiB and tokens/s against context length, with a plot."""
    cfg = DecodeConfig(d_model=d_model, heads=heads, layers=layers, window=window, steps=steps, rounds=rounds,
                       threads=threads)
    if d_model % heads:
        raise ValueError(f"--d-model={d_model} is not divisible by --heads={heads}")
    names = [k.strip() for k in kinds.split(",")] if kinds else None
    unknown = [k for k in names or [] if k not in cache_specs(cfg)]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {', '.join(unknown)}; expected some of {', '.join(cache_specs(cfg))}")
    out = common.writable_dir(out_dir, "--out")
    results = out / "decode.jsonl"
    results.unlink(missing_ok=True)

    def write(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    rows = run_decode_bench(contexts, cfg, names, on_row=write,
                            log=lambda msg: err_console.print(msg, style="dim", highlight=False))
    if with_int8_error:
        row = int8_error(cfg, prompt=min(contexts), steps=steps)
        write(row)
        rows.append(row)
    console.print(markdown_tables(rows), highlight=False)
    if with_int8_error:
        console.print(f"int8 cache vs float cache, logits over {row['steps']} steps: rel. error "
                      f"{row['logits_rel_err']:.2e}, argmax agreement {row['argmax_agreement']:.3f}")
    console.print(f"results: {results}\nplot: {plot(rows, out / 'decode.png')}")
