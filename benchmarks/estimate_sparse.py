"""Closed forms of the sparse, selective, adaptive-span methods: time at N = 1,048,576, error vs measured.

    PYTHONPATH=src nice -n 5 python benchmarks/estimate_sparse.py [--table-only]

1. Wall time of ``attnmem.estimate`` (``how="auto"``, which picks the closed form at this size)
   at N = 1,048,576, B=1, H=8, D=64, float32, training, causal and not.
2. The closed form (``how="formula"``) against ``attnmem.measure`` of one forward + backward at
   the standard configuration (CPU, float32, B=1, H=8, D=64), causal: N = 16384 for the O(N·w)
   patterns and adaptive span (strided too: its residue classes cost N²/stride pairs);
   N = 4096 for the methods whose time is O(N²) (fixed lists every key tile, topk and hard
   score every key) so a measured run stays within minutes on 2 cores. adaptive_span and
   adaptive_span_fixed are causal by definition: their timing rows are causal only.
``--only LABEL ...`` reruns those labels' rows and keeps the others'.
Rows go to benchmarks/results/estimate_sparse.jsonl as they finish (a separate file from
benchmarks/estimate.py's, which covers the exact methods).
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import Case, environment, run_case
from attnmem.memory.estimate import estimate
from attnmem.memory.measure import MiB

OUT = RESULTS / "estimate_sparse.jsonl"
METHODS = [  # (label, method, options, N measured)
    ("sliding_window", "sliding_window", {}, 16384),
    ("dilated", "dilated", {}, 16384),
    ("longformer", "longformer", {}, 16384),
    ("bigbird", "bigbird", {}, 16384),
    ("strided", "strided", {}, 16384),
    ("strided (fixed)", "strided", {"pattern": "fixed"}, 4096),
    ("topk", "topk", {}, 4096),
    ("hard", "hard", {}, 4096),
    ("adaptive_span", "adaptive_span", {}, 16384),
    ("adaptive_span_fixed", "adaptive_span_fixed", {}, 16384),
]
CAUSAL_ONLY = {"adaptive_span", "adaptive_span_fixed"}  # spans look backwards: no non-causal call


def _selected(only: list[str] | None):
    return [m for m in METHODS if only is None or m[0] in only]


def timing_rows(only: list[str] | None = None) -> None:
    n = 1_048_576
    for label, name, opts, _ in _selected(only):
        for causal in (True,) if name in CAUSAL_ONLY else (False, True):
            t0 = time.perf_counter()
            est = estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=causal, **opts)
            wall = time.perf_counter() - t0
            append_row(OUT, dict(kind="timing", label=label, method=name, options=opts, seq_len=n, causal=causal,
                                 wall_s=wall, source=est.source, peak_bytes=est.peak_bytes, **environment()))
            log(f"timing {label} causal={causal}: {wall:.3f}s ({est.source}) {est.peak_bytes / 2**30:.2f} GiB")


def measured_rows(only: list[str] | None = None) -> None:
    for label, name, opts, n in _selected(only):
        case = Case(name, n, causal=True, options=dict(opts))
        row = run_case(case, repeats=0, warmup=0)
        if row["status"] != "ok":
            log(f"{label} N={n}: {row.get('reason')}")
            continue
        f = estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=True, how="formula", **opts)
        append_row(OUT, dict(kind="measured", label=label, method=name, options=opts, seq_len=n, causal=True,
                             measured_bytes=row["peak_bytes"], formula_bytes=f.peak_bytes, **environment()))
        log(f"{label} N={n}: measured {row['peak_bytes'] / MiB:.1f} MiB, formula {f.peak_bytes / MiB:.1f} MiB")


def tables(rows: list[dict]) -> str:
    order = {m[0]: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: order.get(r["label"], len(order)))  # stable: causal False, True
    env = next(iter(rows), {})
    lines = [f"Machine: {env.get('processor', '?')}, {env.get('cpu_threads', '?')} threads, "
             f"torch {env.get('torch', '?')}.",
             "", "`attnmem.estimate` at N = 1,048,576 (B=1, H=8, D=64, float32, training):", "",
             "| method | causal | source | wall s | predicted peak GiB |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        lines.append(f"| {r['label']} | {r['causal']} | {r['source']} | {r['wall_s']:.2f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    lines += ["", "Closed form vs measured, one causal call, CPU, float32, B=1, H=8, D=64, forward + backward:", "",
              "| method | N | measured MiB | closed form MiB | error |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "measured"):
        err = 100 * (r["formula_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
        lines.append(f"| {r['label']} | {r['seq_len']} | {r['measured_bytes'] / MiB:.1f} | "
                     f"{r['formula_bytes'] / MiB:.1f} | {err:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--recompute-formulas", action="store_true",
                    help="Recompute the closed-form column of recorded rows (no measuring).")
    ap.add_argument("--only", nargs="+", metavar="LABEL", choices=[m[0] for m in METHODS],
                    help="Rerun only these labels' rows; the other recorded rows stay.")
    args = ap.parse_args()
    if args.only:
        keep = [r for r in load_rows(OUT) if r["label"] not in args.only]
        if OUT.exists():
            OUT.unlink()
        for r in keep:
            append_row(OUT, r)
        timing_rows(args.only)
        measured_rows(args.only)
        args.table_only = True
    if args.recompute_formulas:
        rows = load_rows(OUT)
        OUT.unlink()
        for r in rows:
            if r["kind"] == "measured":
                r["formula_bytes"] = estimate(r["method"], batch=1, heads=8, seq_len=r["seq_len"], head_dim=64,
                                              causal=True, how="formula", **r["options"]).peak_bytes
            append_row(OUT, r)
        args.table_only = True
    if not args.table_only:
        if OUT.exists():
            OUT.unlink()
        timing_rows()
        measured_rows()
    print(tables(load_rows(OUT)))


if __name__ == "__main__":
    main()
