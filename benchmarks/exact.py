"""Exact attention at the standard configuration: chunked against sdpa and reference.

    python benchmarks/exact.py [--quick] [--out benchmarks/results/exact.jsonl]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward. Rows are
appended to the results file as they finish; the markdown tables for BENCHMARKS.md are
printed at the end (and can be re-printed with --table-only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import Case, environment, run_case
from attnmem.memory.measure import GiB

MASKS = ["none", "causal", "window:1024", "random_blocks:0.5:256"]


def plan(quick: bool) -> list[tuple[Case, int]]:
    """(case, repeats). Large cases are timed on their single tracked run."""
    cases: list[tuple[Case, int]] = []
    lengths = [4096] if quick else [4096, 16384, 65536]
    for n in lengths:
        reps = 2 if n <= 4096 else (1 if n <= 16384 else 0)
        for mask in MASKS:
            cases.append((Case("chunked", n, mask=mask), reps))
        if n <= 16384:
            cases.append((Case("sdpa", n), reps))
            cases.append((Case("sdpa", n, mask="causal"), reps))
        if n <= 4096:
            cases.append((Case("reference", n), reps))
    # Time against PyTorch's fused kernel at N = 8192, unmasked and causal.
    for mask in ("none", "causal"):
        cases.append((Case("chunked", 8192, mask=mask), 3))
        cases.append((Case("sdpa", 8192, mask=mask), 3))
    # Sliding window 256 against SDPA given the same window as a dense bool mask.
    n = 8192 if quick else 16384
    cases.append((Case("chunked", n, mask="window:256"), 2))
    cases.append((Case("sdpa", n, mask="dense_window:256"), 1))
    if not quick:
        # The long-context check: causal forward + backward at N = 131072, one head.
        cases.append((Case("chunked", 131072, heads=1, mask="causal"), 0))
    return cases


def table(rows: list[dict]) -> str:
    ok = {r["key"]: r for r in rows if r.get("status") == "ok"}

    def find(method, n, mask, heads=8):
        for r in ok.values():
            if r["method"] == method and r["seq_len"] == n and r["mask"] == mask and r["heads"] == heads:
                return r
        return None

    lines = ["| N | mask | method | peak MiB | peak / floor | time s | time / sdpa (same mask) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(ok.values(), key=lambda r: (r["heads"], r["seq_len"], r["mask"], r["method"])):
        peer_mask = r["mask"] if r["mask"] in ("none", "causal") else None
        peer = find("sdpa", r["seq_len"], peer_mask, r["heads"]) if peer_mask else None
        if r["mask"] == "window:256":
            peer = find("sdpa", r["seq_len"], "dense_window:256", r["heads"])
        ratio = f"{r['time_s'] / peer['time_s']:.2f}" if peer and r["method"] != "sdpa" else ""
        n_label = f"{r['seq_len']}" if r["heads"] == 8 else f"{r['seq_len']} (H={r['heads']})"
        lines.append(f"| {n_label} "
                     f"| {r['mask']} | {r['method']} | {r['peak_mib']:.0f} | {r['peak_over_floor']:.2f} "
                     f"| {r['time_s']:.2f} | {ratio} |")
    errs = [r for r in rows if r.get("status") != "ok"]
    for r in errs:
        lines.append(f"| {r['seq_len']} | {r['mask']} | {r['method']} | — | — | — | {r.get('reason', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="N = 4096/8192 only")
    ap.add_argument("--out", type=Path, default=RESULTS / "exact.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        done = {r["key"] for r in load_rows(args.out)}
        log(f"environment: {environment()}")
        for case, reps in plan(args.quick):
            if case.key() in done:
                continue
            log(f"running {case.method} N={case.seq_len} H={case.heads} mask={case.mask} ...")
            row = run_case(case, repeats=reps, warmup=1 if case.seq_len <= 16384 else 0)
            append_row(args.out, row)
            if row["status"] == "ok":
                log(f"  peak {row['peak_bytes'] / GiB:.3f} GiB ({row['peak_over_floor']:.2f} x floor), "
                    f"{row['time_s']:.2f} s")
            else:
                log(f"  {row['status']}: {row['reason']}")
    print(table(load_rows(args.out)))


if __name__ == "__main__":
    main()
