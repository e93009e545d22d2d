"""``attnmem decode-bench``: cache memory and decoding speed against context length, or, with
``--quality MODEL``, MQAR accuracy against cache bytes for every cache kind."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..bench.decode import DecodeConfig, cache_specs, int8_error, markdown_tables, paged_memory, plot, run_decode_bench
from . import common
from .common import console, err_console


def jsonl_writer(path: Path):
    path.unlink(missing_ok=True)

    def write(row: dict) -> None:  # one JSON line per row, as it comes
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return write


@click.command("decode-bench")
@click.option("--contexts", default="1024,4096,16384,65536", callback=common.int_list,
              help="Comma-separated context lengths (tokens already in the cache).")
@click.option("--kinds", default=None,
              help=f"Comma-separated cache kinds (default: all of {', '.join(cache_specs(DecodeConfig()))}).")
@click.option("--d-model", default=512, type=click.IntRange(min=1))
@click.option("--heads", default=8, type=click.IntRange(min=1))
@click.option("--layers", default=4, type=click.IntRange(min=1))
@click.option("--window", default=1024, type=click.IntRange(min=1), help="Sliding-window cache size.")
@click.option("--budget", default=2048, type=click.IntRange(min=1),
              help="Tokens kept by sink_window, heavy_hitter and snapkv.")
@click.option("--steps", default=8, type=click.IntRange(min=1), help="Tokens decoded per timed round.")
@click.option("--rounds", default=5, type=click.IntRange(min=1), help="Timed rounds (median).")
@click.option("--threads", default=1, type=click.IntRange(min=1), help="torch threads while timing.")
@click.option("--timing/--no-timing", default=True, help="Time decoding (or report memory only).")
@click.option("--int8-error/--no-int8-error", "with_int8_error", default=True,
              help="Also report the int8 cache's error.")
@click.option("--paged-lengths", default=None, callback=common.int_list,
              help="Also report a paged cache holding prompts of these lengths against a padded batch.")
@click.option("--quality", "quality_model", default=None, type=click.Path(dir_okay=False, exists=True),
              help="An MQAR model (attnmem.bench.decode_quality.export_model): decode held-out sequences "
                   "with every cache kind at several budgets and report accuracy against cache bytes instead.")
@click.option("--examples", default=512, type=click.IntRange(min=1), help="--quality: held-out sequences.")
@click.option("--prompt", default=None, type=click.IntRange(min=1),
              help="--quality: tokens prefilled (default: half the sequence).")
@click.option("--seed", default=7, type=int, help="--quality: seed of the held-out sequences.")
@click.option("--out", "out_dir", default="report", type=click.Path(file_okay=False), help="Output folder.")
def decode_bench_cmd(contexts, kinds, d_model, heads, layers, window, budget, steps, rounds, threads, timing,
                     with_int8_error, paged_lengths, quality_model, examples, prompt, seed, out_dir):
    """Decode with each cache kind: cache MiB and tokens/s against context length, with a plot."""
    out = common.writable_dir(out_dir, "--out")
    log = lambda msg: err_console.print(msg, style="dim", highlight=False)  # noqa: E731
    if quality_model is not None:
        _quality(Path(quality_model), out, examples, prompt, seed, threads, log)
        return
    cfg = DecodeConfig(d_model=d_model, heads=heads, layers=layers, window=window, budget=budget, steps=steps,
                       rounds=rounds, threads=threads)
    if d_model % heads:
        raise ValueError(f"--d-model={d_model} is not divisible by --heads={heads}")
    names = [k.strip() for k in kinds.split(",")] if kinds else None
    unknown = [k for k in names or [] if k not in cache_specs(cfg)]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {', '.join(unknown)}; expected some of {', '.join(cache_specs(cfg))}")
    results = out / "decode.jsonl"
    write = jsonl_writer(results)
    rows = run_decode_bench(contexts, cfg, names, on_row=write, log=log, timing=timing)
    if with_int8_error:
        row = int8_error(cfg, prompt=min(contexts), steps=steps)
        write(row)
        rows.append(row)
    console.print(markdown_tables(rows), highlight=False)
    if with_int8_error:
        console.print(f"int8 cache vs float cache, logits over {row['steps']} steps: rel. error "
                      f"{row['logits_rel_err']:.2e}, argmax agreement {row['argmax_agreement']:.3f}")
    if paged_lengths:
        paged = paged_memory(paged_lengths, cfg)
        write(paged)
        console.print(f"paged cache, {len(paged_lengths)} prompts of {min(paged_lengths)}..{max(paged_lengths)} "
                      f"tokens: {paged['ratio_to_held']:.4f}× the bytes of the tokens held, "
                      f"{paged['ratio_to_padded']:.4f}× a padded batch's")
    console.print(f"results: {results}\nplot: {plot(rows, out / 'decode.png')}")


def _quality(model: Path, out: Path, examples: int, prompt: int | None, seed: int, threads: int, log) -> None:
    from ..bench.decode_quality import QualityConfig, markdown_table, plot, run_quality, summarize

    results = out / "decode_quality.jsonl"
    write = jsonl_writer(results)
    q = QualityConfig(examples=examples, prompt=prompt, seed=seed, threads=threads)
    rows = run_quality(model, q, on_row=write, log=log)
    summary = {"type": "summary", **summarize(rows)}
    write(summary)
    console.print(markdown_table(rows), highlight=False)
    for kind, best in summary["smallest_within"].items():
        text = "none tried" if best is None else (f"{best['budget']} tokens ({100 * best['accuracy']:.2f} %, "
                                                  f"{best['ratio_to_full']:.4f}× the full cache)")
        console.print(f"{kind}: smallest budget within 1 point of the full cache: {text}")
    console.print(f"results: {results}\nplot: {plot(rows, out / 'decode_quality.png')}")
