"""Exact attention at the standard configuration: chunked against sdpa and reference.

    python benchmarks/exact.py [--quick] [--part memory|time|all]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward.
Part "memory": one tracked run per case (peak bytes, and the time of that run for
orientation). Part "time": ratios from interleaved runs (A, B, A, B, ...; medians), so that
load from other processes falls on both sides alike. Rows are appended to
benchmarks/results/exact*.jsonl as they finish; markdown tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json

import torch

from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import Case, environment, run_case, time_interleaved
from attnmem.memory.measure import GiB

MASKS = ["none", "causal", "window:1024", "random_blocks:0.5:256"]


def memory_cases(quick: bool) -> list[Case]:
    cases: list[Case] = []
    for n in [4096] if quick else [4096, 16384, 65536]:
        cases += [Case("chunked", n, mask=m) for m in MASKS]
        if n <= 16384:
            cases += [Case("sdpa", n), Case("sdpa", n, mask="causal")]
        if n <= 4096:
            cases.append(Case("reference", n))
    n = 8192 if quick else 16384
    cases += [Case("chunked", n, mask="window:256"), Case("sdpa", n, mask="dense_window:256")]
    if not quick:
        # The long-context check: causal forward + backward at N = 131072, one head. The
        # reference would need 64 GiB for its score matrix alone.
        cases.append(Case("chunked", 131072, heads=1, mask="causal"))
    return cases


def time_groups(quick: bool) -> list[tuple[str, list[Case], int]]:
    n_win = 8192 if quick else 16384
    return [
        ("chunked vs sdpa, no mask, N=8192", [Case("chunked", 8192), Case("sdpa", 8192)], 5),
        ("chunked causal vs chunked unmasked (and sdpa causal), N=8192",
         [Case("chunked", 8192, mask="causal"), Case("chunked", 8192), Case("sdpa", 8192, mask="causal")], 5),
        (f"chunked window(256,256) vs sdpa with the same window as a dense bool mask, N={n_win}",
         [Case("chunked", n_win, mask="window:256"), Case("sdpa", n_win, mask="dense_window:256")], 3),
    ]


def memory_table(rows: list[dict]) -> str:
    lines = ["| N | H | mask | method | peak MiB | peak / floor | time of the tracked run (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["heads"], r["mask"], r["method"])):
        if r.get("status") == "ok":
            lines.append(f"| {r['seq_len']} | {r['heads']} | {r['mask']} | {r['method']} | {r['peak_mib']:.0f} "
                         f"| {r['peak_over_floor']:.2f} | {r['time_s']:.1f} |")
        else:
            lines.append(f"| {r['seq_len']} | {r['heads']} | {r['mask']} | {r['method']} | — | — | "
                         f"{r.get('reason', '')} |")
    return "\n".join(lines)


def time_table(rows: list[dict]) -> str:
    lines = ["| comparison | medians (s) | ratio to the first |", "|---|---|---|"]
    for r in rows:
        t = r["times_s"]
        lines.append(f"| {r['group']} | {', '.join(f'{x:.2f}' for x in t)} | "
                     f"{', '.join(f'{t[0] / x:.2f}' for x in t[1:])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="N = 4096/8192 only")
    ap.add_argument("--part", choices=["memory", "time", "all"], default="all")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the time part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads else "")
    mem_path = RESULTS / f"exact_memory{'_quick' if args.quick else ''}.jsonl"
    time_path = RESULTS / f"exact_time{suffix}.jsonl"
    if not args.table_only:
        log(f"environment: {json.dumps(environment())}")
    if not args.table_only and args.part in ("memory", "all"):
        done = {r["key"] for r in load_rows(mem_path)}
        for case in memory_cases(args.quick):
            if case.key() in done:
                continue
            log(f"memory: {case.method} N={case.seq_len} H={case.heads} mask={case.mask} ...")
            row = run_case(case, repeats=0, warmup=0)
            append_row(mem_path, row)
            ok = row["status"] == "ok"
            msg = (f"peak {row['peak_bytes'] / GiB:.3f} GiB ({row['peak_over_floor']:.2f} x floor), "
                   f"{row['time_s']:.1f} s" if ok else f"{row['status']}: {row['reason']}")
            log("  " + msg)
    if not args.table_only and args.part in ("time", "all"):
        for name, cases, rounds in time_groups(args.quick):
            log(f"time: {name} ...")
            times = time_interleaved(cases, rounds=rounds)
            append_row(time_path, {"group": name, "cases": [c.key() for c in cases], "times_s": times,
                                   "rounds": rounds, **environment()})
            log("  " + ", ".join(f"{t:.2f} s" for t in times))
    print("### Peak memory\n\n" + memory_table(load_rows(mem_path)))
    print("\n### Time ratios (interleaved)\n\n" + time_table(load_rows(time_path)))


if __name__ == "__main__":
    main()
