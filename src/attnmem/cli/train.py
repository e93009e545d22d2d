"""``attnmem train``: a long-range task with a chosen method, or a sweep over methods."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch
from rich.table import Table

from .. import training
from ..method_spec import format_method_spec, parse_method_list, parse_options
from ..tasks import TASKS
from ..training import MASK_WINDOW, TrainConfig, estimated_peak_fn, fit
from . import common
from .common import console, err_console


def metrics_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("method", "steps", "eval acc", "eval loss", "peak MiB", "tokens/s", "train s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], str(r["steps"]), f"{r.get('eval_accuracy', float('nan')):.4f}",
                      f"{r.get('eval_loss', float('nan')):.4f}", f"{r['peak_mib']:.1f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['train_time_s']:.1f}")
    return table


@click.command("train")
@click.option("--task", default="mqar", type=click.Choice(sorted(TASKS)), show_default=True)
@click.option("--task-option", "task_items", multiple=True, metavar="KEY=VALUE",
              help="A task option, e.g. num_pairs=16, vocab_size=512 (repeatable).")
@click.option("--train-mix", "train_mix", default=None, metavar="OPTS;OPTS",
              help="Extra training distributions, semicolon-separated task-option sets, e.g. "
                   "'seq_len=64,num_pairs=4;seq_len=128,num_pairs=8': each step draws from the task and these "
                   "(same tokens per batch); evaluation stays on the task.")
@click.option("--method", default="chunked", show_default=True, callback=common.method,
              help="Attention method, optionally with options: NAME[:KEY=VALUE,...].")
@click.option("--window", default=None, type=click.IntRange(min=1),
              help="Add a causal sliding-window mask of this many keys.")
@click.option("--sweep", "do_sweep", is_flag=True, help="Train every method of --methods with the same budget.")
@click.option("--methods", "methods_", default=None,
              help="Method specs for --sweep, NAME[:KEY=VALUE,...] separated by ';' or ',', "
                   "e.g. 'chunked;chunked:mask_window=32;linear'.")
@click.option("--seq-len", default=256, type=int, callback=common.seq_len, show_default=True)
@click.option("--d-model", default=64, type=click.IntRange(min=1), show_default=True)
@click.option("--heads", default=2, type=click.IntRange(min=1), show_default=True)
@click.option("--layers", default=2, type=click.IntRange(min=1), show_default=True)
@click.option("--positions", default="sinusoidal", type=click.Choice(["sinusoidal", "rotary"]), show_default=True,
              help="Sinusoidal embeddings added to the input, or rotary q and k in every layer.")
@click.option("--tie-embeddings", is_flag=True, help="Read out with the token embedding (language-model tasks).")
@click.option("--batch", default=32, type=click.IntRange(min=1), show_default=True)
@click.option("--steps", default=1000, type=click.IntRange(min=1), show_default=True)
@click.option("--lr", default=3e-3, type=float, show_default=True)
@click.option("--weight-decay", default=0.1, type=float, show_default=True)
@click.option("--warmup", default=50, type=click.IntRange(min=0), show_default=True)
@click.option("--window-warmup", default=0, type=click.IntRange(min=0), show_default=True,
              help="Steps at the start that attend only to the last 32 keys, doubling in equal stages up to "
                   "seq_len / 2 (TrainConfig.window_warmup).")
@click.option("--context-warmup", default=0, type=click.IntRange(min=0), show_default=True,
              help="Steps at the start that train on shorter windows (--context-start tokens, doubling in equal "
                   "stages below --seq-len) with the same tokens per step; needs --positions rotary "
                   "(TrainConfig.context_warmup).")
@click.option("--context-start", default=128, type=click.IntRange(min=1), show_default=True,
              help="The first window length of --context-warmup.")
@click.option("--eval-every", default=100, type=click.IntRange(min=1), show_default=True)
@click.option("--eval-examples", default=256, type=click.IntRange(min=1), show_default=True)
@click.option("--checkpoint-every", default=100, type=click.IntRange(min=1), show_default=True)
@click.option("--checkpointing", is_flag=True, help="Activation checkpointing in every block.")
@click.option("--target-accuracy", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Stop at the first evaluation with at least this held-out accuracy; report its step and time.")
@click.option("--stop-at", default=None, type=click.IntRange(min=1),
              help="Stop after this step (checkpointed), the learning-rate schedule still spanning --steps.")
@click.option("--max-time", "max_time_s", default=None, type=click.FloatRange(0, min_open=True),
              help="Stop after the step that ends past this many wall seconds (evaluating there).")
@click.option("--max-batch-under", "budget", default=None, callback=common.size,
              help="Use the largest batch whose training step fits this budget (e.g. 512MiB, 2G, 1e9).")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--out", "out_dir", default="train_out", type=click.Path(file_okay=False), show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint(s).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(task, task_items, train_mix, method, window, do_sweep, methods_, seq_len, d_model, heads, layers,
              positions, tie_embeddings, batch, steps, lr, weight_decay, warmup, window_warmup, context_warmup,
              context_start, eval_every, eval_examples,
              checkpoint_every,
              checkpointing, stop_at, target_accuracy, max_time_s, budget, seed, threads, out_dir, resume,
              no_progress) -> None:
    """Train a small Transformer on a long-range task; report accuracy, loss, peak memory, tokens/s.

    Checkpoints are written atomically to OUT every --checkpoint-every steps; --resume continues
    exactly. With --sweep, every method of --methods trains with the same steps, and OUT gets
    sweep.md, sweep.json and sweep.png (accuracy against peak memory).
    """
    if methods_ and not do_sweep:
        raise ValueError("--methods is for --sweep; use --method for a single run")
    if do_sweep and not methods_:
        raise ValueError("--sweep needs --methods, e.g. --methods 'chunked;chunked:mask_window=32'")
    common.writable_dir(out_dir, "--out")
    if threads:
        torch.set_num_threads(threads)
    name, method_options = method
    if window is not None:
        method_options[MASK_WINDOW] = window
    mix = [parse_options(item.split(","), "--train-mix") for item in (train_mix or "").split(";") if item.strip()]
    config = TrainConfig(task=task, task_options=parse_options(task_items, "--task-option"), train_mix=mix,
                         seq_len=seq_len,
                         method=name, method_options=method_options, d_model=d_model, n_heads=heads,
                         n_layers=layers, positions=positions, tie_embeddings=tie_embeddings,
                         batch_size=batch, steps=steps, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup, window_warmup=window_warmup, context_warmup=context_warmup,
                         context_start=context_start, eval_every=eval_every,
                         eval_examples=eval_examples,
                         checkpoint_every=checkpoint_every, checkpointing=checkpointing,
                         target_accuracy=target_accuracy, max_time_s=max_time_s, seed=seed, out_dir=out_dir)
    if budget is not None:
        chosen = training.max_batch_under(budget, estimated_peak_fn(config))
        err_console.print(f"--max-batch-under {budget} bytes: batch {chosen}")
        config = dataclasses.replace(config, batch_size=chosen)
    if do_sweep:
        specs = [format_method_spec(n, o) for n, o in parse_method_list(methods_, "--methods", distinct="spec")]
        rows = training.sweep(config, specs, resume=resume, progress=not no_progress, stop_at=stop_at)
        console.print(metrics_table(rows, f"attnmem train --sweep: {task}, N={seq_len}"))
        console.print(f"results: {Path(out_dir) / 'sweep.md'}, {Path(out_dir) / 'sweep.png'}")
        return
    result = fit(config, resume=resume, progress=not no_progress, stop_at=stop_at)
    Path(out_dir, "summary.json").write_text(json.dumps(result.metrics, indent=2))
    console.print(metrics_table([result.metrics], f"attnmem train: {task}, N={seq_len}"))
    m = result.metrics
    if "eval_bpb" in m:
        console.print(f"validation bits per byte: {m['eval_bpb']:.4f} (corpus sha256 {m['corpus_sha256'][:16]}…, "
                      f"{m['train_files']} training / {m['validation_files']} validation files)")
    if target_accuracy is not None:
        if m["target_step"] is None:
            console.print(f"target accuracy {target_accuracy:g} not reached in {m['steps']} steps "
                          f"({m['wall_s']:.0f} s wall)")
        else:
            console.print(f"target accuracy {target_accuracy:g} reached at step {m['target_step']}: "
                          f"{m['target_wall_s']:.1f} s wall, {m['target_train_time_s']:.1f} s of training steps")
    console.print(f"results: {Path(out_dir) / 'metrics.jsonl'}")
