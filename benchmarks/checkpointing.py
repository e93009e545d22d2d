"""Activation checkpointing in training: peak memory and step time with and without it.

    python benchmarks/checkpointing.py [--seq-len 4096] [--layers 4] [--repeats 3]

One full training step (forward, loss, backward, AdamW update) of ``attnmem.tasks``' model on
MQAR, measured with ``attnmem.measure`` (peak: every live tensor, parameters included, tracked
at the operator level; time: median of untracked repeats). The two settings are interleaved
(off, on, off, on, ...) so that load from other processes hits both alike; the ratio of the
medians is reported. Rows are appended to benchmarks/results/checkpointing.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from _common import RESULTS, append_row, log
from attnmem.bench import environment
from attnmem.memory.measure import MiB, measure
from attnmem.training import TrainConfig, build, loss_and_correct


def one_step_fn(config: TrainConfig):
    task, model, opt, _ = build(config)
    inputs, labels = task.sample(config.batch_size, torch.Generator().manual_seed(0))

    def step(params, inputs, labels):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = loss_and_correct(*model.scored(inputs, labels))
        loss.backward()
        opt.step()

    return step, list(model.parameters()), inputs, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--method", default="chunked")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--out", default=str(RESULTS / "checkpointing.jsonl"))
    args = ap.parse_args()
    runs = {}
    for ckpt in (False, True):
        cfg = TrainConfig(task="mqar", task_options={"vocab_size": args.vocab, "num_pairs": 16},
                          seq_len=args.seq_len, method=args.method, d_model=args.d_model, n_heads=args.heads,
                          n_layers=args.layers, batch_size=args.batch, checkpointing=ckpt)
        step, params, x, y = one_step_fn(cfg)
        m = measure(step, params, x, y, repeats=0, warmup=1)  # one warmup step, then the tracked one
        runs[ckpt] = {"fn": (step, params, x, y), "peak": m.peak_bytes, "times": []}
        log(f"checkpointing={ckpt}: peak {m.peak_bytes / MiB:.1f} MiB")
    for r in range(args.rounds):
        for ckpt in (False, True):
            step, params, x, y = runs[ckpt]["fn"]
            t0 = time.perf_counter()
            step(params, x, y)
            runs[ckpt]["times"].append(time.perf_counter() - t0)
            log(f"round {r}: checkpointing={ckpt} step {runs[ckpt]['times'][-1]:.2f} s")
    off, on = runs[False], runs[True]
    t_off, t_on = statistics.median(off["times"]), statistics.median(on["times"])
    row = {"bench": "checkpointing", "seq_len": args.seq_len, "d_model": args.d_model, "heads": args.heads,
           "layers": args.layers, "batch": args.batch, "vocab": args.vocab, "method": args.method,
           "dtype": "float32", "device": "cpu",
           "peak_mib_off": off["peak"] / MiB, "peak_mib_on": on["peak"] / MiB,
           "peak_cut": 1 - on["peak"] / off["peak"], "step_s_off": t_off, "step_s_on": t_on,
           "time_ratio": t_on / t_off, "times_off": off["times"], "times_on": on["times"],
           "loadavg_1m": os.getloadavg()[0], **environment()}
    append_row(Path(args.out), row)
    print(f"| N | layers | d_model | peak off MiB | peak on MiB | cut | step off s | step on s | ratio |\n"
          f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {args.seq_len} | {args.layers} | {args.d_model} | {row['peak_mib_off']:.1f} | {row['peak_mib_on']:.1f} | "
          f"{row['peak_cut']:.0%} | {t_off:.2f} | {t_on:.2f} | {row['time_ratio']:.2f}× |")


if __name__ == "__main__":
    main()
